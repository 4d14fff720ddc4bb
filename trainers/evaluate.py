"""Evaluation by the shared convention (../shared/data/README.md) and folder denoising.

Convention: images in [0, 1] read in sorted filename order; additive Gaussian noise of std σ/255 drawn
in float32 from ONE torch.Generator seeded once (seed 0), no clipping of the noisy input; the output is
clipped to [0, 1]; PSNR per image with peak 1, averaged over images. SSIM: torchmetrics' Gaussian-window
SSIM (11×11, σ=1.5, data_range 1) per image, averaged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsefold.config import NoiseConfig
from sparsefold.datasets import add_noise, gaussian_eval_noise, list_images, load_image, save_image


def psnr(x: Tensor, ref: Tensor) -> float:
    """PSNR in dB with peak 1 of one image (any shape)."""
    mse = torch.mean((x.double() - ref.double()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


def ssim(x: Tensor, ref: Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(x.reshape(1, *x.shape[-3:]).double(),
                                                     ref.reshape(1, *ref.shape[-3:]).double(), data_range=1.0))


def eval_sigma(noise: NoiseConfig) -> float:
    """The σ (0..255) the evaluation noise is drawn with: noise.sigma, or the middle of a σ range; 0 for
    Poisson/Binomial data."""
    if noise.kind != "gaussian":
        return 0.0
    return noise.sigma if noise.sigma_max is None else 0.5 * (noise.sigma + noise.sigma_max)


def noisy_versions(clean: list[Tensor], noise: NoiseConfig, seed: int = 0) -> list[Tensor]:
    """Seeded noisy copies. Gaussian: the shared convention (σ = noise.sigma, or the middle of a σ range).
    Poisson/Binomial: one generator seeded once, drawn in order."""
    if noise.kind == "gaussian":
        return gaussian_eval_noise(clean, eval_sigma(noise), seed=seed)
    g = torch.Generator().manual_seed(seed)
    return [add_noise(x, noise, g)[0] for x in clean]


@torch.inference_mode()
def denoise(model: nn.Module, noisy: Tensor, device: torch.device | str = "cpu", sigma: float | None = None) -> Tensor:
    """Model output for one (C, H, W) image, clipped to [0, 1]. ``sigma`` (0..255) is the known noise
    level, or None: noise-adaptive models then estimate it from the image (blind denoising)."""
    s = None if sigma is None else torch.tensor([float(sigma)], device=device)
    out = model(noisy.unsqueeze(0).to(device), s).squeeze(0).float().cpu()
    return out.clamp_(0.0, 1.0)


def evaluate_images(
    model: nn.Module,
    files: list[Path],
    noise: NoiseConfig,
    gray: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    with_ssim: bool = True,
    keep_first: bool = False,
    blind: bool = False,
) -> dict:
    """Score ``model`` on ``files`` (in the given order). Returns psnr, ssim, images, sec_per_image,
    per-image lists and, with ``keep_first``, the first (noisy, denoised, clean) triple. The model is told
    the noise level unless ``blind``."""
    was_training = model.training
    model.eval()
    clean = [load_image(f, gray=gray) for f in files]
    noisy = noisy_versions(clean, noise, seed=seed)
    psnrs, ssims, secs, cpu, first = [], [], [], [], None
    for i, (x, y) in enumerate(zip(clean, noisy)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = denoise(model, y, device, None if blind else eval_sigma(noise))
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU seconds of all threads: robust to other load
        psnrs.append(psnr(out, x))
        if with_ssim:
            ssims.append(ssim(out, x))
        if keep_first and i == 0:
            first = (y.clamp(0, 1), out, x)
    model.train(was_training)
    n = len(files)
    res = {
        "psnr": sum(psnrs) / n if n else float("nan"),
        "ssim": sum(ssims) / n if ssims else float("nan"),
        "input_psnr": sum(psnr(y, x) for x, y in zip(clean, noisy)) / n if n else float("nan"),
        "images": n,
        "sec_per_image": sum(secs) / n if n else float("nan"),
        "cpu_sec_per_image": sum(cpu) / n if n else float("nan"),
        "per_image": [{"file": f.name, "psnr": p} for f, p in zip(files, psnrs)],
    }
    if keep_first:
        res["first"] = first
    return res


def denoise_path(model: nn.Module, src: Path, dst: Path, gray: bool = True, device: str = "cpu",
                 sigma: float | None = None, adapt: Callable[[nn.Module, Tensor], nn.Module] | None = None,
                 ) -> list[Path]:
    """Denoise one image or every image of a folder; writes PNGs. Returns the written paths. ``sigma``:
    the known noise level (None: blind). ``adapt(model, noisy) -> model``: test-time adaptation per image."""
    pairs = ([(src, dst if dst.suffix else dst / (src.stem + ".png"))] if src.is_file()
             else [(f, dst / (f.stem + ".png")) for f in list_images(src)])
    if not pairs:
        raise ValueError(f"{src}: no images found")
    model.eval()
    out = []
    for f, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        y = load_image(f, gray=gray)
        m = adapt(model, y) if adapt is not None else model
        save_image(denoise(m.eval(), y, device, sigma), target)
        out.append(target)
    return out

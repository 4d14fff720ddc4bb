"""Evaluation by the benchmark convention below (the one the BSD68 / Set12 numbers use) and folder denoising.

Convention: images in [0, 1] read in sorted filename order; additive Gaussian noise of std σ/255 drawn
in float32 from ONE torch.Generator seeded once (seed 0), no clipping of the noisy input; the output is
clipped to [0, 1]; PSNR per image with peak 1, averaged over images. SSIM: torchmetrics' Gaussian-window
SSIM (11×11, σ=1.5, data_range 1) per image, averaged.

``convention="dcea"``: the Poisson convention of the DCEA code (btolooshams/dea src/predict.py), for comparing
its releases with the numbers its code prints: each clean image divided by its maximum (the counts are then
Poisson(peak·x/max x), as theirs), the output not clipped; PSNR with peak 1 of the rescaled image, which is
their PSNR with peak max(x) of the estimate max(x)·x̂.

Restoration tasks (``task.kind`` other than denoise, y = A x + n): one generator seeded once (seed 0), drawn
image after image in sorted order, first the operator's randomness (mask, kernel angle), then the Gaussian
noise on A x (σ as above; datasets/degrade.py); super-resolution crops each image to a multiple of the factor
(its bottom/right rows and columns). The whole image is one forward pass (no tiles: A is global for MRI); the
output is clipped, PSNR with peak 1 against the (cropped) clean image; ``input_psnr`` is that of Aᵀy, clipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsefold.config import EVAL_CONVENTIONS, NoiseConfig, TaskConfig
from sparsefold.datasets import add_noise, gaussian_eval_noise, load_image, save_image
from sparsefold.datasets.degrade import degrade, make_operator
from sparsefold.errors import InputError, RunError
from sparsefold.models.operators import Operator
from sparsefold.trainers.tiling import denoise_tiled, tile_pixels


def psnr(x: Tensor, ref: Tensor) -> float:
    """PSNR in dB with peak 1 of one image (any shape)."""
    mse = torch.mean((x.double() - ref.double()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


def ssim(x: Tensor, ref: Tensor) -> float:
    """SSIM (Gaussian window 11, σ 1.5, data range 1) of one image (..., C, H, W), computed in float64."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    value = structural_similarity_index_measure(x.reshape(1, *x.shape[-3:]).double(),
                                                ref.reshape(1, *ref.shape[-3:]).double(), data_range=1.0)
    assert isinstance(value, Tensor)  # a tuple only with return_full_image / return_contrast_sensitivity
    return float(value)


def noisy_versions(clean: list[Tensor], noise: NoiseConfig, seed: int = 0) -> list[Tensor]:
    """Seeded noisy copies. Gaussian: the shared convention (σ = noise.sigma, or the middle of a σ range).
    Poisson/Binomial: one generator seeded once, drawn in order."""
    if noise.kind == "gaussian":
        return gaussian_eval_noise(clean, noise.eval_sigma, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return [add_noise(x, noise, g)[0] for x in clean]


def measured_versions(clean: list[Tensor], task: TaskConfig, noise: NoiseConfig, seed: int = 0
                      ) -> list[tuple[Tensor, Tensor, Tensor, Operator]]:
    """(clean, y, sigma, operator) per image by the restoration convention (module docstring); ``clean``
    cropped for super-resolution."""
    g, out = torch.Generator().manual_seed(seed), []
    for x in clean:
        if task.kind == "sr":
            x = x[..., : x.shape[-2] - x.shape[-2] % task.factor, : x.shape[-1] - x.shape[-1] % task.factor]
        y, sigma, op = degrade(x.unsqueeze(0), task, noise.at_evaluation(), g)
        out.append((x, y, sigma, op))
    return out


def restore(model: nn.Module, y: Tensor, op: Operator, sigma: Tensor | None, device: torch.device | str = "cpu"
            ) -> Tensor:
    """x̂ (C, H, W), clipped, of a restoration model for one measurement y (1, ...) of ``op`` (a denoiser
    for op = Identity)."""
    s = None if sigma is None else sigma.to(device)
    if not getattr(model, "takes_operator", False):  # a denoiser: A = I
        return model(y.to(device), s).squeeze(0).float().cpu().clamp_(0, 1)
    return model(y.to(device), s, op=make_operator(op.name, op.params(), device)).squeeze(0).float().cpu().clamp_(0, 1)


@torch.inference_mode()
def evaluate_task(model: nn.Module, files: list[Path], task: TaskConfig, noise: NoiseConfig, gray: bool = True,
                  device: torch.device | str = "cpu", seed: int = 0, with_ssim: bool = True,
                  keep_first: bool = False) -> dict:
    """:func:`evaluate_images` for a restoration task (the convention in the module docstring)."""
    was_training = model.training
    model.eval()
    psnrs, ssims, inputs, secs, cpu, first = [], [], [], [], [], None
    measured = measured_versions([load_image(f, gray=gray) for f in files], task, noise, seed)
    for i, (x, y, sigma, op) in enumerate(measured):
        t0, c0 = time.perf_counter(), time.process_time()
        out = restore(model, y, op, sigma, device)
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        zero_filled = op.A_adjoint(y).squeeze(0).clamp(0, 1)
        psnrs.append(psnr(out, x))
        inputs.append(psnr(zero_filled, x))
        if with_ssim:
            ssims.append(ssim(out, x))
        if keep_first and i == 0:
            first = (zero_filled, out, x)
    model.train(was_training)
    res = _scores(files, psnrs, ssims, inputs, secs, cpu)
    if keep_first:
        res["first"] = first
    return res


def _scores(files: list[Path], psnrs: list[float], ssims: list[float], inputs: list[float], secs: list[float],
            cpu: list[float]) -> dict:
    """The means of an evaluation's per-image lists (NaN for no images) and its per-image PSNR table."""
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"psnr": mean(psnrs), "ssim": mean(ssims), "input_psnr": mean(inputs), "images": len(files),
            "sec_per_image": mean(secs), "cpu_sec_per_image": mean(cpu),
            "per_image": [{"file": f.name, "psnr": p} for f, p in zip(files, psnrs)]}


@torch.inference_mode()
def denoise(model: nn.Module, noisy: Tensor, device: torch.device | str = "cpu", sigma: float | None = None,
            max_memory: int | None = None, clip: bool = True) -> Tensor:
    """Model output for one (C, H, W) image, clipped to [0, 1] (unless not ``clip``); the model is run as given
    (in eval mode for inference: ``load_model`` returns it so). ``sigma`` (0..255) is the known noise
    level, or None: noise-adaptive models then estimate it from the image (blind denoising). An image
    whose forward pass would need more than ``max_memory`` bytes (None: ``tiling.default_max_memory``)
    runs in overlapping tiles, with the same result (``trainers/tiling.py``)."""
    pixels = tile_pixels(model, noisy, device, max_memory)
    if pixels is not None:
        return denoise_tiled(model, noisy, device, sigma, pixels, clip)
    s = None if sigma is None else torch.tensor([float(sigma)], device=device)
    out = model(noisy.unsqueeze(0).to(device), s).squeeze(0).float().cpu()
    return out.clamp_(0.0, 1.0) if clip else out


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
    max_memory: int | None = None,
    convention: str = "shared",
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict:
    """Score ``model`` on ``files`` (in the given order). Returns psnr, ssim, images, sec_per_image,
    per-image lists and, with ``keep_first``, the first (noisy, denoised, clean) triple. The model is told
    the noise level unless ``blind``. ``convention``: ``shared`` or ``dcea`` (module docstring).
    ``progress`` wraps the per-image loop (the CLI's progress bar)."""
    if convention not in EVAL_CONVENTIONS:
        raise InputError(f"--convention: one of {', '.join(EVAL_CONVENTIONS)}, got {convention!r}")
    was_training = model.training
    model.eval()
    clean = [load_image(f, gray=gray) for f in files]
    if convention == "dcea":
        clean = [x / x.max().clamp_min(1e-12) for x in clean]
    noisy = noisy_versions(clean, noise, seed=seed)
    psnrs, ssims, secs, cpu, first = [], [], [], [], None
    for i, (x, y) in enumerate((progress or iter)(zip(clean, noisy))):
        t0, c0 = time.perf_counter(), time.process_time()
        out = denoise(model, y, device, None if blind else noise.eval_sigma, max_memory, convention == "shared")
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU seconds of all threads: robust to other load
        psnrs.append(psnr(out, x))
        if with_ssim:
            ssims.append(ssim(out, x))
        if keep_first and i == 0:
            first = (y.clamp(0, 1), out, x)
    model.train(was_training)
    res = _scores(files, psnrs, ssims, [psnr(y, x) for x, y in zip(clean, noisy)], secs, cpu)
    if keep_first:
        res["first"] = first
    return res


def evaluate_on_task(model: nn.Module, files: list[Path], task: TaskConfig, noise: NoiseConfig, gray: bool = True,
                     device: torch.device | str = "cpu", seed: int = 0, with_ssim: bool = True,
                     keep_first: bool = False, **denoising: Any) -> dict:
    """The one choice between the two conventions: :func:`evaluate_images` for ``task.kind=denoise`` (with
    ``denoising``'s options: blind, max_memory, convention, progress), :func:`evaluate_task` for the others."""
    if task.kind == "denoise":
        return evaluate_images(model, files, noise, gray, device, seed, with_ssim, keep_first, **denoising)
    return evaluate_task(model, files, task, noise, gray, device, seed, with_ssim, keep_first)


def denoise_path(model: nn.Module, pairs: list[tuple[Path, Path]], gray: bool = True, device: str = "cpu",
                 sigma: float | None = None, adapt: Callable[[nn.Module, Tensor], nn.Module] | None = None,
                 max_memory: int | None = None, progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
                 ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Denoise each (input, output) pair of ``datasets.images.plan_outputs`` (which refuses overwriting an
    input, an existing file without --overwrite, and name clashes). Returns (written, failed): an
    unreadable input (corrupt, truncated, empty, a decompression bomb, an unsupported mode) or a non-finite
    result is listed in ``failed`` with a one-line reason and the job goes on; the caller reports them.
    Output folders are created and checked writable before the first image. Each output is written
    atomically (``save_image``). ``sigma``: the known noise level (None: blind). ``adapt(model, noisy) ->
    model``: test-time adaptation per image. ``max_memory``: bytes per forward pass (see :func:`denoise`).
    ``progress`` wraps the per-image loop (the CLI's progress bar)."""
    for folder in {target.parent for _, target in pairs}:
        check_writable(folder)
    model.eval()
    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for f, target in (progress or iter)(pairs):
        try:
            y = load_image(f, gray=gray)
        except InputError as e:
            failed.append((f, str(e)))
            continue
        out = _denoise_any_size(model, y, device, sigma, adapt, max_memory)
        if not torch.isfinite(out).all():
            failed.append((f, f"{f}: the model's output is not finite (NaN/inf); nothing written"))
            continue
        try:
            save_image(out, target)
        except OSError as e:
            raise RunError(f"{target}: cannot write ({e.strerror or e}); the {len(written)} outputs before it "
                           "are complete") from None
        written.append(target)
    return written, failed


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed; InputError when that fails or it is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: output folder is not writable; choose another OUTPUT")


def _min_side(model: nn.Module) -> int:
    """The smallest height/width a model takes: its kernel or patch size (1 when it has neither)."""
    cfg = getattr(model, "config", None)
    return max(1, getattr(cfg, "kernel_size", 1) or 1, getattr(cfg, "patch_size", 1) or 1)


def _denoise_any_size(model: nn.Module, y: Tensor, device: str, sigma: float | None,
                      adapt: Callable[[nn.Module, Tensor], nn.Module] | None,
                      max_memory: int | None = None) -> Tensor:
    """:func:`denoise` for an image of any size: one smaller than the model's kernel or patch is padded
    by edge replication up to it, denoised, and cropped back (a 1×1 image comes back 1×1)."""
    h, w = y.shape[-2:]
    side = _min_side(model)
    pad = (0, max(0, side - w), 0, max(0, side - h))
    yp = torch.nn.functional.pad(y[None], pad, mode="replicate")[0] if any(pad) else y
    m = adapt(model, yp) if adapt is not None else model
    return denoise(m.eval(), yp, device, sigma, max_memory)[..., :h, :w]

"""``sparsefold restore``: run a restoration model (``task.kind`` other than denoise) on a user's measurement,
or on a measurement simulated from a clean image.

The operator A of y = A x + n is the checkpoint's training task (``run.task``), made exact for the file at
hand:

    =========  ===================================  ===============================================
    task       INPUT (a measurement)                what else A needs
    =========  ===================================  ===============================================
    sr         the low-resolution image (h, w)      nothing: x̂ is (f·h, f·w), ``task.factor``/filter
    deblur     the blurred image                    ``--kernel`` (.npy or image, normalized to sum 1);
                                                    a Gaussian task's own kernel without it
    inpaint    the image with holes                 ``--mask`` (.npy or image, non-zero = known pixel)
    csmri      k-space, a complex (H, W) ``.npy``   ``--mask`` (.npy or image) in the same layout:
               in ``torch.fft.fft2(norm="ortho")``'s unshifted layout (models/operators.py:MRI)
    =========  ===================================  ===============================================

``--simulate``: INPUT is a clean image; y is synthesized exactly as ``evaluate`` does (the restoration
convention of :mod:`.evaluate`: one generator seeded ``--seed``, operator then noise), and the scores of
Aᵀy and of x̂ against the clean image are returned with the written paths.

Outputs follow ``denoise``'s rules (``datasets.images.plan_outputs``: never an input, no existing file
without ``--overwrite``, atomic writes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsefold.config import NoiseConfig, TaskConfig
from sparsefold.datasets import load_image, save_image
from sparsefold.datasets.images import read_pixels
from sparsefold.errors import InputError
from sparsefold.models.operators import MRI, Blur, Downsample, Inpainting, Operator, gaussian_kernel
from sparsefold.trainers.evaluate import check_writable, measured_versions, psnr, restore


def read_array(path: str | Path, what: str) -> np.ndarray:
    """A 2-D array from a ``.npy`` (never a pickle) or from an image (gray, in [0, 1])."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read the {what} ({e}); give a .npy array or an image") from None
    else:
        arr = read_pixels(path, gray=True)[..., 0]
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputError(f"{path}: the {what} must be a 2-D array, got shape {arr.shape}")
    return arr


def read_mask(path: str | Path, shape: tuple[int, int]) -> Tensor:
    """A 0/1 mask (1, 1, H, W): non-zero entries of ``path`` are measured; its size must be ``shape``."""
    arr = read_array(path, "mask")
    if arr.shape != shape:
        raise InputError(f"{path}: mask is {arr.shape[0]}×{arr.shape[1]}, the measurement {shape[0]}×{shape[1]}")
    return torch.from_numpy((np.abs(arr) > 0).astype(np.float32))[None, None]


def read_kernel(path: str | Path) -> Tensor:
    """A blur kernel (1, 1, k, k), k odd, non-negative, normalized to sum 1."""
    arr = read_array(path, "kernel").astype(np.float32)
    k = arr.shape[0]
    if arr.shape != (k, k) or k % 2 == 0 or (arr < 0).any() or not np.isfinite(arr).all() or arr.sum() <= 0:
        raise InputError(f"{path}: the kernel must be square, of odd size, finite, non-negative and not all 0; "
                         f"got shape {arr.shape}")
    return torch.from_numpy(arr / arr.sum())[None, None]


def read_measurement(path: Path, task: TaskConfig, gray: bool) -> Tensor:
    """y (1, ...): an image (C, H, W) in [0, 1], or complex k-space (1, 1, H, W) for csmri."""
    if task.kind != "csmri":
        return load_image(path, gray=gray)[None]
    if path.suffix.lower() != ".npy":
        raise InputError(f"{path}: task csmri restores k-space: give a complex (H, W) .npy "
                         "(torch.fft.fft2(x, norm='ortho') layout, unshifted)")
    return torch.from_numpy(read_array(path, "k-space").astype(np.complex64))[None, None]


def measurement_operator(task: TaskConfig, y: Tensor, mask: str | Path | None = None,
                         kernel: str | Path | None = None) -> Operator:
    """The A that produced a user's measurement ``y`` (1, ...): the training task, made exact by the files."""
    size = tuple(y.shape[-2:])
    if task.kind == "sr":
        return Downsample(task.factor, task.filter)
    if task.kind == "deblur":
        if kernel is not None:
            return Blur(read_kernel(kernel), task.boundary)
        if task.kernel == "motion":
            raise InputError("this model was trained on motion blur at random angles: give the image's blur "
                             "kernel with --kernel FILE (.npy or image)")
        return Blur(gaussian_kernel(task.kernel_size, task.blur_sigma), task.boundary)
    if mask is None:
        what = "missing pixels" if task.kind == "inpaint" else "sampled k-space entries"
        raise InputError(f"task {task.kind}: give the mask of {what} with --mask FILE (.npy or image, "
                         "non-zero = measured)")
    m = read_mask(mask, size)  # type: ignore[arg-type]
    return Inpainting(m) if task.kind == "inpaint" else MRI(m)


@dataclass
class Restored:
    """One written output; ``input_psnr``/``psnr`` (Aᵀy and x̂ against the clean image) with --simulate."""

    source: Path
    target: Path
    input_psnr: float | None = None
    psnr: float | None = None


def restore_path(model: nn.Module, pairs: list[tuple[Path, Path]], task: TaskConfig, noise: NoiseConfig,
                 gray: bool = True, simulate: bool = False, seed: int = 0, mask: str | Path | None = None,
                 kernel: str | Path | None = None, measurements: list[Path] | None = None,
                 progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> list[Restored]:
    """Restore each (input, output) pair of ``plan_outputs``; ``measurements``: where to write each Aᵀy
    (clipped), one path per pair. With ``simulate`` the inputs are clean images and y is drawn for all of
    them at once, as ``evaluate`` draws them (so the scores are evaluate's)."""
    for folder in {t.parent for _, t in pairs} | {t.parent for t in measurements or []}:
        check_writable(folder)
    model.eval()
    sources = [f for f, _ in pairs]
    drawn = measured_versions([load_image(f, gray=gray) for f in sources], task, noise, seed) if simulate else None
    done: list[Restored] = []
    with torch.inference_mode():
        for i in (progress or iter)(range(len(pairs))):
            f, target = pairs[i]
            if drawn is not None:
                x, y, sigma, op = drawn[i]
            else:
                x, y, sigma = None, read_measurement(f, task, gray), torch.tensor([noise.eval_sigma])
                op = measurement_operator(task, y, mask, kernel)
            out = restore(model, y, op, sigma)
            if not torch.isfinite(out).all():
                raise InputError(f"{f}: the model's output is not finite (NaN/inf); nothing written for it")
            aty = op.A_adjoint(y).squeeze(0).clamp(0, 1)
            save_image(out, target)
            if measurements:
                save_image(aty, measurements[i])
            scores = (psnr(aty, x), psnr(out, x)) if x is not None else (None, None)
            done.append(Restored(f, target, *scores))
    return done

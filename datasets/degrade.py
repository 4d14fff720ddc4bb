"""Seeded measurements y = A x + n for restoration tasks (``task.kind``), on the fly like the noise.

The operator's randomness (an inpainting mask, a motion kernel's angle, an MRI sampling mask) is drawn from
the same generator as the noise, first the operator then the noise, so a sample is a function of the
stream's seed (seed, rank, worker, epoch) as denoising samples are; the sample carries the exact operator
(its name and ``params()``) so the model receives the A that produced its y. A = I (``denoise``) is
:func:`~sparsefold.datasets.noise.add_noise` unchanged, Poisson and Binomial data included.

Noise on A x is Gaussian with std σ/255 (``noise.sigma``, or a σ drawn from its range); for MRI's complex y it
is circular complex Gaussian, σ/255/√2 on the real and on the imaginary part (E|n|² = (σ/255)²). Only measured
entries are noisy: a missing pixel (inpainting) or an unsampled k-space sample (MRI) is 0 in y.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsefold.config import NoiseConfig, TaskConfig
from sparsefold.datasets.noise import add_noise, sample_sigma
from sparsefold.models.operators import (
    MRI,
    OPERATORS,
    Blur,
    Downsample,
    Identity,
    Inpainting,
    Operator,
    block_mask,
    cartesian_mask,
    gaussian_kernel,
    motion_kernel,
    radial_mask,
    random_mask,
)

# The params() entries that differ per sample (batch dimension first); the others are shared by a batch.
PER_SAMPLE: dict[str, tuple[str, ...]] = {"identity": (), "inpainting": ("mask",), "blur": ("kernel",),
                                          "downsample": (), "mri": ("mask",)}


def task_operator(task: TaskConfig, shape: tuple[int, ...], generator: torch.Generator) -> Operator:
    """The operator of ``task`` for a batch of images of ``shape`` (B, C, H, W), one draw per sample."""
    b, c, h, w = shape
    if task.kind == "denoise":
        return Identity()
    if task.kind == "inpaint":
        if task.mask == "random":
            return Inpainting(random_mask((b, 1, h, w), task.keep, generator))
        return Inpainting(block_mask((b, 1, h, w), min(task.block, h, w), generator, task.holes))
    if task.kind == "deblur":
        if task.kernel == "gaussian":
            kernel = gaussian_kernel(task.kernel_size, task.blur_sigma).expand(b, -1, -1, -1)
        else:
            angles = torch.rand(b, generator=generator) * 180.0
            kernel = torch.cat([motion_kernel(task.kernel_size, task.motion_length, float(a)) for a in angles])
        return Blur(kernel.contiguous(), task.boundary)
    if task.kind == "sr":
        return Downsample(task.factor, task.filter)
    if task.sampling == "cartesian":  # csmri
        return MRI(torch.cat([cartesian_mask(h, w, task.rate, generator) for _ in range(b)]))
    return MRI(radial_mask(h, w, task.rate).expand(b, -1, -1, -1).contiguous())


def degrade(clean: Tensor, task: TaskConfig, noise: NoiseConfig, generator: torch.Generator
            ) -> tuple[Tensor, Tensor, Operator]:
    """``clean`` (B, C, H, W) in [0, 1] -> (y, sigma (B,), operator): y = A x + n in the measurement's shape."""
    if task.kind == "denoise":
        noisy, sigma = add_noise(clean, noise, generator)
        return noisy, sigma, Identity()
    op = task_operator(task, tuple(clean.shape), generator)
    ax = op.A(clean.float())
    sigma = sample_sigma(len(clean), noise, generator)
    std = (sigma / 255.0).view(-1, *([1] * (ax.dim() - 1)))
    if ax.is_complex():
        re, im = torch.randn((2, *ax.shape), generator=generator)
        n = std / math.sqrt(2) * torch.complex(re, im)
    else:
        n = std * torch.randn(ax.shape, generator=generator)
    observed = op.params().get("mask")  # a pixel or a k-space sample not measured has no noise either
    return ax + (n if observed is None else n * observed), sigma, op


def split(op: Operator, n: int) -> list[dict[str, Tensor]]:
    """A batch operator's ``params()`` for each of its ``n`` samples (shared entries in each)."""
    params, per = op.params(), PER_SAMPLE[op.name]
    return [{k: v[i:i + 1] if k in per else v for k, v in params.items()} for i in range(n)]


def join(name: str, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The inverse of :func:`split` over a batch's items: per-sample entries concatenated, shared ones once."""
    if not items:
        return {}
    return {k: torch.cat([p[k] for p in items]) if k in PER_SAMPLE[name] else v for k, v in items[0].items()}


def make_operator(name: str, params: dict[str, Tensor], device: torch.device | str = "cpu") -> Operator:
    """The operator a batch carries (its name and joined params), with its tensors on ``device``."""
    return OPERATORS[name].from_params({k: v.to(device) for k, v in params.items()})

"""Seeded noise synthesis for training and the evaluation convention.

All randomness comes from an explicit :class:`torch.Generator`, so the same generator state gives
the same noisy images on every machine (CPU).  Images are float tensors in [0, 1]; the noisy
output is float32 and is never clipped or rounded (the network sees the raw noisy values).

* ``gaussian``: ``y = x + sigma/255 * n`` with ``n ~ N(0, 1)``; ``sigma`` is fixed, or drawn per
  image from ``U[sigma, sigma_max]`` when ``NoiseConfig.sigma_max`` is set.
* ``poisson``:  ``y = Poisson(peak * x) / peak``.
* ``binomial``: ``y = Binomial(trials, x) / trials``, drawn exactly as a sum of ``trials``
  Bernoulli(x) variables (``torch.distributions`` cannot take a generator).

:func:`gaussian_eval_noise` implements the evaluation convention of ``/work/shared/data/README.md``:
one generator seeded once (seed 0), drawn image after image in the given (sorted-filename) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefold.config import NoiseConfig

__all__ = ["add_noise", "gaussian_eval_noise", "sample_sigma"]


def _as_batch(clean: Tensor) -> tuple[Tensor, bool]:
    """Return ``clean`` as a float32 (B, C, H, W) tensor and whether a batch dim was added."""
    if clean.dim() == 3:
        return clean.float().unsqueeze(0), True
    if clean.dim() == 4:
        return clean.float(), False
    raise ValueError(f"add_noise: expected (C,H,W) or (B,C,H,W), got shape {tuple(clean.shape)}")


def sample_sigma(n: int, cfg: NoiseConfig, generator: torch.Generator) -> Tensor:
    """Per-image Gaussian sigma (0..255 units), shape (n,): fixed, or ``U[sigma, sigma_max]``.

    Draws from ``generator`` only when a range is configured.
    """
    if cfg.sigma_max is None or cfg.sigma_max == cfg.sigma:
        return torch.full((n,), float(cfg.sigma), dtype=torch.float32)
    u = torch.rand(n, generator=generator, dtype=torch.float32)
    return cfg.sigma + (cfg.sigma_max - cfg.sigma) * u


def _binomial(p: Tensor, trials: int, generator: torch.Generator) -> Tensor:
    """Exact Binomial(trials, p) counts as the sum of ``trials`` Bernoulli(p) draws."""
    counts = torch.zeros_like(p)
    for _ in range(trials):
        counts += (torch.rand(p.shape, generator=generator, dtype=p.dtype) < p).to(p.dtype)
    return counts


def add_noise(clean: Tensor, cfg: NoiseConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Synthesize noise on ``clean`` ((B,C,H,W) or (C,H,W), values in [0, 1]).

    Returns ``(noisy, sigma)``: ``noisy`` is float32 with the shape of ``clean``; ``sigma`` has shape
    (B,) (shape (1,) for a (C,H,W) input) in 0..255 units, and is 0 for Poisson/binomial noise.
    """
    x, unbatched = _as_batch(clean)
    b = x.shape[0]
    if cfg.kind == "gaussian":
        sigma = sample_sigma(b, cfg, generator)
        n = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        noisy = x + (sigma / 255.0).view(b, 1, 1, 1) * n
    elif cfg.kind == "poisson":
        sigma = torch.zeros(b, dtype=torch.float32)
        rate = (x.clamp(0.0, 1.0) * cfg.peak).double()  # double: exact counts for large peaks
        noisy = (torch.poisson(rate, generator=generator) / cfg.peak).float()
    elif cfg.kind == "binomial":
        sigma = torch.zeros(b, dtype=torch.float32)
        noisy = _binomial(x.clamp(0.0, 1.0), cfg.trials, generator) / cfg.trials
    else:  # NoiseConfig validates kind; keep a clear error for duck-typed configs
        raise ValueError(f"noise.kind: unknown noise kind {cfg.kind!r}")
    return (noisy.squeeze(0) if unbatched else noisy), sigma


def gaussian_eval_noise(images: Sequence[Tensor], sigma: float, seed: int = 0) -> list[Tensor]:
    """Noisy copies of ``images`` under the evaluation convention.

    One ``torch.Generator`` seeded once with ``seed`` is drawn image after image in the given order
    (pass images sorted by filename); noise is float32 ``sigma/255 * N(0, 1)``, with no clipping or
    rounding.  The result for image ``i`` therefore depends on the shapes of images ``0..i-1``.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for img in images:
        x = img.float()
        out.append(x + (float(sigma) / 255.0) * torch.randn(x.shape, generator=g, dtype=torch.float32))
    return out

"""Blind noise-level estimation and CDLNet's noise-adaptive threshold (both in 0..255 units).

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

from torch import Tensor


def estimate_sigma(y: Tensor) -> Tensor:
    """Blind Gaussian noise level of each image, (B,) in 0..255 units: the median absolute deviation
    of the finest diagonal Haar wavelet band, σ̂ = median|HH| / 0.6745 (Donoho & Johnstone 1994).
    y: (B, C, H, W) in [0, 1]."""
    y = y[..., : y.shape[-2] // 2 * 2, : y.shape[-1] // 2 * 2].float()
    hh = (y[..., 0::2, 0::2] - y[..., 0::2, 1::2] - y[..., 1::2, 0::2] + y[..., 1::2, 1::2]) / 2  # (B, C, H/2, W/2)
    return hh.flatten(1).abs().median(dim=1).values / 0.6745 * 255.0


def noise_adaptive_threshold(tau0: Tensor, tau1: Tensor, sigma: Tensor) -> Tensor:
    """CDLNet's threshold τ = τ₀ + τ₁·σ/255 per image: tau0, tau1 (K,), sigma (B,) -> (B, K, 1, 1)."""
    return (tau0.view(1, -1) + tau1.view(1, -1) * (sigma.view(-1, 1).to(tau0) / 255.0)).view(sigma.shape[0], -1, 1, 1)

r"""Patch operators of the patch-based models (LISTA on patches, Deep K-SVD) and the overcomplete DCT.

R_k extracts the k-th p×p patch (all channels) of an image; every overlapping patch is taken, stride 1,
**without padding** (as the official Deep K-SVD ``nn.Unfold``): an H×W image has L = (H−p+1)(W−p+1)
patches and border pixels are covered by fewer patches, which the normalization below accounts for.

    extraction   R x      = (R_1 x, …, R_L x)                     x (B, C, H, W) -> (B, L, C·p²)   (im2col)
    adjoint      Rᵀ P     = Σ_k R_kᵀ P_k                          (B, L, C·p²) -> (B, C, H, W)     (col2im)
    aggregation  x̂       = Σ_k R_kᵀ(w ⊙ x̂_k) / Σ_k R_kᵀ w        w: a p×p weight mask (ones: averaging)

For any w with positive Σ_k R_kᵀ w, aggregation ∘ extraction is the identity; ``unfold``/``fold`` are an
exact adjoint pair ⟨R x, P⟩ = ⟨x, Rᵀ P⟩ (both checked in tests/test_lista_ksvd.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def extract_patches(x: Tensor, p: int) -> Tensor:
    """R x: all overlapping p×p patches, x (B, C, H, W) -> (B, L, C·p²), channel-major (c, i, j) order."""
    if min(x.shape[-2:]) < p:
        raise ValueError(f"image {tuple(x.shape[-2:])} is smaller than the {p}×{p} patch")
    return F.unfold(x, p).transpose(1, 2)


def fold_patches(patches: Tensor, out_hw: tuple[int, ...], p: int) -> Tensor:
    """Rᵀ P = Σ_k R_kᵀ P_k, the adjoint of :func:`extract_patches`: (B, L, C·p²) -> (B, C, H, W)."""
    return F.fold(patches.transpose(1, 2), out_hw, p)


def aggregate_patches(patches: Tensor, weight: Tensor | None, out_hw: tuple[int, ...]) -> Tensor:
    """x̂ = Σ R_kᵀ(w⊙x̂_k) / Σ R_kᵀ w: patches (B, L, C·p²) -> (B, C, H, W).

    ``weight`` holds p² entries (a p×p mask shared by the channels) or C·p²; None is plain averaging.
    p is the patch size for which (H−p+1)(W−p+1) = L.
    """
    _, n, m = patches.shape
    h, w = out_hw
    p = next((q for q in range(1, min(h, w) + 1) if (h - q + 1) * (w - q + 1) == n), 0)
    if p == 0 or m % (p * p):
        raise ValueError(f"{n} patches of length {m} do not tile an image of size {tuple(out_hw)}")
    c = m // (p * p)
    if weight is None:
        num = fold_patches(patches, out_hw, p)
        den = fold_patches(torch.ones_like(patches[:1]), out_hw, p)  # how many patches cover each pixel
    else:
        wv = weight.reshape(-1)
        wv = wv.repeat(c) if wv.numel() == p * p else wv  # (C·p²,)
        num = fold_patches(patches * wv, out_hw, p)  # Σ R_kᵀ(w⊙x̂_k)
        den = fold_patches(wv.expand(1, n, m), out_hw, p)  # Σ R_kᵀ w: (1, C, H, W)
    return num / den


def overcomplete_dct(p: int, q: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Separable overcomplete 2-D DCT dictionary (p², q²), unit-norm atoms (the official Deep K-SVD
    ``init_dct(p, q)``): 1-D atoms v_k(i) = cos(π i k / q), k = 0..q−1, mean removed for k > 0, unit
    norm; 2-D atoms are their Kronecker products, rows ordered so that atom (k₁, k₂) varies along (i, j)."""
    i = torch.arange(p, dtype=torch.float64)[:, None]
    v = torch.cos(math.pi * i * torch.arange(q, dtype=torch.float64)[None, :] / q)  # (p, q)
    v[:, 1:] -= v[:, 1:].mean(dim=0, keepdim=True)
    v = v / v.norm(dim=0, keepdim=True)
    d = torch.kron(v, v)  # (p², q²): row i·p + j, column k₁·q + k₂
    d = d / d.norm(dim=0, keepdim=True)
    order = torch.arange(p * p).reshape(p, p).T.reshape(-1)  # the official column→row-major reorder
    return d[order].to(dtype)

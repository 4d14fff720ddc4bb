r"""Classical, model-free reconstructions for y = A x + noise: the references that learned restoration models
must beat. Images x are real float tensors (B, C, H, W) in [0, 1]; A is an :class:`~.operators.Operator`.
Nothing is learned and nothing is random: each result is a deterministic function of (y, A, λ, iterations).

    ====================  ==========================================================================
    function              estimate
    ====================  ==========================================================================
    zero_filled           Aᵀ y (masked image; Re F^H(M y) for MRI; upsampled by Aᵀ for Downsample)
    bicubic_upsample      bicubic interpolation of y by the factor, clamped to [0, 1] (the SR baseline)
    fista_tv              argmin ½‖A x − y‖² + λ TV(x) + ι_[0,1](x)
    fista_wavelet         argmin ½‖A x − y‖² + λ ‖D W x‖₁   (W orthonormal Haar, D drops the coarsest LL)
    ====================  ==========================================================================

FISTA (Beck & Teboulle 2009), step 1/L with L = ‖A‖₂² (``op.norm``), from x_0 = z_1 = Aᵀ y, t_1 = 1:

    x_k     = prox_{g/L}( z_k − (1/L) Aᵀ(A z_k − y) )
    t_{k+1} = (1 + √(1 + 4 t_k²)) / 2,     z_{k+1} = x_k + ((t_k − 1)/t_{k+1}) (x_k − x_{k−1})

TV is isotropic, per channel, TV(u) = Σ_pixels |∇u|₂ with forward differences ∇ = (∂_x, ∂_y), zero across the
last column / row (Neumann boundary), so ‖∇‖₂² ≤ 8. Its prox with the box C = [0, 1] has no closed form;
by duality (Beck & Teboulle's fast gradient projection, FGP), with p = (p_x, p_y) in P = {|p|₂ ≤ 1 per pixel}:

    min_{u∈C} ½‖u − v‖² + λ TV(u) = min_{u∈C} max_{p∈P} ½‖u − v‖² + λ ⟨∇u, p⟩,    u(p) = P_C(v − λ ∇ᵀp)

and the dual function is concave in p with a (8λ²)-Lipschitz gradient λ ∇u(p): ``tv_iters`` accelerated
projected ascent steps p ← P_P(r + ∇u(r) / (8λ)) from p = 0, then u(p).

The orthonormal Haar analysis W maps each 2×2 block (a b; c d) to (a+b+c+d, a−b+c−d, a+b−c−d, a−b−c+d)/2,
stored in place (LL top-left, LH top-right, HL bottom-left, HH bottom-right) and repeated on LL ``levels``
times: W is orthogonal, so Wᵀ = W⁻¹ (:func:`haar_inverse`) and prox_{λ‖D W ·‖₁}(v) = Wᵀ S_λ^D(W v),
soft-thresholding every coefficient except the coarsest approximation (the local means stay unbiased).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsefold.errors import check
from sparsefold.models.operators import Operator

Prox = Callable[[Tensor, float], Tensor]  # (v, step) -> prox_{step·g}(v)


def zero_filled(y: Tensor, op: Operator) -> Tensor:
    """Aᵀ y (B, C, H, W): the zero-filled reconstruction."""
    return op.A_adjoint(y)


def bicubic_upsample(y: Tensor, factor: int) -> Tensor:
    """y (B, C, h, w) -> (B, C, factor·h, factor·w) by bicubic interpolation (pixel centres, as the box
    filter's blocks), clamped to [0, 1]."""
    check(factor >= 1, "factor", f"must be >= 1, got {factor}")
    return F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# Total variation and its prox with the box [0, 1].
# --------------------------------------------------------------------------------------------------


def _grad(u: Tensor) -> Tensor:
    """∇u (2, B, C, H, W): forward differences along x (columns) and y (rows), 0 on the last column / row."""
    dx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1))
    dy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return torch.stack((dx, dy))


def _grad_adjoint(p: Tensor) -> Tensor:
    """∇ᵀp (B, C, H, W) = −div p: (∇ᵀp)[j] = p[j−1] − p[j], with p[−1] = p[last] = 0 along each axis."""
    px = F.pad(p[0, ..., :, :-1], (1, 1))  # (B, C, H, W + 1): 0, p[0], .., p[W−2], 0
    py = F.pad(p[1, ..., :-1, :], (0, 0, 1, 1))
    return px[..., :-1] - px[..., 1:] + py[..., :-1, :] - py[..., 1:, :]


def tv(x: Tensor) -> Tensor:
    """Isotropic total variation of each sample, (B,): Σ over channels and pixels of |∇x|₂."""
    return _grad(x).norm(dim=0).sum((1, 2, 3))


def tv_prox(v: Tensor, lam: float, iters: int = 20) -> Tensor:
    """argmin_{u ∈ [0,1]} ½‖u − v‖² + λ TV(u), v (B, C, H, W), by ``iters`` FGP steps on the dual (module
    docstring); λ = 0 gives v clamped to [0, 1]."""
    check(lam >= 0, "lam", f"must be >= 0, got {lam}")
    check(iters >= 1, "tv_iters", f"must be >= 1, got {iters}")
    if lam == 0:
        return v.clamp(0, 1)
    p = r = v.new_zeros(2, *v.shape)  # dual variable and its extrapolation
    t = 1.0
    for _ in range(iters):
        q = r + _grad((v - lam * _grad_adjoint(r)).clamp(0, 1)) / (8 * lam)  # ascent step 1/(8λ²) on λ∇u
        p_next = q / q.norm(dim=0, keepdim=True).clamp(min=1)  # projection onto P
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        r = p_next + ((t - 1) / t_next) * (p_next - p)
        p, t = p_next, t_next
    return (v - lam * _grad_adjoint(p)).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# Orthonormal multi-level 2-D Haar transform, coefficients in place (same shape as the image).
# --------------------------------------------------------------------------------------------------


def _check_levels(shape: tuple[int, ...], levels: int) -> None:
    check(levels >= 1, "levels", f"must be >= 1, got {levels}")
    h, w = shape[-2:]
    check(h % 2**levels == 0 and w % 2**levels == 0, "levels",
          f"image size {(h, w)} must be divisible by 2**levels = {2**levels}")


def _paste(block: Tensor, x: Tensor) -> Tensor:
    """x with its top-left corner replaced by ``block`` (no in-place write)."""
    h, w = block.shape[-2:]
    return torch.cat((torch.cat((block, x[..., :h, w:]), -1), x[..., h:, :]), -2)


def _haar_step(x: Tensor) -> Tensor:
    """One level: (…, 2h, 2w) -> [[LL, LH], [HL, HH]] (…, 2h, 2w), each quarter (…, h, w)."""
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    ll, lh, hl, hh = (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2
    return torch.cat((torch.cat((ll, lh), -1), torch.cat((hl, hh), -1)), -2)


def _haar_step_inverse(z: Tensor) -> Tensor:
    """Inverse (= transpose) of :func:`_haar_step`: the four quarters back into interleaved 2×2 blocks."""
    h, w = z.shape[-2] // 2, z.shape[-1] // 2
    ll, lh, hl, hh = z[..., :h, :w], z[..., :h, w:], z[..., h:, :w], z[..., h:, w:]
    a, b = (ll + lh + hl + hh) / 2, (ll - lh + hl - hh) / 2
    c, d = (ll + lh - hl - hh) / 2, (ll - lh - hl + hh) / 2
    top = torch.stack((a, b), -1).reshape(*a.shape[:-1], 2 * w)  # rows 0::2, columns interleaved
    bottom = torch.stack((c, d), -1).reshape(*c.shape[:-1], 2 * w)
    return torch.stack((top, bottom), -2).reshape(*a.shape[:-2], 2 * h, 2 * w)


def haar(x: Tensor, levels: int) -> Tensor:
    """W x: orthonormal Haar analysis of x (…, H, W), ``levels`` levels, H and W divisible by 2**levels; the
    coarsest approximation is the top-left (H/2**levels, W/2**levels) block."""
    _check_levels(tuple(x.shape), levels)
    h, w = x.shape[-2:]
    for level in range(levels):
        x = _paste(_haar_step(x[..., : h >> level, : w >> level]), x)
    return x


def haar_inverse(z: Tensor, levels: int) -> Tensor:
    """W⁻¹ z = Wᵀ z: synthesis from the coefficients of :func:`haar` (exact inverse and adjoint)."""
    _check_levels(tuple(z.shape), levels)
    h, w = z.shape[-2:]
    for level in reversed(range(levels)):
        z = _paste(_haar_step_inverse(z[..., : h >> level, : w >> level]), z)
    return z


def _wavelet_prox(levels: int, lam: float) -> Prox:
    """v -> Wᵀ S_{step·λ}(W v), the coarsest LL block left unthresholded."""
    def prox(v: Tensor, step: float) -> Tensor:
        z = haar(v, levels)
        h, w = v.shape[-2] >> levels, v.shape[-1] >> levels
        shrunk = z - z.clamp(-step * lam, step * lam)  # soft threshold
        return haar_inverse(_paste(z[..., :h, :w], shrunk), levels)
    return prox


# --------------------------------------------------------------------------------------------------
# FISTA.
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _fista(y: Tensor, op: Operator, prox: Prox, iters: int) -> Tensor:
    """FISTA on ½‖A x − y‖² + g(x) from x_0 = Aᵀ y, step 1/‖A‖₂² (module docstring); x (B, C, H, W)."""
    check(iters >= 0, "iters", f"must be >= 0, got {iters}")
    x = op.A_adjoint(y)
    L = op.norm(tuple(x.shape))
    check(L > 0, "op", "‖A‖ = 0: the measurements hold nothing to reconstruct from")
    z, t = x, 1.0
    for _ in range(iters):
        x_next = prox(z - op.A_adjoint(op.A(z) - y) / L, 1 / L)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = x_next + ((t - 1) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return x


def fista_tv(y: Tensor, op: Operator, lam: float, iters: int = 200, tv_iters: int = 20) -> Tensor:
    """argmin_{x ∈ [0,1]} ½‖A x − y‖² + λ TV(x) by FISTA, each prox by ``tv_iters`` FGP steps: x (B, C, H, W)."""
    check(lam >= 0, "lam", f"must be >= 0, got {lam}")
    return _fista(y, op, lambda v, step: tv_prox(v, step * lam, tv_iters), iters)


def fista_wavelet(y: Tensor, op: Operator, lam: float, iters: int = 200, levels: int = 3) -> Tensor:
    """argmin_x ½‖A x − y‖² + λ ‖D W x‖₁ (Haar, ``levels`` levels, the coarsest LL not penalised) by FISTA;
    no box constraint: x (B, C, H, W) may leave [0, 1]."""
    check(lam >= 0, "lam", f"must be >= 0, got {lam}")
    return _fista(y, op, _wavelet_prox(levels, lam), iters)

"""Shared maths of the unfolded models: proximal operators, the strided convolution pair, the power
method and the shift-averaging ("MMSE approximation") of strided convolutional sparse coding.

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Tiling(NamedTuple):
    """How a model may be run on overlapping tiles (``trainers/tiling.py``) with the whole image's result.

    ``halo``: receptive-field radius in pixels, exact (from the layer count and kernel sizes): an output
    pixel depends on no input pixel farther than ``halo`` along either axis, so a tile's output is the whole
    image's wherever it lies ``halo`` or more from the tile's cut edges. ``align``: the period of the model's
    sampling grid (its stride); tile origins must be multiples of it and tile sizes ≡ the image's modulo
    it, so that the strided grid and the size-dependent padding at the image border are the whole image's."""

    halo: int
    align: int


class _SoftThreshold(torch.autograd.Function):
    """S_θ(v) = v − clip(v, −θ⁺, θ⁺) with θ⁺ = max(θ, 0) (a negative threshold means no shrinkage).

    Backward saves only the output: the mask is S ≠ 0 and sign(S) = sign(v) there.
    """

    @staticmethod
    def forward(ctx, v: Tensor, theta: Tensor) -> Tensor:
        th = theta.clamp_min(0)
        out = v - torch.clamp(v, -th, th)  # two memory passes instead of sign·relu(|v|−θ)'s five
        ctx.save_for_backward(out, theta)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        out, theta = ctx.saved_tensors
        grad_v = grad * (out != 0)
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # ∂S/∂θ = −sign(v)·1{|v| > θ} for θ > 0 (sign(S) is 0 elsewhere), 0 for θ < 0;
            # summed over the axes θ was broadcast along.
            grad_theta = -(grad * torch.sign(out)).sum_to_size(theta.shape) * (theta > 0)
        return grad_v, grad_theta


def soft_threshold(v: Tensor, theta: Tensor | float) -> Tensor:
    """S_θ(v) = sign(v)·max(|v| − θ, 0), the proximal operator of θ‖·‖₁ (θ ≥ 0, broadcast to v)."""
    if not isinstance(theta, Tensor):
        theta = torch.tensor(float(theta), dtype=v.dtype, device=v.device)
    return _SoftThreshold.apply(v, theta.to(v.dtype))


# --------------------------------------------------------------------------------------------------
# The strided convolution pair, written as GEMM + im2col / col2im.
#
#   analysis  B: image (N, C, Ph, Pw) -> codes (N, K, h, w),   (Bx)[k, a, b] = Σ_{c,u,v} W[k,c,u,v]·x[c, s·a+u, s·b+v]
#   synthesis A: codes (N, K, h, w)  -> image (N, C, Ph, Pw),  the adjoint of B for the same W.
#
# PyTorch's strided conv_transpose2d runs ~17x below the forward convolution on CPU
# (../shared/notes/cpu-ceilings.md), and both convolutions' backward passes are slow too; one batched
# GEMM plus col2im (F.fold) / im2col (F.unfold) is 2-8x faster for A, and for B's forward+backward
# (measured on the CSCNet shapes). Without autograd, B uses F.conv2d, whose forward is faster.
# --------------------------------------------------------------------------------------------------


def conv_analysis(x: Tensor, weight: Tensor, stride: int, add: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``add + alpha·B x`` for a strided conv with ``weight`` (K, C, k, k); x (N, C, Ph, Pw) -> (N, K, h, w).

    ``add`` (N, K, h, w) is fused into the GEMM (baddbmm), which saves a memory pass per unfolding.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        # Inference: the library's forward convolution is the fastest B (its backward is not, see above).
        out = F.conv2d(x, weight, stride=stride)  # (N, K, h, w)
        if add is None:
            return out if alpha == 1.0 else out * alpha
        return torch.add(add, out, alpha=alpha)
    n, _, ph, pw = x.shape
    k_, kk = weight.shape[0], weight.shape[-1]
    h, w = (ph - kk) // stride + 1, (pw - kk) // stride + 1
    cols = F.unfold(x, kk, stride=stride)  # im2col: (N, C·k², h·w)
    wb = weight.reshape(1, k_, -1).expand(n, -1, -1)  # (N, K, C·k²) view, no copy
    if add is None:
        codes = torch.bmm(wb, cols) if alpha == 1.0 else torch.bmm(wb, cols) * alpha
    else:
        codes = torch.baddbmm(add.reshape(n, k_, h * w), wb, cols, alpha=alpha)  # (N, K, h·w)
    return codes.reshape(n, k_, h, w)


def conv_synthesis(codes: Tensor, weight: Tensor, stride: int, out_hw: tuple[int, int]) -> Tensor:
    """A γ = Bᵀ γ: codes (N, K, h, w) -> image (N, C, Ph, Pw) with Ph = s·(h−1)+k."""
    n, k_, h, w = codes.shape
    wt = weight.reshape(1, k_, -1).transpose(1, 2).expand(n, -1, -1)  # (N, C·k², K) view
    cols = torch.bmm(wt, codes.reshape(n, k_, h * w))  # (N, C·k², h·w)
    return F.fold(cols, out_hw, weight.shape[-1], stride=stride)  # col2im: (N, C, Ph, Pw)


_POWER_CACHE: dict[tuple, float] = {}


def power_method(weight: Tensor, stride: int, size: int = 128, iters: int = 500, seed: int = 0,
                 tol: float = 1e-5) -> float:
    """Largest eigenvalue L = ‖A‖₂² of AᵀA for the strided pair of ``weight``, by power iteration on a
    random code map of a ``size``×``size`` image (CSCNet's conv_power_method uses 512², CDLNet 128²);
    stops when the Rayleigh quotient changes by less than ``tol`` (relative; it converges from below,
    1e-5 puts L within ~0.3 % for random banks) or after ``iters`` iterations. Memoized on the weights'
    bytes: building the same config again (tests, checkpoint loading) does not repeat it."""
    w_cpu = weight.detach().to("cpu", torch.float64).contiguous()
    key = (tuple(w_cpu.shape), stride, size, iters, seed, tol, hashlib.sha1(w_cpu.numpy().tobytes()).hexdigest())
    if key not in _POWER_CACHE:
        _POWER_CACHE[key] = _power_method(w_cpu, stride, size, iters, seed, tol)
    return _POWER_CACHE[key]


@torch.no_grad()
def _power_method(weight: Tensor, stride: int, size: int, iters: int, seed: int, tol: float) -> float:
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = weight.shape[-1]
    h = (size - k) // stride + 1
    out_hw = (stride * (h - 1) + k,) * 2
    z = torch.randn(1, weight.shape[0], h, h, generator=g, dtype=torch.float64)
    w64 = weight.detach().to("cpu", torch.float64)
    lam = 0.0
    for _ in range(iters):
        z = z / z.norm()
        az = conv_analysis(conv_synthesis(z, w64, stride, out_hw), w64, stride)  # AᵀA z
        new = float((z * az).sum())  # Rayleigh quotient
        done = abs(new - lam) <= tol * abs(new)
        lam, z = new, az
        if done:
            break
    return lam


# --------------------------------------------------------------------------------------------------
# Shift-averaging. With stride s the code grid sees only 1/s² of the pixel positions; CSCNet runs the
# network on all s² shifted copies of the (reflect-padded) input and averages the aligned outputs.
# Here the s² shifts are windows of ONE padded image, stacked into the batch dimension, and the
# average is one gather + mean (no per-shift padding, no masks).
# --------------------------------------------------------------------------------------------------


def shift_geometry(h: int, w: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding so that (size + pads − k) is a multiple of s, with a margin of
    s on each side (the official CSCNet calc_pad_sizes)."""
    def pads(n: int) -> tuple[int, int]:
        lead = stride
        trail = (-(n + lead - kernel)) % stride + stride
        return lead, trail

    top, bottom = pads(h)
    left, right = pads(w)
    return top, bottom, left, right


def _pad(x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    mode = "reflect" if max(pads[:2]) < x.shape[-1] and max(pads[2:]) < x.shape[-2] else "replicate"
    return F.pad(x, pads, mode=mode)


def shift_stack(y: Tensor, kernel: int, stride: int) -> Tensor:
    """y (B, C, H, W) -> the s² shifted, padded copies (B·s², C, Ph, Pw), shift index = i·s + j."""
    b, c, h, w = y.shape
    top, bottom, left, right = shift_geometry(h, w, kernel, stride)
    ph, pw = h + top + bottom, w + left + right
    big = _pad(y, (left, right + stride - 1, top, bottom + stride - 1))  # (B, C, Ph+s−1, Pw+s−1)
    # Window (i, j) of `big` equals y padded with (top − i, bottom + i, left − j, right + j).
    win = big.unfold(2, ph, 1).unfold(3, pw, 1)  # (B, C, s, s, Ph, Pw) view, no copy
    return win.permute(0, 2, 3, 1, 4, 5).reshape(b * stride * stride, c, ph, pw)


def shift_average(x: Tensor, h: int, w: int, kernel: int, stride: int) -> Tensor:
    """Inverse of :func:`shift_stack`: crop every shift's output back onto the H×W image and average.

    x (B·s², C, Ph, Pw) -> (B, C, H, W). Shift (i, j) sees pixel (r, c) at (top − i + r, left − j + c).
    """
    s = stride
    top, _, left, _ = shift_geometry(h, w, kernel, stride)
    b = x.shape[0] // (s * s)
    x = x.reshape(b, s, s, x.shape[1], x.shape[2], x.shape[3]).transpose(1, 3).transpose(2, 3)
    # x: (B, C, s, s, Ph, Pw) view
    ar = torch.arange(s, device=x.device)
    rows = (top - ar)[:, None] + torch.arange(h, device=x.device)  # (s, H)
    cols = (left - ar)[:, None] + torch.arange(w, device=x.device)  # (s, W)
    out = x[:, :, ar[:, None, None, None], ar[None, :, None, None],
            rows[:, None, :, None], cols[None, :, None, :]]  # (B, C, s, s, H, W): one gather
    return out.mean(dim=(2, 3))


def estimate_sigma(y: Tensor) -> Tensor:
    """Blind Gaussian noise level of each image, (B,) in 0..255 units: the median absolute deviation
    of the finest diagonal Haar wavelet band, σ̂ = median|HH| / 0.6745 (Donoho & Johnstone 1994).
    y: (B, C, H, W) in [0, 1]."""
    y = y[..., : y.shape[-2] // 2 * 2, : y.shape[-1] // 2 * 2].float()
    hh = (y[..., 0::2, 0::2] - y[..., 0::2, 1::2] - y[..., 1::2, 0::2] + y[..., 1::2, 1::2]) / 2  # (B, C, H/2, W/2)
    return hh.flatten(1).abs().median(dim=1).values / 0.6745 * 255.0


def noise_adaptive_threshold(tau0: Tensor, tau1: Tensor, sigma: Tensor) -> Tensor:
    """CDLNet's threshold τ = τ₀ + τ₁·σ/255 per image: tau0, tau1 (K,), sigma (B,) -> (B, K, 1, 1)."""
    return (tau0.view(1, -1) + tau1.view(1, -1) * (sigma.view(-1, 1).to(tau0) / 255.0)).view(len(sigma), -1, 1, 1)


# --------------------------------------------------------------------------------------------------
# Non-local patch search and in-network aggregation (LIDIA). Patches are p×p with dilation δ; the "patch
# grid" of an H×W image holds every position, G = (H−δ(p−1)) × (W−δ(p−1)), grid index i = row·Gw + col;
# reference (query) patches sit on the sub-grid of step s, (Gh−1)//s+1 × (Gw−1)//s+1 positions.
# --------------------------------------------------------------------------------------------------

_PAD = 1e4  # pad value of the searched image: a candidate patch leaving the grid is ≳ 1e8 away
_FAR = 1e6  # distances above this mark "no candidate" (valid ones are ≤ p²·(2·max|img|)²)


def box_sum(x: Tensor, p: int, dilation: int = 1, stride: int = 1) -> Tensor:
    """Σ_{u,v<p} x[..., s·a+δu, s·b+δv] ('valid', output step s): (..., H, W) -> (..., Gh', Gw'), separable,
    2(p−1) in-place adds (faster on CPU than avg_pool2d or a ones-conv over many channels)."""
    d, s = dilation, stride
    h, w = (x.shape[-2] - d * (p - 1) - 1) // s * s + 1, (x.shape[-1] - d * (p - 1) - 1) // s * s + 1
    rows = x[..., :h:s, :].clone()
    for u in range(1, p):
        rows += x[..., u * d: u * d + h: s, :]
    out = rows[..., :w:s].clone()
    for v in range(1, p):
        out += rows[..., v * d: v * d + w: s]
    return out


@torch.no_grad()
def patch_knn(img: Tensor, p: int, k: int, window: int, dilation: int = 1, stride: int = 1,
              rows_per_chunk: int = 8) -> tuple[Tensor, Tensor]:
    """The k nearest grid patches of every reference patch of ``img`` (N, 1, H, W), by squared L2
    distance, among the grid patches at offsets δ·(dr, dc), |dr|, |dc| ≤ window//2. No gradient.

    Returns (dist, idx), both (N, Q, k) for the Q reference patches, ascending; idx indexes the full
    grid. Entry 0 is the patch itself (distance 0, even under ties); the other k−1 exclude it. With
    fewer than k−1 candidates inside the grid (tiny images) the missing entries repeat the patch itself
    at a distance ≥ 1e6.

    The window's offsets are channels: the shifted copies are a strided view of the padded image, one
    subtract-square and one box sum per chunk of offset rows, then a running top-k.
    """
    n, _, h, w = img.shape
    d, s, r = dilation, stride, window // 2
    gw, side = w - d * (p - 1), 2 * r + 1
    if d > 1 and s % d == 0:  # queries and candidates all sit on the polyphase component (0, 0)
        dist, idx = patch_knn(img[..., ::d, ::d], p, k, window, 1, s // d, rows_per_chunk)
        sub_w = (w + d - 1) // d - (p - 1)  # grid width of the component
        return dist, d * (idx // sub_w * gw + idx % sub_w)
    padded = F.pad(img[:, 0], (r * d,) * 4, value=_PAD)  # (N, H+2rδ, W+2rδ)
    shifts = padded.unfold(1, h, d).unfold(2, w, d)  # (N, side, side, H, W) view: shift (δdr, δdc)
    best_d = best_o = None
    for r0 in range(0, side, rows_per_chunk):
        r1 = min(side, r0 + rows_per_chunk)
        sq = torch.sub(shifts[:, r0:r1], img[:, :, None], out=img.new_empty(n, r1 - r0, side, h, w))
        dist = box_sum(sq.square_().view(n, -1, h, w), p, d, s)  # (N, c·side, Gh', Gw')
        q_hw = dist.shape[-2:]
        dist = dist.view(n, r1 - r0, side, -1)
        if r0 <= r < r1:
            dist[:, r - r0, r] = float("inf")  # the patch itself is prepended below
        o = torch.arange(r0 * side, r1 * side, device=img.device).view(1, -1, 1).expand(n, -1, dist.shape[-1])
        dist = dist.view(n, -1, dist.shape[-1])
        if best_d is not None:
            dist, o = torch.cat([best_d, dist], 1), torch.cat([best_o, o], 1)
        best_d, j = dist.topk(min(k - 1, dist.shape[1]), dim=1, largest=False)  # (N, k−1, Q), sorted
        best_o = o.gather(1, j)
    rows = torch.arange(q_hw[0], device=img.device) * s
    self_idx = (rows[:, None] * gw + torch.arange(q_hw[1], device=img.device) * s).view(1, 1, -1)  # (1, 1, Q)
    idx = self_idx + d * ((best_o // side - r) * gw + best_o % side - r)  # offset id -> grid index
    idx = torch.where(best_d > _FAR, self_idx, idx)  # only when the window holds < k−1 grid patches
    dist = torch.cat([torch.zeros_like(best_d[:, :1]), best_d], 1)
    idx = torch.cat([self_idx.expand(n, 1, -1), idx], 1)
    return dist.transpose(1, 2), idx.transpose(1, 2)


def fold_average(cols: Tensor, out_hw: tuple[int, int], p: int, dilation: int = 1, stride: int = 1,
                 smooth=None) -> Tensor:
    """col2im divided by the coverage count, (N, C·p², L) -> (N, C, H, W): each pixel's average of the
    patch estimates that cover it, exact on constant patches (L: the step-s grid ending on the border).
    ``smooth`` (a linear filter, e.g. a blur) is applied to both sums before the division (a normalized
    convolution; it also fills pixels no patch covers, e.g. odd ones at dilation 2, stride 2)."""
    num = F.fold(cols, out_hw, p, dilation=dilation, stride=stride)
    den = F.fold(cols.new_ones(1, p * p, cols.shape[-1]), out_hw, p, dilation=dilation, stride=stride)
    if smooth is not None:
        num, den = smooth(num), smooth(den)
    return num / den

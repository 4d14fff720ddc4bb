"""The strided convolution pair (analysis B, synthesis A = Bᵀ), the power method for ‖A‖₂², and the
shift-averaging ("MMSE approximation") of strided convolutional sparse coding.

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# The strided convolution pair, written as GEMM + im2col / col2im.
#
#   analysis  B: image (N, C, Ph, Pw) -> codes (N, K, h, w),   (Bx)[k, a, b] = Σ_{c,u,v} W[k,c,u,v]·x[c, s·a+u, s·b+v]
#   synthesis A: codes (N, K, h, w)  -> image (N, C, Ph, Pw),  the adjoint of B for the same W.
#
# PyTorch's strided conv_transpose2d runs ~17x below the forward convolution on CPU (measured on the
# 2-core CI machine kind), and both convolutions' backward passes are slow too; one batched
# GEMM plus col2im (F.fold) / im2col (F.unfold) is 2-8x faster for A, and for B's forward+backward
# (measured on the CSCNet shapes). Without autograd, B uses F.conv2d, whose forward is faster.
# im2col itself is one strided gather (a view of the image copied once), 3x faster than F.unfold on the
# CSCNet shapes (1 thread: 7 vs 21 ms on 256 × 147²); the pair below is exact adjoints, each the other's
# backward, so im2col is never F.unfold's, in forward (B) or backward (of A's col2im).
# --------------------------------------------------------------------------------------------------


def im2col(x: Tensor, kernel: int, stride: int) -> Tensor:
    """x (N, C, Ph, Pw) -> columns (N, C·k², h·w), F.unfold's layout, by one strided gather."""
    n, c, ph, pw = x.shape
    h, w = (ph - kernel) // stride + 1, (pw - kernel) // stride + 1
    sn, sc, sh, sw = x.stride()
    view = x.as_strided((n, c, kernel, kernel, h, w), (sn, sc, sh, sw, stride * sh, stride * sw))
    return view.reshape(n, c * kernel * kernel, h * w)  # the copy


class _Im2col(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: int, stride: int) -> Tensor:
        ctx.geometry = (tuple(x.shape[-2:]), kernel, stride)
        return im2col(x, kernel, stride)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        hw, kernel, stride = ctx.geometry
        return F.fold(grad, hw, kernel, stride=stride), None, None


class _Col2im(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cols: Tensor, hw: tuple[int, int], kernel: int, stride: int) -> Tensor:
        ctx.geometry = (kernel, stride)
        return F.fold(cols, hw, kernel, stride=stride)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        kernel, stride = ctx.geometry
        return im2col(grad, kernel, stride), None, None, None


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
    cols = _Im2col.apply(x, kk, stride)  # (N, C·k², h·w)
    wb = weight.reshape(1, k_, -1).expand(n, -1, -1)  # (N, K, C·k²) view, no copy
    if add is None:
        codes = torch.bmm(wb, cols) if alpha == 1.0 else torch.bmm(wb, cols) * alpha
    else:
        codes = torch.baddbmm(add.reshape(n, k_, h * w), wb, cols, alpha=alpha)  # (N, K, h·w)
    return codes.reshape(n, k_, h, w)


def conv_synthesis(codes: Tensor, weight: Tensor, stride: int, out_hw: tuple[int, ...]) -> Tensor:
    """A γ = Bᵀ γ: codes (N, K, h, w) -> image (N, C, Ph, Pw) with Ph = s·(h−1)+k."""
    n, k_, h, w = codes.shape
    wt = weight.reshape(1, k_, -1).transpose(1, 2).expand(n, -1, -1)  # (N, C·k², K) view
    cols = torch.bmm(wt, codes.reshape(n, k_, h * w))  # (N, C·k², h·w)
    return _Col2im.apply(cols, tuple(out_hw), weight.shape[-1], stride)  # (N, C, Ph, Pw)


_POWER_CACHE: dict[tuple, float] = {}


def value_key(t: Tensor) -> tuple:
    """A memo key for a tensor by its values (shape and the SHA-1 of its float64 bytes), on any device."""
    v = t.detach().to("cpu", torch.float64).contiguous()
    return tuple(v.shape), hashlib.sha1(v.numpy().tobytes()).hexdigest()


def power_method(weight: Tensor, stride: int, size: int = 128, iters: int = 500, seed: int = 0,
                 tol: float = 1e-5) -> float:
    """Largest eigenvalue L = ‖A‖₂² of AᵀA for the strided pair of ``weight``, by power iteration on a
    random code map of a ``size``×``size`` image (CSCNet's conv_power_method uses 512², CDLNet 128²);
    stops when the Rayleigh quotient changes by less than ``tol`` (relative; it converges from below,
    1e-5 puts L within ~0.3 % for random banks) or after ``iters`` iterations. Memoized on the weights'
    bytes: building the same config again (tests, checkpoint loading) does not repeat it."""
    key = (value_key(weight), stride, size, iters, seed, tol)
    if key not in _POWER_CACHE:
        _POWER_CACHE[key] = _power_method(weight, stride, size, iters, seed, tol)
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


def reflect_pad(x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """``F.pad`` by (left, right, top, bottom): reflect, or replicate where a pad is too wide to reflect."""
    mode = "reflect" if max(pads[:2]) < x.shape[-1] and max(pads[2:]) < x.shape[-2] else "replicate"
    return F.pad(x, pads, mode=mode)


def shift_stack(y: Tensor, kernel: int, stride: int) -> Tensor:
    """y (B, C, H, W) -> the s² shifted, padded copies (B·s², C, Ph, Pw), shift index = i·s + j."""
    b, c, h, w = y.shape
    top, bottom, left, right = shift_geometry(h, w, kernel, stride)
    ph, pw = h + top + bottom, w + left + right
    big = reflect_pad(y, (left, right + stride - 1, top, bottom + stride - 1))  # (B, C, Ph+s−1, Pw+s−1)
    # Window (i, j) of `big` equals y padded with (top − i, bottom + i, left − j, right + j). One gather, not
    # Tensor.unfold: the ONNX exporter fixes an unfold's window size to the example's (trainers/export.py).
    ar = torch.arange(stride, device=y.device)
    rows = ar[:, None] + torch.arange(ph, device=y.device)  # (s, Ph)
    cols = ar[:, None] + torch.arange(pw, device=y.device)  # (s, Pw)
    win = big[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (B, C, s, s, Ph, Pw)
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

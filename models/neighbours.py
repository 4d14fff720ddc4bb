"""LIDIA's non-local operators: the k-nearest-patch search and the in-network patch aggregation.

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Non-local patch search and in-network aggregation (LIDIA). Patches are p×p with dilation δ; the "patch
# grid" of an H×W image holds every position, G = (H−δ(p−1)) × (W−δ(p−1)), grid index i = row·Gw + col;
# reference (query) patches sit on the sub-grid of step s, (Gh−1)//s+1 × (Gw−1)//s+1 positions.
# --------------------------------------------------------------------------------------------------

_PAD = 1e4  # pad value of the searched image: a candidate patch leaving the grid is ≳ 1e8 away
_FAR = 1e6  # distances above this mark "no candidate" (valid ones are ≤ p²·(2·max|img|)²)
_TABLE = 1 << 22  # distances per table of the official search (16 MB; official: all, ≈ 3.4 kB per pixel)
_LUMA = (0.2989, 0.5870, 0.1140)  # the official rgb2gray: colour LIDIA searches on the luma


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


def _offset_distances(img: Tensor, p: int, window: int, dilation: int, stride: int,
                      rows_per_chunk: int) -> Iterator[tuple[Tensor, Tensor, torch.Size]]:
    """Per chunk of window rows: the squared distances of the reference patches to the grid patches at
    those offsets and the offsets' ids (row·side + col), both (N, c·side, Q), and the reference grid's
    (Gh', Gw'). The window's offsets are channels: the shifted copies are a strided view of the padded
    image, one subtract-square and one box sum per chunk. The patch itself (offset (0, 0)) is at +inf."""
    n, _, h, w = img.shape
    d, s, r = dilation, stride, window // 2
    side = 2 * r + 1
    padded = F.pad(img[:, 0], (r * d,) * 4, value=_PAD)  # (N, H+2rδ, W+2rδ)
    shifts = padded.unfold(1, h, d).unfold(2, w, d)  # (N, side, side, H, W) view: shift (δdr, δdc)
    for r0 in range(0, side, rows_per_chunk):
        r1 = min(side, r0 + rows_per_chunk)
        sq = torch.sub(shifts[:, r0:r1], img[:, :, None], out=img.new_empty(n, r1 - r0, side, h, w))
        dist = box_sum(sq.square_().view(n, -1, h, w), p, d, s)  # (N, c·side, Gh', Gw')
        q_hw = dist.shape[-2:]
        dist = dist.view(n, r1 - r0, side, -1)
        if r0 <= r < r1:
            dist[:, r - r0, r] = float("inf")  # patch_knn prepends the patch itself
        o = torch.arange(r0 * side, r1 * side, device=img.device).view(1, -1, 1).expand(n, -1, dist.shape[-1])
        yield dist.view(n, -1, dist.shape[-1]), o, q_hw


def _k_smallest(dist: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The min(k, C) smallest entries of ``dist`` (N, C, Q) along C, ascending, and their ``ids``."""
    best, j = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
    return best, ids.gather(1, j)


@torch.no_grad()
def patch_knn(img: Tensor, p: int, k: int, window: int, dilation: int = 1, stride: int = 1,
              rows_per_chunk: int = 8) -> tuple[Tensor, Tensor]:
    """The k nearest grid patches of every reference patch of ``img`` (N, 1, H, W), by squared L2
    distance, among the grid patches at offsets δ·(dr, dc), |dr|, |dc| ≤ window//2. No gradient.

    Returns (dist, idx), both (N, Q, k) for the Q reference patches, ascending; idx indexes the full
    grid. Entry 0 is the patch itself (distance 0, even under ties); the other k−1 exclude it. With
    fewer than k−1 candidates inside the grid (tiny images) the missing entries repeat the patch itself
    at a distance ≥ 1e6.

    The distances come per chunk of offset rows (:func:`_offset_distances`), merged by a running top-k.
    """
    n, w = img.shape[0], img.shape[-1]
    d, s, r = dilation, stride, window // 2
    gw, side = w - d * (p - 1), 2 * r + 1
    if d > 1 and s % d == 0:  # queries and candidates all sit on the polyphase component (0, 0)
        dist, idx = patch_knn(img[..., ::d, ::d], p, k, window, 1, s // d, rows_per_chunk)
        sub_w = (w + d - 1) // d - (p - 1)  # grid width of the component
        return dist, d * (idx // sub_w * gw + idx % sub_w)
    chunks = _offset_distances(img, p, window, d, s, rows_per_chunk)
    dist, o, q_hw = next(chunks)  # the window has side ≥ 1 rows: at least one chunk
    best_d, best_o = _k_smallest(dist, o, k - 1)  # (N, k−1, Q), sorted
    for dist, o, _ in chunks:
        best_d, best_o = _k_smallest(torch.cat([best_d, dist], 1), torch.cat([best_o, o], 1), k - 1)
    rows = torch.arange(q_hw[0], device=img.device) * s
    self_idx = (rows[:, None] * gw + torch.arange(q_hw[1], device=img.device) * s).view(1, 1, -1)  # (1, 1, Q)
    idx = self_idx + d * ((best_o // side - r) * gw + best_o % side - r)  # offset id -> grid index
    idx = torch.where(best_d > _FAR, self_idx, idx)  # only when the window holds < k−1 grid patches
    dist = torch.cat([torch.zeros_like(best_d[:, :1]), best_d], 1)
    idx = torch.cat([self_idx.expand(n, 1, -1), idx], 1)
    return dist.transpose(1, 2), idx.transpose(1, 2)


@torch.no_grad()
def patch_knn_official(padded: Tensor, p: int, k: int, window: int, dilation: int,
                       rows_per_chunk: int = 8) -> tuple[Tensor, Tensor]:
    """:func:`patch_knn` (stride 1) as the official LIDIA computes it (find_nn), bit for bit on CPU, ties
    included. ``padded`` (N, 1, H+2rδ, W+2rδ), r = ⌊window/2⌋: the image with its margin (official: −1),
    where candidates may lie; each of the δ² polyphase components searched at dilation 1; per window
    offset a distance map, the p×p ones-convolution of the squared difference; one k-smallest over the
    offsets in row-major order, the patch itself among them (entry 0: the nearest, i.e. the patch itself
    unless another ties with it). Returns (dist, idx), both (N, Q, k), Q = every grid patch of the image
    inside the margin; idx indexes the grid of ``padded``."""
    n, d, r, side = padded.shape[0], dilation, window // 2, 2 * (window // 2) + 1
    h, w = padded.shape[-2] - 2 * r * d, padded.shape[-1] - 2 * r * d
    gw_pad, ones = padded.shape[-1] - d * (p - 1), padded.new_ones(1, 1, p, p)
    dist = padded.new_empty(n, h - d * (p - 1), w - d * (p - 1), k)
    idx = torch.empty(dist.shape, dtype=torch.long, device=padded.device)
    for a in range(d):
        for b in range(d):
            comp = padded[..., a::d, b::d]  # the component, with its margin r
            ch, cw = comp.shape[-2] - 2 * r, comp.shape[-1] - 2 * r
            y = comp[:, :, None, r:r + ch, r:r + cw]  # (N, 1, 1, ch, cw)
            shifts = comp[:, 0].unfold(1, ch, 1).unfold(2, cw, 1)  # (N, side, side, ch, cw) view
            gw, dc, ic = cw - p + 1, dist[:, a::d, b::d], idx[:, a::d, b::d]  # the component's share (views)
            band = max(1, _TABLE // (gw * side * side))  # reference rows per distance table (convolution
            for t0 in range(0, ch - p + 1, band):  # of row bands: bit-identical to the whole's)
                t1 = min(ch - p + 1, t0 + band)
                top = padded.new_empty(n, t1 - t0, gw, side * side)  # (N, band, Gw_c, offsets)
                for r0 in range(0, side, rows_per_chunk):
                    r1 = min(side, r0 + rows_per_chunk)
                    sq = (shifts[:, r0:r1, :, t0:t1 + p - 1] - y[..., t0:t1 + p - 1, :]).square()
                    sq = F.conv2d(sq.reshape(-1, 1, t1 - t0 + p - 1, cw), ones)  # (N·c·side, 1, band, Gw_c)
                    top[..., r0 * side:r1 * side] = sq.view(n, -1, t1 - t0, gw).permute(0, 2, 3, 1)
                best, o = top.topk(k, dim=3, largest=False, sorted=True)  # (N, band, Gw_c, k)
                t = torch.arange(t0, t1, device=padded.device).view(1, -1, 1, 1)
                u = torch.arange(gw, device=padded.device).view(1, 1, -1, 1)
                dc[:, t0:t1] = best
                ic[:, t0:t1] = (a + d * (t + o // side)) * gw_pad + b + d * (u + o % side)
    return dist.view(n, -1, k), idx.view(n, -1, k)


def search_neighbours(img: Tensor, p: int, k: int, window: int, dilation: int, stride: int,
                      official: bool) -> tuple[Tensor, Tensor, Tensor]:
    """LIDIA's Eq. 1 on ũ_s (N, C, H, W): :func:`patch_knn` on it (colour: on its luma), or with ``official``
    :func:`patch_knn_official` on it with a −1 margin. Returns (dist, idx, the image whose grid idx indexes)."""
    if official:
        img = F.pad(img, (dilation * (window // 2),) * 4, value=-1.0)
    search = img if img.shape[1] == 1 else F.conv2d(img, img.new_tensor(_LUMA).view(1, 3, 1, 1))
    if official:
        return (*patch_knn_official(search, p, k, window, dilation), img)
    return (*patch_knn(search, p, k, window, dilation, stride), img)


def fold_average(cols: Tensor, out_hw: tuple[int, ...], p: int, dilation: int = 1, stride: int = 1,
                 smooth: Callable[[Tensor], Tensor] | None = None, smooth_after: bool = False) -> Tensor:
    """col2im divided by the coverage count, (N, C·p², L) -> (N, C, H, W): each pixel's average of the
    patch estimates that cover it, exact on constant patches (L: the step-s grid ending on the border).
    ``smooth`` (a linear filter, e.g. a blur) is applied to both sums before the division (a normalized
    convolution; it also fills pixels no patch covers, e.g. odd ones at dilation 2, stride 2), or with
    ``smooth_after`` to the average (the official LIDIA's order; needs every pixel covered)."""
    num = F.fold(cols, out_hw, p, dilation=dilation, stride=stride)
    den = F.fold(cols.new_ones(1, p * p, cols.shape[-1]), out_hw, p, dilation=dilation, stride=stride)
    if smooth is not None and smooth_after:
        return smooth(num / den)
    if smooth is not None:
        num, den = smooth(num), smooth(den)
    return num / den

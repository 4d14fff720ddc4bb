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


def fold_average(cols: Tensor, out_hw: tuple[int, ...], p: int, dilation: int = 1, stride: int = 1,
                 smooth: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """col2im divided by the coverage count, (N, C·p², L) -> (N, C, H, W): each pixel's average of the
    patch estimates that cover it, exact on constant patches (L: the step-s grid ending on the border).
    ``smooth`` (a linear filter, e.g. a blur) is applied to both sums before the division (a normalized
    convolution; it also fills pixels no patch covers, e.g. odd ones at dilation 2, stride 2)."""
    num = F.fold(cols, out_hw, p, dilation=dilation, stride=stride)
    den = F.fold(cols.new_ones(1, p * p, cols.shape[-1]), out_hw, p, dilation=dilation, stride=stride)
    if smooth is not None:
        num, den = smooth(num), smooth(den)
    return num / den

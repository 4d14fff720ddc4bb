"""Tiled inference: an image of any size in bounded memory, with the whole image's result.

Why. A forward pass holds several full-size feature maps at once (the bundled CSCNet: 64 code channels per
pixel for each of γ_t, B(Aγ_t − y), the next v, …): ≈ 1.5 kB of live tensors per pixel, ≈ 3 GB peak RSS
for one megapixel. :func:`denoise_tiled` cuts the image into overlapping tiles, runs each through the model
exactly as it would run a whole image, and takes every output pixel from the one tile whose *core* holds it
(centre-crop stitching: no blending, no seams).

Why the result is the whole image's (up to float summation order, ~1e-6; tests/test_tiling.py: ≤ 1e-4):

* Overlap = the exact receptive-field radius, ``model.tiling.halo`` (``models/tiling.Tiling``; each model counts
  it from its layers: CSCNet and DCEA T·(k−1), CDLNet depth·(P−1), DnCNN depth, LISTA and Deep K-SVD p−1,
  LIDIA 7r + 2⌊window/2⌋ + 2 with r = (p−1)/2; bundled: 72, 60, 120, 17, 7, 7, 51 px). A tile is its core
  plus ``halo`` pixels of real context on each side cut out of the image. What the model computes from its
  own padding at a cut edge reaches at most ``halo`` pixels inward and is discarded. A side on the image
  border is not cut: the tile contains the border and the model pads it as for the whole image (reflect,
  zero, or none). The exact radius rather than an "influence below 1e-5" distance, because it holds for
  every input and every weight. Measured (max abs tiled − whole, BSD68 strips, halo/2): the unfolded
  convolutional models damp fast, CSCNet 1.8e-7, DCEA-C 6e-8, CDLNet 1.2e-7 (5e-5, 1e-5 and 6e-6 at
  halo/4), so for *these* weights half the halo would do (≈ 25 % less work on ~600² tiles); the others do
  not, LIDIA 5e-4, DnCNN 2e-2, LISTA / Deep K-SVD 1e-2 at about halo/2. A user's checkpoint may damp slower.
* Grid alignment: strided models (CSCNet, DCEA, CDLNet with s > 1, LIDIA's reference grid) see the image on
  a grid of period ``tiling.align``. Tile origins are multiples of it and tile sizes ≡ the image's modulo
  it, so every tile's grid, and the border padding that depends on the size modulo the stride (CSCNet's
  trailing pad), are the whole image's; CSCNet's shift-averaging then averages the very same s² shifts.
* Image-level statistics are computed once on the whole image and passed to every tile: σ (``sigma=None``,
  blind: noise-adaptive models would estimate it per input by the MAD of the finest Haar band, here it is
  estimated once, ``estimate_sigma`` of the whole image) and the image mean that CDLNet, DCEA and LIDIA
  centre on (their ``forward``'s ``mean``).

Memory model. Peak bytes of one forward ≈ ``fixed + per_pixel·pixels``: a line through two probe forwards
of a meta-device copy of the model on 512² and 1024² images (shapes only, no arithmetic: 0.1–2 s; the first
meta op of a process imports sympy), during which a TorchDispatchMode sums the bytes of every live tensor
storage (each op's outputs, counted until garbage-collected). Measured rather than a formula per model, so
any model or config is covered (LIDIA's is not even linear: 15 kB/px at 256², 6.8 kB/px at 1024²); cached
per model. Not RSS: tracemalloc does not see torch's allocations, and an in-process RSS delta is hidden by
heap pages an earlier step freed but kept (``runtime.configure_cpu_allocator``). The tile is the largest
with ``SLACK·(fixed + per_pixel·pixels) ≤ max_memory``; ``SLACK`` = 2 covers what the dispatcher does not
see (op workspaces such as oneDNN's blocked-layout copies, heap fragmentation): measured at 1 MP, peak
RSS − baseline over the tracked bytes was 1.2 (CSCNet tiles), 1.7 (CSCNet whole), 2.0 (DnCNN whole); see
``benchmarks/bench_memory.py``. An image that fits takes the unchanged whole-image path. ``max_memory`` bounds the model's working
set; the process adds its baseline (Python, torch, weights: ≈ 0.3 GB) and the image itself (input and
output, ≈ 8 bytes per pixel and channel). Default: half the available RAM on CPU, half the free device
memory on a GPU. Not less: a tile recomputes its halo (CSCNet as published: 120 px on each side), so small
tiles multiply the work (a fixed 1 GiB cut a 481×321 BSD68 image into 6 tiles, ≈ 7× the pixels: 115 CPU-s
instead of ≈ 7 for the whole image).
"""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sparsefold.errors import InputError
from sparsefold.models.contract import Tiled
from sparsefold.models.noise_level import estimate_sigma
from sparsefold.models.tiling import Tiling

GiB = 1 << 30
SLACK = 2.0  # peak RSS / tracked tensor bytes allowed for (see the module docstring)
PROBE_SIDES = (512, 1024)  # probe image sides of the memory model (the tile sizes that matter)
WHOLE_PIXELS = 128 * 128  # images up to this size always run whole, without a probe
MIN_CORE = 32  # smallest tile core (pixels per side) worth the overlap


class Footprint(NamedTuple):
    """Live tensor bytes of one forward ≈ fixed + per_pixel · pixels (before ``SLACK``)."""

    fixed: float
    per_pixel: float


class Tile(NamedTuple):
    """One tile: the input window (image coordinates) and its core (image coordinates) to keep."""

    rows: slice
    cols: slice
    core_rows: slice
    core_cols: slice


def _axis_cuts(n: int, core: int, halo: int, align: int) -> list[tuple[slice, slice]]:
    """Cut an axis of length n into balanced cores of at most ``core`` pixels (multiples of ``align``),
    each with its input window: the core ± ``halo`` clipped to [0, n], its start a multiple of ``align``
    and its stop ≡ n (mod align). Returns (window, core) pairs."""
    count = math.ceil(n / core)
    step = math.ceil(n / count / align) * align
    cuts = []
    for a in range(0, n, step):
        b = min(n, a + step)
        lo = max(0, (a - halo) // align * align)
        hi = b + halo
        hi = n if hi >= n else min(n, hi + (n - hi) % align)
        cuts.append((slice(lo, hi), slice(a, b)))
    return cuts


def tile_grid(h: int, w: int, spec: Tiling, max_pixels: int) -> list[Tile]:
    """Tiles covering an h×w image whose input windows hold at most ``max_pixels`` pixels (about: the
    alignment may add a few rows). A side that fits whole is not cut. InputError when no tile with a core
    of ``MIN_CORE`` pixels fits."""
    halo, align = spec
    min_core = math.ceil(MIN_CORE / align) * align
    short = min(h, w, math.isqrt(max(max_pixels, 0)))  # square windows, or strips along a short side
    long = min(max(h, w), max_pixels // max(short, 1))
    th, tw = (short, long) if h <= w else (long, short)
    core_w = w if tw == w else (tw - 2 * halo - 2 * (align - 1)) // align * align
    core_h = h if th == h else (th - 2 * halo - 2 * (align - 1)) // align * align
    if min(core_w, core_h) < min(min_core, h, w):
        need = (2 * halo + 2 * (align - 1) + min_core) ** 2
        raise InputError(f"memory budget too small: a tile needs >= {need} pixels of working memory here, "
                         f"got {max_pixels}; raise --max-memory")
    return [Tile(r, c, cr, cc) for r, cr in _axis_cuts(h, core_h, halo, align)
            for c, cc in _axis_cuts(w, core_w, halo, align)]


# ---------------------------------------------------------------------------------------- memory model
class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive while the mode is on: every op's outputs, each storage
    counted once and until it is garbage-collected (tensors made before the mode are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [r for r in self.live if r.expired()]:
            del self.live[ref]
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(self.live.values()))
        return out


@torch.inference_mode()
def _live_peak(model: nn.Module, channels: int, side: int) -> int:
    """Peak live tensor bytes of a forward of the meta-device ``model`` on a side×side image (shapes only,
    nothing computed), plus the input and output copies."""
    y = torch.empty(1, channels, side, side, device="meta")
    with _LiveBytes() as mode:
        model(y, torch.full((1,), 25.0, device="meta"))
    return mode.peak + 2 * y.nbytes


_FOOTPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def footprint(model: nn.Module, channels: int = 1) -> Footprint:
    """The memory model of ``model``: a line through its live tensor bytes on ``PROBE_SIDES`` images, run
    on a meta-device copy (no arithmetic: 0.1-2 s; the first meta op of a process imports sympy). Cached
    per model, channels and ``tiling`` (which holds the active depth)."""
    key = (channels, model.tiling)
    cache = _FOOTPRINTS.setdefault(model, {})
    if key not in cache:
        meta = copy.deepcopy(model).to("meta").eval()
        (p1, m1), (p2, m2) = [(s * s, _live_peak(meta, channels, s)) for s in PROBE_SIDES]
        slope = (m2 - m1) / (p2 - p1) if m2 > m1 else m2 / p2
        cache[key] = Footprint(max(0.0, m2 - slope * p2), slope)
    return cache[key]


def default_max_memory(device: torch.device | str = "cpu") -> int:
    """Half the free memory of a GPU, or half the available RAM on CPU (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 2 * GiB
    return avail // 2


def tile_pixels(model: nn.Module, noisy: Tensor, device: torch.device | str = "cpu",
                max_memory: int | None = None) -> int | None:
    """The most input pixels per tile within ``max_memory`` bytes (None: :func:`default_max_memory`), or
    None when the whole (C, H, W) image fits (or the model has no ``tiling``): run it whole."""
    h, w = noisy.shape[-2:]
    if not isinstance(model, Tiled) or h * w <= WHOLE_PIXELS:
        return None
    budget = default_max_memory(device) if max_memory is None else max_memory
    fp = footprint(model, noisy.shape[0])
    pixels = int((budget / SLACK - fp.fixed) / fp.per_pixel)
    return None if pixels >= h * w else max(pixels, 0)


# ---------------------------------------------------------------------------------------- inference
def _takes_mean(model: nn.Module) -> bool:
    """Whether ``forward`` takes the image ``mean`` (models that centre on it: CDLNet, DCEA, LIDIA)."""
    return "mean" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def denoise_tiled(model: nn.Module, noisy: Tensor, device: torch.device | str, sigma: float | None,
                  max_pixels: int, clip: bool = True) -> Tensor:
    """Model output for one (C, H, W) image, clipped to [0, 1] (if ``clip``), in tiles of at most ``max_pixels``
    input pixels (see the module docstring); equal to the whole-image output. σ (0..255) is the known
    noise level or None (blind: estimated once on the whole image)."""
    y = noisy.unsqueeze(0)
    s = (estimate_sigma(y) if sigma is None else torch.tensor([float(sigma)])).to(device)
    extra = {"mean": y.mean(dim=(-2, -1), keepdim=True).to(device)} if _takes_mean(model) else {}
    out = torch.empty(noisy.shape, dtype=torch.float32)
    h, w = noisy.shape[-2:]
    spec = cast(Tiled, model).tiling  # the caller tiles only a Tiled model
    for t in tile_grid(h, w, spec, max_pixels):
        x = model(y[..., t.rows, t.cols].to(device).contiguous(), s, **extra)[0]
        r0, c0 = t.core_rows.start - t.rows.start, t.core_cols.start - t.cols.start
        rows, cols = t.core_rows.stop - t.core_rows.start, t.core_cols.stop - t.core_cols.start
        out[:, t.core_rows, t.core_cols] = x[:, r0:r0 + rows, c0:c0 + cols].float().cpu()
    return out.clamp_(0.0, 1.0) if clip else out

r"""Linear forward operators of image restoration, y = A x + noise, with exact adjoints Aᵀ and ‖A‖₂².

Data synthesis makes y from a clean x; an unfolded model runs, e.g., ISTA x ← x − (1/L)·Aᵀ(A x − y) with
L = ‖A‖₂² (:meth:`Operator.norm`). Images x are real float tensors (B, C, H, W); every parameter is a tensor
held by the operator, with a batch dimension of B (one per sample) or 1 (shared), cast to x's dtype and
device on use, so A and Aᵀ are differentiable in x and in the parameters. ``params()`` / ``from_params``
carry the exact operator alongside a data sample.

    ==============  =================================  ====================  ===========================
    operator        A x                                y                     ‖A‖₂²
    ==============  =================================  ====================  ===========================
    Identity        x                                  (B, C, H, W)          1
    Inpainting      M ⊙ x                              (B, C, H, W)          1 (0 if M = 0)
    Blur circular   k ⊛ x  (FFT, periodic)             (B, C, H, W)          max_ω |k̂(ω)|²
    Blur reflect    k ∗ P x  (P: reflect padding)      (B, C, H, W)          power method (memoized)
    Downsample      S_f (h ∗ W x)  (W: periodic wrap)  (B, C, H/f, W/f)      max alias sum, see below
    MRI             M ⊙ F x  (F: orthonormal FFT)      (B, 1, H, W) complex  max (M + M̃)/2, see MRI
    ==============  =================================  ====================  ===========================

Padding is a gather x[rows][:, cols] by an index map, so its adjoint is the scatter-add by the same map:
Pᵀ folds the padded border back onto the pixels it copied (plain ``conv_transpose2d`` alone would drop it).
Blur is a true convolution (kernel flipped for ``conv2d``) centred on tap k//2, for both boundaries.

Downsample's A = S_f H (H circulant with the filter, S_f keeps every f-th sample): S_f H Hᵀ S_fᵀ is circulant
on the coarse grid, with eigenvalues (1/f²)·Σ_{r,s<f} |ĥ(m + r·H/f, n + s·W/f)|² (the aliases of |ĥ|²).

For a batch, A is block-diagonal over the samples: ‖A‖₂² is the max over the samples, a safe step 1/L for each.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsefold.errors import check
from sparsefold.models.convops import value_key

Shape = tuple[int, ...]
BOUNDARIES = ("circular", "reflect")


def power_norm(op: Operator, shape: Shape, iters: int = 200, seed: int = 0) -> float:
    """‖A‖₂² = λ_max(AᵀA): the Rayleigh quotient ⟨x, AᵀA x⟩ after ``iters`` power iterations from a seeded
    Gaussian x of ``shape`` (float64, CPU). It converges from below."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lam = 0.0
    with torch.no_grad():
        for _ in range(iters):
            size = x.norm()
            if size == 0:
                return 0.0
            x = x / size
            z = op.AtA(x)
            lam, x = float((x * z).sum()), z
    return lam


# ‖A‖₂² of reflect blurs, by (kernel bytes, shape): a batch with one kernel (gaussian) or a test set of few
# image sizes computes it once. Bounded: motion kernels differ per batch.
_REFLECT_NORMS: dict[tuple, float] = {}
REFLECT_NORMS_KEPT = 256


def _gather(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x (..., H, W) -> x[..., rows, cols] (..., len(rows), len(cols)): padding by an index map."""
    return x.index_select(-2, rows).index_select(-1, cols)


def _scatter(y: Tensor, rows: Tensor, cols: Tensor, h: int, w: int) -> Tensor:
    """Adjoint of :func:`_gather`: y (..., len(rows), len(cols)) added back onto (..., h, w)."""
    y = y.new_zeros(*y.shape[:-2], h, y.shape[-1]).index_add(-2, rows, y)
    return y.new_zeros(*y.shape[:-1], w).index_add(-1, cols, y)


def _reflect(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of [−before, n + after) reflected into [0, n) without repeating the edge (F.pad's 'reflect')."""
    i = torch.arange(-before, n + after, device=device).abs()
    return (n - 1) - (n - 1 - i).abs()


def _wrap(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of [−before, n + after) wrapped into [0, n) (periodic boundary)."""
    return torch.arange(-before, n + after, device=device) % n


def _depthwise(x: Tensor, weight: Tensor, stride: int, transpose: bool = False) -> Tensor:
    """Each channel of x (B, C, h, w) correlated with its sample's filter weight (B or 1, 1, k, k), stride s,
    or (``transpose``) the adjoint: zero-upsampling by s then the transposed filter."""
    b, c, k = x.shape[0], x.shape[1], weight.shape[-1]
    wt = weight.expand(b, c, k, k).reshape(b * c, 1, k, k)
    conv = F.conv_transpose2d if transpose else F.conv2d
    out = conv(x.reshape(1, b * c, *x.shape[-2:]), wt, stride=stride, groups=b * c)
    return out.reshape(b, c, *out.shape[-2:])


def _check_binary(mask: Tensor, one_channel: bool) -> None:
    check(mask.dim() == 4 and (mask.shape[1] == 1 or not one_channel), "mask",
          f"must be (B or 1, {'1' if one_channel else '1 or C'}, H, W), got shape {tuple(mask.shape)}")
    check(bool(((mask == 0) | (mask == 1)).all()), "mask", "must hold only 0 and 1")


class Operator:
    """y = A x for images x (B, C, H, W); subclasses define A, Aᵀ and, where known, ‖A‖₂² analytically."""

    name: ClassVar[str] = "operator"

    def A(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def A_adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def AtA(self, x: Tensor) -> Tensor:
        return self.A_adjoint(self.A(x))

    def norm(self, x_shape: Shape) -> float:
        """‖A‖₂², the largest eigenvalue of AᵀA, for images of ``x_shape`` (here by the power method)."""
        self._check(x_shape)
        return power_norm(self, tuple(x_shape))

    def measurement_shape(self, x_shape: Shape) -> Shape:
        self._check(x_shape)
        return tuple(x_shape)

    def params(self) -> dict[str, Tensor]:
        return {}

    @classmethod
    def from_params(cls, params: dict[str, Tensor]) -> Operator:
        return cls(**params)

    def _check(self, x_shape: Shape) -> None:
        check(len(x_shape) == 4, "x", f"must be (B, C, H, W), got shape {tuple(x_shape)}")

    def _check_batch(self, p: Tensor, field: str, x_shape: Shape) -> None:
        check(p.shape[0] in (1, x_shape[0]), field, f"batch {p.shape[0]} must be 1 or B = {x_shape[0]}")


class Identity(Operator):
    """A = I (denoising)."""

    name = "identity"

    def A(self, x: Tensor) -> Tensor:
        return x

    def A_adjoint(self, y: Tensor) -> Tensor:
        return y

    def norm(self, x_shape: Shape) -> float:
        self._check(x_shape)
        return 1.0


class Inpainting(Operator):
    """A x = M ⊙ x with a 0/1 mask M (B or 1, 1 or C, H, W); Aᵀ = A, AᵀA = A (a projection)."""

    name = "inpainting"

    def __init__(self, mask: Tensor) -> None:
        _check_binary(mask, one_channel=False)
        self.mask = mask

    def _check(self, x_shape: Shape) -> None:
        super()._check(x_shape)
        self._check_batch(self.mask, "mask", x_shape)
        check(self.mask.shape[1] in (1, x_shape[1]) and self.mask.shape[2:] == x_shape[2:], "mask",
              f"shape {tuple(self.mask.shape)} does not fit images {tuple(x_shape)}")

    def A(self, x: Tensor) -> Tensor:
        self._check(x.shape)
        return x * self.mask.to(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.A(y)

    def norm(self, x_shape: Shape) -> float:
        self._check(x_shape)
        return float(bool(self.mask.any()))

    def params(self) -> dict[str, Tensor]:
        return {"mask": self.mask}


class Blur(Operator):
    """A x = k ∗ x per channel, kernel (B or 1, 1, k, k), ``boundary`` "circular" (FFT) or "reflect"."""

    name = "blur"

    def __init__(self, kernel: Tensor, boundary: str = "circular") -> None:
        check(kernel.dim() == 4 and kernel.shape[1] == 1 and kernel.shape[2] == kernel.shape[3], "kernel",
              f"must be (B or 1, 1, k, k), got shape {tuple(kernel.shape)}")
        check(boundary in BOUNDARIES, "boundary", f"must be one of {BOUNDARIES}, got {boundary!r}")
        self.kernel, self.boundary = kernel, boundary

    def _check(self, x_shape: Shape) -> None:
        super()._check(x_shape)
        self._check_batch(self.kernel, "kernel", x_shape)
        k = self.kernel.shape[-1]
        check(k <= min(x_shape[-2:]), "kernel", f"size {k} exceeds the image size {tuple(x_shape[-2:])}")

    def _spectrum(self, h: int, w: int, like: Tensor) -> Tensor:
        """k̂ (B or 1, 1, H, W//2+1): the kernel zero-padded to H×W, tap k//2 rolled onto (0, 0)."""
        k = self.kernel.to(like)
        c = k.shape[-1] // 2
        padded = F.pad(k, (0, w - k.shape[-1], 0, h - k.shape[-1])).roll((-c, -c), (-2, -1))
        return torch.fft.rfft2(padded)

    def _index(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        k = self.kernel.shape[-1]
        before, after = k - 1 - k // 2, k // 2  # y[n] = Σ_u k[u]·x[n − u + k//2]
        return _reflect(h, before, after, device), _reflect(w, before, after, device)

    def A(self, x: Tensor) -> Tensor:
        self._check(x.shape)
        h, w = x.shape[-2:]
        if self.boundary == "circular":
            return torch.fft.irfft2(torch.fft.rfft2(x) * self._spectrum(h, w, x), s=(h, w))
        rows, cols = self._index(h, w, x.device)
        return _depthwise(_gather(x, rows, cols), self.kernel.flip(-2, -1).to(x), 1)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check(y.shape)
        h, w = y.shape[-2:]
        if self.boundary == "circular":
            return torch.fft.irfft2(torch.fft.rfft2(y) * self._spectrum(h, w, y).conj(), s=(h, w))
        rows, cols = self._index(h, w, y.device)
        return _scatter(_depthwise(y, self.kernel.flip(-2, -1).to(y), 1, transpose=True), rows, cols, h, w)

    def norm(self, x_shape: Shape) -> float:
        """Circular: max |k̂|² (exact). Reflect: the power method (200 iterations: 3 CPU-s for a batch of 8 × 64²,
        39 for one 321×481 image), memoized: a model calls it on every forward."""
        self._check(x_shape)
        if self.boundary == "reflect":
            key = (value_key(self.kernel), tuple(x_shape))
            if key not in _REFLECT_NORMS:
                if len(_REFLECT_NORMS) >= REFLECT_NORMS_KEPT:
                    del _REFLECT_NORMS[next(iter(_REFLECT_NORMS))]  # the oldest
                _REFLECT_NORMS[key] = power_norm(self, tuple(x_shape))
            return _REFLECT_NORMS[key]
        spectrum = self._spectrum(x_shape[-2], x_shape[-1], torch.zeros((), dtype=torch.float64))
        return float(spectrum.abs().square().max())

    def params(self) -> dict[str, Tensor]:
        return {"kernel": self.kernel, "boundary": torch.tensor(BOUNDARIES.index(self.boundary))}

    @classmethod
    def from_params(cls, params: dict[str, Tensor]) -> Blur:
        return cls(params["kernel"], BOUNDARIES[int(params["boundary"])])


def _bicubic_taps(factor: int) -> Tensor:
    """Keys' cubic (a = −0.5) stretched by f (anti-aliasing, as MATLAB imresize), 4f (+1 if f is odd) taps
    symmetric about the centre (f−1)/2 of each f-block, summing to 1."""
    k = 4 * factor + factor % 2
    t = ((torch.arange(k, dtype=torch.float64) - (k - factor) // 2 - (factor - 1) / 2) / factor).abs()
    cubic = torch.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                        torch.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, torch.zeros_like(t)))
    return cubic / cubic.sum()


class Downsample(Operator):
    """A x = every f-th sample of h ∗ x (periodic boundary): y (B, C, H/f, W/f). ``filter`` "box" (the mean
    of each f×f block), "bicubic", or a (1, 1, k, k) tensor (k ≥ f) whose taps (k−f)//2 .. centre each block."""

    name = "downsample"

    def __init__(self, factor: int, filter: str | Tensor = "box") -> None:
        check(factor in (2, 3, 4), "factor", f"must be 2, 3 or 4, got {factor}")
        if isinstance(filter, str):
            check(filter in ("box", "bicubic"), "filter", f"must be 'box', 'bicubic' or a tensor, got {filter!r}")
            taps = torch.full((factor,), 1.0 / factor, dtype=torch.float64) if filter == "box" \
                else _bicubic_taps(factor)
            filter = (taps[:, None] * taps[None, :]).float().reshape(1, 1, taps.numel(), taps.numel())
        check(filter.dim() == 4 and filter.shape[:2] == (1, 1) and filter.shape[2] == filter.shape[3]
              and filter.shape[-1] >= factor, "filter", f"must be (1, 1, k, k) with k >= {factor}, got "
              f"shape {tuple(filter.shape)}")
        self.factor, self.filter = factor, filter

    def _check(self, x_shape: Shape) -> None:
        super()._check(x_shape)
        f = self.factor
        check(x_shape[-2] % f == 0 and x_shape[-1] % f == 0, "x",
              f"height and width {tuple(x_shape[-2:])} must be divisible by factor {f}")

    def _index(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        k, f = self.filter.shape[-1], self.factor
        before, after = (k - f) // 2, k - f - (k - f) // 2  # the padded size H + k − f gives H/f outputs
        return _wrap(h, before, after, device), _wrap(w, before, after, device)

    def measurement_shape(self, x_shape: Shape) -> Shape:
        self._check(x_shape)
        return (*x_shape[:2], x_shape[2] // self.factor, x_shape[3] // self.factor)

    def A(self, x: Tensor) -> Tensor:
        self._check(x.shape)
        rows, cols = self._index(x.shape[-2], x.shape[-1], x.device)
        return _depthwise(_gather(x, rows, cols), self.filter.to(x), self.factor)

    def A_adjoint(self, y: Tensor) -> Tensor:
        Operator._check(self, y.shape)
        h, w = y.shape[-2] * self.factor, y.shape[-1] * self.factor
        rows, cols = self._index(h, w, y.device)
        return _scatter(_depthwise(y, self.filter.to(y), self.factor, transpose=True), rows, cols, h, w)

    def norm(self, x_shape: Shape) -> float:
        self._check(x_shape)
        (h, w), f, k = x_shape[-2:], self.factor, self.filter.shape[-1]
        taps = torch.arange(k, device=self.filter.device)
        power = torch.fft.fft2(_scatter(self.filter.double(), taps % h, taps % w, h, w)).abs().square()
        return float(power.reshape(f, h // f, f, w // f).sum((0, 2)).max()) / f**2

    def params(self) -> dict[str, Tensor]:
        return {"factor": torch.tensor(self.factor), "filter": self.filter}

    @classmethod
    def from_params(cls, params: dict[str, Tensor]) -> Downsample:
        return cls(int(params["factor"]), params["filter"])


class MRI(Operator):
    r"""Single-coil Cartesian MRI: y = M ⊙ F x, F = ``torch.fft.fft2(norm="ortho")``, mask M (B or 1, 1, H, W)
    in fft2's (unshifted) layout, y complex (B, 1, H, W) (complex64 for float32 x).

    A maps real images to complex data; with the real inner product ⟨u, v⟩ = Re Σ conj(u)·v on the data,
    ⟨A x, y⟩ = Re Σ conj(x)·F^H(M y) = Σ x·Re(F^H(M y)) for real x, so Aᵀ y = Re(F^H(M ⊙ y)) exactly.
    Then AᵀA = F^H M_s F with M_s = (M + M̃)/2, M̃(k) = M(−k): a projection (idempotent) only when the mask is
    conjugate-symmetric (M = M̃), and ‖A‖₂² = max M_s (1 once some k and −k are both sampled, e.g. k = 0).
    """

    name = "mri"

    def __init__(self, mask: Tensor) -> None:
        _check_binary(mask, one_channel=True)
        self.mask = mask

    def _check(self, x_shape: Shape) -> None:
        super()._check(x_shape)
        check(x_shape[1] == 1, "x", f"single-coil MRI images have 1 channel, got {x_shape[1]}")
        self._check_batch(self.mask, "mask", x_shape)
        check(self.mask.shape[2:] == x_shape[2:], "mask",
              f"size {tuple(self.mask.shape[2:])} differs from the image size {tuple(x_shape[2:])}")

    def A(self, x: Tensor) -> Tensor:
        self._check(x.shape)
        return torch.fft.fft2(x, norm="ortho") * self.mask.to(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check(y.shape)
        return torch.fft.ifft2(y * self.mask.to(y.real), norm="ortho").real

    def norm(self, x_shape: Shape) -> float:
        self._check(x_shape)
        mirrored = self.mask.flip(-2, -1).roll((1, 1), (-2, -1))  # M̃[i, j] = M[−i mod H, −j mod W]
        return float(((self.mask + mirrored) / 2).max())

    def params(self) -> dict[str, Tensor]:
        return {"mask": self.mask}


OPERATORS: dict[str, type[Operator]] = {op.name: op for op in (Identity, Inpainting, Blur, Downsample, MRI)}


# --------------------------------------------------------------------------------------------------
# Factories: kernels (1, 1, k, k) summing to 1, masks of 0/1 (float32).
# --------------------------------------------------------------------------------------------------


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Isotropic Gaussian, standard deviation ``sigma`` pixels, centred on the size×size grid."""
    check(size >= 1, "size", f"must be >= 1, got {size}")
    check(sigma > 0, "sigma", f"must be > 0, got {sigma}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).to(dtype).reshape(1, 1, size, size)


def motion_kernel(size: int, length: float, angle: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A centred line segment of ``length`` pixels at ``angle`` degrees (counter-clockwise from the x axis,
    rows growing downwards), splatted bilinearly (anti-aliased) from points every 1/4 pixel."""
    check(size >= 2, "size", f"must be >= 2, got {size}")
    check(1 <= length <= size - 1, "length", f"must be in [1, size - 1 = {size - 1}], got {length}")
    t = torch.linspace(-length / 2, length / 2, 4 * math.ceil(length) + 1, dtype=torch.float64)
    centre, theta = (size - 1) / 2, math.radians(angle)
    px, py = centre + t * math.cos(theta), centre - t * math.sin(theta)
    x0, y0 = px.floor(), py.floor()
    k = torch.zeros(size, size, dtype=torch.float64)
    for dy, wy in ((0, 1 - (py - y0)), (1, py - y0)):
        for dx, wx in ((0, 1 - (px - x0)), (1, px - x0)):
            rows, cols = (y0 + dy).long().clamp(0, size - 1), (x0 + dx).long().clamp(0, size - 1)
            k.index_put_((rows, cols), wy * wx, accumulate=True)
    return (k / k.sum()).to(dtype).reshape(1, 1, size, size)


def random_mask(shape: Shape, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """Mask of ``shape`` (B or 1, 1 or C, H, W), each pixel kept independently with probability ``keep``."""
    check(len(shape) == 4, "shape", f"must be (B, C, H, W), got {tuple(shape)}")
    check(0 <= keep <= 1, "keep", f"must be in [0, 1], got {keep}")
    return (torch.rand(shape, generator=generator) < keep).float()


def block_mask(shape: Shape, block: int, generator: torch.Generator | None = None, holes: int = 1) -> Tensor:
    """Mask of ``shape`` (B, C, H, W) with ``holes`` block×block square holes per sample (shared by the
    channels), placed uniformly inside the image; holes may overlap."""
    check(len(shape) == 4, "shape", f"must be (B, C, H, W), got {tuple(shape)}")
    h, w = shape[-2:]
    check(1 <= block <= min(h, w), "block", f"must be in [1, {min(h, w)}], got {block}")
    check(holes >= 1, "holes", f"must be >= 1, got {holes}")
    mask = torch.ones(shape)
    for i in range(shape[0]):
        for _ in range(holes):
            top, left = (int(torch.randint(n - block + 1, (1,), generator=generator)) for n in (h, w))
            mask[i, :, top:top + block, left:left + block] = 0
    return mask


def cartesian_mask(h: int, w: int, rate: float, generator: torch.Generator | None = None,
                   centre_fraction: float = 0.08) -> Tensor:
    """Variable-density Cartesian mask (1, 1, H, W) in fft2's layout: whole columns (phase encodes), the
    round(centre_fraction·W) lowest frequencies always, then round(rate·W) in all, the others drawn without
    replacement with weights (1 − |ν|/(W/2 + 1))², decaying with the column frequency |ν|."""
    check(0 < rate <= 1, "rate", f"must be in (0, 1], got {rate}")
    check(0 <= centre_fraction <= rate, "centre_fraction", f"must be in [0, rate = {rate}], got {centre_fraction}")
    dist = (torch.fft.fftfreq(w, dtype=torch.float64) * w).abs()  # |ν| of each column
    cols = torch.zeros(w, dtype=torch.bool)
    cols[dist.argsort(stable=True)[:round(centre_fraction * w)]] = True
    extra = round(rate * w) - int(cols.sum())
    if extra > 0:
        weights = (1 - dist / (w / 2 + 1)) ** 2 * ~cols
        cols[torch.multinomial(weights, extra, replacement=False, generator=generator)] = True
    return cols.float().expand(h, w).reshape(1, 1, h, w).clone()


def _spoke(h: int, w: int, theta: float) -> Tensor:
    """Centred (fftshifted) line through the DC pixel at angle theta: one pixel per column or row."""
    line = torch.zeros(h, w, dtype=torch.bool)
    c, s = math.cos(theta), math.sin(theta)
    if abs(c) >= abs(s):
        x = torch.arange(w) - w // 2
        y = torch.round(x * (s / c)).long() + h // 2
        ok = (y >= 0) & (y < h)
        line[y[ok], (x + w // 2)[ok]] = True
    else:
        y = torch.arange(h) - h // 2
        x = torch.round(y * (c / s)).long() + w // 2
        ok = (x >= 0) & (x < w)
        line[(y + h // 2)[ok], x[ok]] = True
    return line


def radial_mask(h: int, w: int, rate: float) -> Tensor:
    """Radial mask (1, 1, H, W) in fft2's layout: spokes through k = 0 at golden-angle steps (π(√5 − 1)/2),
    added while the sampled fraction gets closer to ``rate``."""
    check(0 < rate <= 1, "rate", f"must be in (0, 1], got {rate}")
    mask, target = torch.zeros(h, w, dtype=torch.bool), rate * h * w
    golden = math.pi * (math.sqrt(5) - 1) / 2
    for i in range(8 * (h + w)):
        before = int(mask.sum())
        candidate = mask | _spoke(h, w, i * golden)
        if before >= target or (before > 0 and int(candidate.sum()) - target > target - before):
            break
        mask = candidate
    return torch.fft.ifftshift(mask, dim=(-2, -1)).float().reshape(1, 1, h, w)

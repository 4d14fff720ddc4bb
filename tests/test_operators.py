"""Maths of the restoration operators (models/operators.py), float64 on CPU: ⟨A x, y⟩ = ⟨x, Aᵀ y⟩, the
analytic ‖A‖₂² against the power method, projections, the blur/decimation conventions against direct
definitions written here, the mask factories' sampling rates, parameter round trips, gradients and errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from sparsefold.errors import InputError
from sparsefold.models import operators
from sparsefold.models.operators import (
    MRI,
    OPERATORS,
    Blur,
    Downsample,
    Identity,
    Inpainting,
    Operator,
    block_mask,
    cartesian_mask,
    gaussian_kernel,
    motion_kernel,
    power_norm,
    radial_mask,
    random_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

f64 = torch.float64
Shape = tuple[int, int, int, int]
SHAPES: list[Shape] = [(1, 1, 16, 16), (2, 3, 24, 18), (2, 1, 15, 21), (1, 2, 12, 24)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_kernels(b: int, k: int, seed: int) -> torch.Tensor:
    """Positive, non-symmetric kernels (b, 1, k, k) summing to 1: a flipped or shifted kernel shows."""
    kern = torch.rand(b, 1, k, k, generator=gen(seed), dtype=f64) + 0.1
    return kern / kern.sum((-2, -1), keepdim=True)


def mirrored(mask: torch.Tensor) -> torch.Tensor:
    """M̃[i, j] = M[−i mod H, −j mod W], written with explicit indices."""
    h, w = mask.shape[-2:]
    return mask[..., (-torch.arange(h)) % h, :][..., (-torch.arange(w)) % w]


def downsample(factor: int, filt: str) -> tuple[Callable[[Shape], bool], Callable[[Shape], Operator]]:
    return (lambda s: s[2] % factor == 0 and s[3] % factor == 0), (lambda s: Downsample(factor, filt))


# kind -> (does it fit images of this shape, build it for this shape)
KINDS: dict[str, tuple[Callable[[Shape], bool], Callable[[Shape], Operator]]] = {
    "identity": (lambda s: True, lambda s: Identity()),
    "inpaint-random": (lambda s: True, lambda s: Inpainting(random_mask((s[0], 1, *s[2:]), 0.6, gen(1)))),
    "inpaint-block": (lambda s: True, lambda s: Inpainting(block_mask(s, 5, gen(2), holes=2))),
    "blur-circular": (lambda s: True, lambda s: Blur(random_kernels(s[0], 5, 3))),
    "blur-circular-motion": (lambda s: True, lambda s: Blur(motion_kernel(7, 5.5, 30.0))),
    "blur-reflect": (lambda s: True, lambda s: Blur(random_kernels(s[0], 5, 4), "reflect")),
    "blur-reflect-even": (lambda s: True, lambda s: Blur(random_kernels(1, 4, 5), "reflect")),
    **{f"down-{filt}-{f}": downsample(f, filt) for f in (2, 3, 4) for filt in ("box", "bicubic")},
    "mri-cartesian": (lambda s: s[1] == 1, lambda s: MRI(cartesian_mask(s[2], s[3], 0.3, gen(6)))),
    "mri-radial": (lambda s: s[1] == 1, lambda s: MRI(radial_mask(s[2], s[3], 0.3))),
    "mri-random": (lambda s: s[1] == 1, lambda s: MRI(random_mask((s[0], 1, *s[2:]), 0.4, gen(7)))),
}
CASES = [pytest.param(kind, s, id=f"{kind}-{'x'.join(map(str, s))}")
         for kind, (fits, _) in KINDS.items() for s in SHAPES if fits(s)]


def build(kind: str, shape: Shape) -> Operator:
    return KINDS[kind][1](shape)


def measurement(op: Operator, shape: Shape, seed: int) -> torch.Tensor:
    dtype = torch.complex128 if isinstance(op, MRI) else f64
    return torch.randn(op.measurement_shape(shape), generator=gen(seed), dtype=dtype)


@pytest.mark.parametrize("kind, shape", CASES)
def test_adjoint(kind: str, shape: Shape) -> None:
    op = build(kind, shape)
    x, y = torch.randn(shape, generator=gen(10), dtype=f64), measurement(op, shape, 11)
    ax, aty = op.A(x), op.A_adjoint(y)
    assert ax.shape == y.shape and aty.shape == x.shape and not aty.is_complex()
    lhs, rhs = float((ax.conj() * y).real.sum()), float((x * aty).sum())  # Re⟨A x, y⟩, ⟨x, Aᵀ y⟩
    scale = float(ax.norm() * y.norm() + x.norm() * aty.norm())
    assert abs(lhs - rhs) <= 1e-10 * scale


@pytest.mark.parametrize("kind, shape", [c for c in CASES if c.values[1] != (2, 3, 24, 18)])  # time
def test_norm_is_the_power_method(kind: str, shape: Shape) -> None:
    op = build(kind, shape)
    iters = 1500 if kind == "down-bicubic-2" else 300  # its flat passband: eigenvalues just below the top
    assert op.norm(shape) == pytest.approx(power_norm(op, shape, iters=iters, seed=1), rel=1e-3)


@pytest.mark.parametrize("kind", list(KINDS))
def test_norm_is_the_dense_operator_norm(kind: str) -> None:
    """‖A‖₂² from the matrix of A (columns A e_i), the exact reference for the analytic formulas."""
    shape = (1, 1, 12, 12)
    op, n = build(kind, shape), 144
    columns = op.A(torch.eye(n, dtype=f64).reshape(n, *shape[1:])).reshape(n, -1)
    assert op.norm(shape) == pytest.approx(float(torch.linalg.matrix_norm(columns, 2)) ** 2, rel=1e-6)


def test_reflect_blur_norm_is_computed_once_per_kernel_and_shape(monkeypatch) -> None:
    """PGNet asks for ‖A‖₂² on every forward; the reflect blur's power method (seconds) runs once per kernel
    and image shape, and its value is the power method's."""
    calls = []
    monkeypatch.setattr(operators, "_REFLECT_NORMS", {})
    monkeypatch.setattr(operators, "power_norm", lambda op, shape: calls.append(shape) or power_norm(op, shape))
    k = random_kernels(2, 5, 0)
    s = (2, 1, 16, 12)
    first = Blur(k, "reflect").norm(s)
    assert first == power_norm(Blur(k, "reflect"), s) and len(calls) == 1
    assert Blur(k.clone(), "reflect").norm(s) == first and len(calls) == 1  # another tensor, equal values: a hit
    Blur(k, "reflect").norm((2, 1, 16, 14))
    Blur(random_kernels(2, 5, 1), "reflect").norm(s)
    assert len(calls) == 3


def test_norm_special_cases() -> None:
    s = (1, 1, 8, 10)
    assert Inpainting(torch.zeros(1, 1, 8, 10)).norm(s) == 0.0 == power_norm(Inpainting(torch.zeros(1, 1, 8, 10)), s)
    half = torch.zeros(1, 1, 8, 10)
    half[..., 0, 1:4] = 1  # no k with −k also sampled: AᵀA = F^H (M/2) F, ‖A‖² = 1/2
    assert MRI(half).norm(s) == 0.5 == pytest.approx(power_norm(MRI(half), s), rel=1e-9)
    assert Downsample(3).norm((1, 1, 9, 9)) == pytest.approx(1 / 9, rel=1e-6)  # box: orthogonal rows, 1/f²
    sharpen = torch.tensor([[0.0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=f64).reshape(1, 1, 3, 3)
    assert Blur(sharpen).norm((1, 1, 8, 8)) == pytest.approx(81.0)  # |k̂|² at (π, π): (5 + 4)²


@pytest.mark.parametrize("kind", ["inpaint-random", "inpaint-block", "mri-symmetric"])
def test_projections_are_idempotent(kind: str) -> None:
    shape = (2, 1, 15, 16)
    if kind == "mri-symmetric":
        mask = cartesian_mask(15, 16, 0.3, gen(3))
        op: Operator = MRI(torch.maximum(mask, mirrored(mask)))
    else:
        op = build(kind, shape)
    x = torch.randn(shape, generator=gen(4), dtype=f64)
    p = op.AtA(x)
    torch.testing.assert_close(op.AtA(p), p, rtol=0, atol=1e-12)
    assert (p - x).norm() > 0.1 * x.norm()  # not the identity


def test_mri_normal_operator_symmetrizes_the_mask() -> None:
    mask = cartesian_mask(12, 14, 0.4, gen(5))
    assert not torch.equal(mask, mirrored(mask))  # a typical mask is not conjugate-symmetric
    op, x = MRI(mask), torch.randn(1, 1, 12, 14, generator=gen(6), dtype=f64)
    expected = torch.fft.ifft2(torch.fft.fft2(x, norm="ortho") * (mask + mirrored(mask)) / 2, norm="ortho")
    torch.testing.assert_close(op.AtA(x), expected.real, rtol=0, atol=1e-12)
    assert (op.AtA(op.AtA(x)) - op.AtA(x)).norm() > 1e-3  # hence not a projection


def test_mri_full_mask_is_orthonormal() -> None:
    op, x = MRI(torch.ones(1, 1, 9, 12)), torch.randn(2, 1, 9, 12, generator=gen(7), dtype=f64)
    y = op.A(x)
    assert y.dtype == torch.complex128 and op.A(x.float()).dtype == torch.complex64
    torch.testing.assert_close(op.AtA(x), x, rtol=0, atol=1e-12)
    assert float(y.norm()) == pytest.approx(float(x.norm()), rel=1e-12)


@pytest.mark.parametrize("kernel", [gaussian_kernel(7, 1.5), gaussian_kernel(4, 0.8), motion_kernel(9, 6.3, 37.0),
                                    motion_kernel(5, 4, 90.0)])
def test_kernels_sum_to_one_and_keep_constants(kernel: torch.Tensor) -> None:
    assert kernel.shape[:2] == (1, 1) and (kernel >= 0).all()
    assert float(kernel.double().sum()) == pytest.approx(1.0, abs=1e-6)
    const = torch.full((2, 3, 16, 13), 0.7, dtype=f64)
    for boundary in ("circular", "reflect"):
        torch.testing.assert_close(Blur(kernel, boundary).A(const), const, rtol=0, atol=1e-6)


def test_motion_kernel_lies_on_its_line() -> None:
    horizontal, vertical = motion_kernel(9, 6, 0.0)[0, 0], motion_kernel(9, 6, 90.0)[0, 0]
    assert float(horizontal[4].sum()) == pytest.approx(1.0) and int((horizontal[4] > 0).sum()) == 7
    torch.testing.assert_close(vertical, horizontal.T)
    diagonal = motion_kernel(9, 6, 45.0)[0, 0]
    torch.testing.assert_close(diagonal, diagonal.T)  # the line r + c = 8 is its own mirror image
    assert float(diagonal[2, 6]) > 0 and float(diagonal[2, 2]) == 0  # up-right (rows grow downwards)


@pytest.mark.parametrize("k", [4, 5])
def test_blur_is_a_centred_convolution(k: int) -> None:
    """Circular blur = Σ_u k[u]·roll(x, u − k//2); the reflect blur agrees with it away from the border."""
    kern, x = random_kernels(2, k, 8), torch.randn(2, 2, 14, 17, generator=gen(9), dtype=f64)
    ref = torch.zeros_like(x)
    for i in range(k):
        for j in range(k):
            ref += kern[:, :, i, j, None, None] * x.roll((i - k // 2, j - k // 2), (-2, -1))
    torch.testing.assert_close(Blur(kern).A(x), ref, rtol=0, atol=1e-12)
    inner = (slice(None), slice(None), slice(k, -k), slice(k, -k))
    torch.testing.assert_close(Blur(kern, "reflect").A(x)[inner], ref[inner], rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downsample_conventions(factor: int) -> None:
    x = torch.randn(2, 3, 12, 24, generator=gen(10), dtype=f64)
    torch.testing.assert_close(Downsample(factor).A(x), F.avg_pool2d(x, factor), rtol=0, atol=1e-6)
    const = torch.full((1, 2, 12, 24), 0.3, dtype=f64)
    for filt in ("box", "bicubic"):
        out = Downsample(factor, filt).A(const)
        assert out.shape == (1, 2, 12 // factor, 24 // factor)
        torch.testing.assert_close(out, torch.full_like(out, 0.3), rtol=0, atol=1e-7)
    taps = Downsample(factor, "bicubic").filter[0, 0]
    torch.testing.assert_close(taps, taps.flip(0, 1))  # symmetric about each block's centre


def test_mask_rates() -> None:
    assert float(random_mask((1, 1, 64, 64), 0.3, gen(0)).mean()) == pytest.approx(0.3, abs=0.03)
    for rate in (0.1, 0.25, 0.5):
        for h, w in ((64, 64), (48, 80)):
            cart, rad = cartesian_mask(h, w, rate, gen(1)), radial_mask(h, w, rate)
            assert cart.shape == rad.shape == (1, 1, h, w)
            assert float(cart.mean()) == pytest.approx(rate, abs=0.03)
            assert float(rad.mean()) == pytest.approx(rate, abs=0.03)
            assert rad[0, 0, 0, 0] == 1  # DC (fft2 layout: index 0) on every spoke


def test_cartesian_mask_is_variable_density() -> None:
    w = 64
    masks = torch.stack([cartesian_mask(8, w, 0.25, gen(s))[0, 0] for s in range(40)])
    assert (masks == masks[:, :1]).all()  # whole columns (phase encodes)
    freq = (torch.fft.fftfreq(w) * w).abs()
    assert (masks[:, 0, freq <= 2] == 1).all()  # the round(0.08·64) = 5 lowest columns, always
    use = masks[:, 0].mean(0)
    assert use[(freq > 4) & (freq <= 12)].mean() > 1.5 * use[freq > 24].mean()


def test_block_mask_holes() -> None:
    mask = block_mask((3, 2, 20, 17), 6, gen(11))
    for sample in mask:
        assert torch.equal(sample[0], sample[1]) and int((sample[0] == 0).sum()) == 36
        rows, cols = (sample[0] == 0).nonzero().unbind(1)
        assert int(rows.max() - rows.min()) == 5 == int(cols.max() - cols.min())


def test_seeded_masks_are_reproducible() -> None:
    for make in (lambda g: random_mask((2, 1, 16, 16), 0.5, g), lambda g: block_mask((2, 1, 16, 16), 4, g),
                 lambda g: cartesian_mask(16, 32, 0.4, g)):
        assert torch.equal(make(gen(3)), make(gen(3))) and not torch.equal(make(gen(3)), make(gen(4)))
    assert torch.equal(radial_mask(20, 24, 0.2), radial_mask(20, 24, 0.2))


@pytest.mark.parametrize("kind", list(KINDS))
def test_params_round_trip(kind: str) -> None:
    shape = (2, 1, 12, 24)
    op = build(kind, shape)
    params = op.params()
    assert all(isinstance(v, torch.Tensor) for v in params.values())
    again = OPERATORS[op.name].from_params(params)
    assert type(again) is type(op)
    x = torch.randn(shape, generator=gen(12), dtype=f64)
    assert torch.equal(again.A(x), op.A(x))
    assert torch.equal(again.A_adjoint(op.A(x)), op.A_adjoint(op.A(x)))


GRAD_OPS: list[tuple[str, Operator]] = [
    ("identity", Identity()),
    ("inpainting", Inpainting(random_mask((1, 1, 6, 6), 0.5, gen(13)))),
    ("blur-circular", Blur(random_kernels(1, 3, 14))),
    ("blur-reflect", Blur(random_kernels(1, 3, 15), "reflect")),
    ("downsample", Downsample(2, "bicubic")),
    ("mri", MRI(cartesian_mask(6, 6, 0.5, gen(16)))),
]


@pytest.mark.parametrize("op", [o for _, o in GRAD_OPS], ids=[n for n, _ in GRAD_OPS])
def test_gradcheck(op: Operator) -> None:
    shape = (1, 1, 6, 6)
    x = torch.randn(shape, generator=gen(17), dtype=f64, requires_grad=True)
    y = measurement(op, shape, 18).requires_grad_()
    assert torch.autograd.gradcheck(op.A, (x,))
    assert torch.autograd.gradcheck(op.A_adjoint, (y,))


@pytest.mark.parametrize("boundary", ["circular", "reflect"])
def test_gradcheck_blur_kernel(boundary: str) -> None:
    x = torch.randn(1, 2, 6, 7, generator=gen(19), dtype=f64)
    kern = random_kernels(1, 3, 20).requires_grad_()
    assert torch.autograd.gradcheck(lambda k: Blur(k, boundary).A(x), (kern,))
    assert torch.autograd.gradcheck(lambda k: Blur(k, boundary).A_adjoint(x), (kern,))


@pytest.mark.parametrize("make, field", [
    (lambda: Downsample(5), "factor"),
    (lambda: Downsample(2, "lanczos"), "filter"),
    (lambda: Downsample(3).A(torch.zeros(1, 1, 15, 16)), "x"),
    (lambda: Downsample(2).measurement_shape((1, 1, 16, 15)), "x"),
    (lambda: Blur(torch.ones(1, 1, 3, 4)), "kernel"),
    (lambda: Blur(gaussian_kernel(9, 2.0)).A(torch.zeros(1, 1, 8, 16)), "kernel"),
    (lambda: Blur(random_kernels(3, 3, 0)).A(torch.zeros(2, 1, 8, 8)), "kernel"),
    (lambda: Blur(gaussian_kernel(3, 1.0), "zero"), "boundary"),
    (lambda: Inpainting(torch.full((1, 1, 4, 4), 0.5)), "mask"),
    (lambda: Inpainting(torch.ones(1, 1, 4, 4)).A(torch.zeros(1, 1, 4, 5)), "mask"),
    (lambda: MRI(torch.ones(1, 1, 4, 4)).A(torch.zeros(1, 3, 4, 4)), "x"),
    (lambda: MRI(torch.ones(1, 2, 4, 4)), "mask"),
    (lambda: Identity().norm((4, 4)), "x"),
    (lambda: cartesian_mask(8, 8, 1.5), "rate"),
    (lambda: cartesian_mask(8, 8, 0.05, centre_fraction=0.1), "centre_fraction"),
    (lambda: radial_mask(8, 8, 0.0), "rate"),
    (lambda: random_mask((1, 1, 4, 4), 1.2), "keep"),
    (lambda: block_mask((1, 1, 4, 4), 5), "block"),
    (lambda: gaussian_kernel(5, 0.0), "sigma"),
    (lambda: motion_kernel(5, 6, 0.0), "length"),
])
def test_bad_arguments_name_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(InputError, match=rf"^{field}: "):
        make()

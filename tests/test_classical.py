"""Maths of the classical reconstructions (models/classical.py), float64 on CPU: the Haar transform is
orthonormal with synthesis its inverse and adjoint, TV and its box-constrained prox (values, optimality), FISTA
decreases its objective and outruns ISTA, and on a piecewise-constant image each solver beats its trivial
baseline (zero-filled, the blurred input, nearest upsampling)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sparsefold.errors import InputError
from sparsefold.models.classical import (
    bicubic_upsample,
    fista_tv,
    fista_wavelet,
    haar,
    haar_inverse,
    tv,
    tv_prox,
    zero_filled,
)
from sparsefold.models.operators import (
    MRI,
    Blur,
    Downsample,
    Identity,
    Inpainting,
    Operator,
    cartesian_mask,
    gaussian_kernel,
    random_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=f64)


def rectangles(size: int = 48) -> Tensor:
    """A piecewise-constant (1, 1, size, size) image in [0, 1]: three overlapping rectangles on grey, edges at
    odd and even coordinates."""
    x = torch.full((1, 1, size, size), 0.2, dtype=f64)
    s = size / 48
    for (top, bottom, left, right), value in (((5, 30, 7, 22), 0.8), ((20, 43, 25, 41), 0.5),
                                              ((33, 45, 4, 17), 1.0)):
        x[..., int(top * s):int(bottom * s), int(left * s):int(right * s)] = value
    return x


def psnr(estimate: Tensor, truth: Tensor) -> float:
    return float(10 * torch.log10(1 / (estimate - truth).square().mean()))


# --------------------------------------------------------------------------------------------------
# Haar
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "levels"), [((1, 1, 8, 8), 1), ((2, 3, 16, 24), 3), ((1, 2, 32, 8), 2),
                                               ((3, 1, 48, 48), 4)])
def test_haar_is_orthonormal_with_synthesis_its_inverse_and_adjoint(shape: tuple[int, ...], levels: int) -> None:
    x, z = randn(*shape, seed=1), randn(*shape, seed=2)
    wx = haar(x, levels)
    assert wx.shape == x.shape
    torch.testing.assert_close(wx.norm(), x.norm())
    torch.testing.assert_close(haar_inverse(wx, levels), x)
    torch.testing.assert_close(haar(haar_inverse(z, levels), levels), z)
    torch.testing.assert_close((wx * z).sum(), (x * haar_inverse(z, levels)).sum())  # ⟨W x, z⟩ = ⟨x, W⁻¹ z⟩


def test_haar_puts_a_constant_in_the_coarsest_block_and_an_edge_in_the_details() -> None:
    levels, c = 2, 0.3
    z = haar(torch.full((1, 1, 8, 8), c, dtype=f64), levels)
    expected = torch.zeros(1, 1, 8, 8, dtype=f64)
    expected[..., :2, :2] = c * 2**levels  # the mean of each 4×4 block times its √16
    torch.testing.assert_close(z, expected)
    step = torch.zeros(1, 1, 4, 4, dtype=f64)
    step[..., 1::2] = 1.0  # columns alternate 0, 1: all energy in the finest horizontal detail LH
    z = haar(step, 1)
    torch.testing.assert_close(z[..., :2, 2:], torch.full((1, 1, 2, 2), -1.0, dtype=f64))
    torch.testing.assert_close(z[..., :2, :2], torch.ones(1, 1, 2, 2, dtype=f64))
    assert float(z[..., 2:, :].abs().max()) == 0


def test_haar_rejects_sizes_not_divisible_by_two_to_the_levels() -> None:
    with pytest.raises(InputError, match="levels"):
        haar(torch.zeros(1, 1, 12, 16), 3)


# --------------------------------------------------------------------------------------------------
# TV and its prox
# --------------------------------------------------------------------------------------------------


def test_tv_of_known_images() -> None:
    x = torch.zeros(2, 3, 10, 12, dtype=f64)
    x[0, :, :, 6:] = 0.5  # a vertical edge of height 0.5 along 10 rows, in 3 channels
    x[1, 0, 4, 4] = 1.0  # a spike: |∇| = √2 at the spike, 1 at its left and upper neighbours
    torch.testing.assert_close(tv(x), torch.tensor([3 * 10 * 0.5, 2 + 2**0.5], dtype=f64))


def prox_objective(u: Tensor, v: Tensor, lam: float) -> float:
    return float(0.5 * (u - v).square().sum() + lam * tv(u).sum())


def test_tv_prox_beats_its_input_and_nearby_points_of_the_box() -> None:
    v, lam = rectangles(32) + 0.15 * randn(1, 1, 32, 32, seed=3), 0.1
    u = tv_prox(v, lam, iters=300)
    assert float(u.min()) >= 0 and float(u.max()) <= 1
    best = prox_objective(u, v, lam)
    assert best < prox_objective(v.clamp(0, 1), v, lam) - 1
    for seed in range(5):
        for scale in (1e-2, 1e-1):
            nearby = (u + scale * randn(1, 1, 32, 32, seed=10 + seed)).clamp(0, 1)
            assert best < prox_objective(nearby, v, lam)
    smoothed = F.avg_pool2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert best < prox_objective(smoothed, v, lam)
    assert prox_objective(tv_prox(v, lam, iters=50), v, lam) - best < 1e-3 * best  # FGP: gap O(1/k²)


def test_tv_prox_with_zero_lambda_is_the_box_projection() -> None:
    v = 2 * randn(2, 3, 8, 8, seed=4)
    torch.testing.assert_close(tv_prox(v, 0.0), v.clamp(0, 1), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# FISTA
# --------------------------------------------------------------------------------------------------


def deblur_problem() -> tuple[Tensor, Operator, Tensor]:
    x = rectangles(32)
    op = Blur(gaussian_kernel(9, 1.6, f64))
    return x, op, op.A(x) + 0.01 * randn(1, 1, 32, 32, seed=5)


def tv_objective(x: Tensor, op: Operator, y: Tensor, lam: float) -> float:
    return float(0.5 * (op.A(x) - y).abs().square().sum() + lam * tv(x).sum())


def ista_tv(y: Tensor, op: Operator, lam: float, iters: int, tv_iters: int) -> Tensor:
    x, L = op.A_adjoint(y), op.norm(tuple(y.shape))
    for _ in range(iters):
        x = tv_prox(x - op.A_adjoint(op.A(x) - y) / L, lam / L, tv_iters)
    return x


def test_fista_tv_decreases_its_objective_and_outruns_ista() -> None:
    _, op, y = deblur_problem()
    lam = 0.01
    values = [tv_objective(fista_tv(y, op, lam, iters, tv_iters=10), op, y, lam) for iters in range(0, 61, 10)]
    assert values[-1] < 0.5 * values[0]
    assert all(b <= a * (1 + 1e-3) for a, b in zip(values, values[1:])), values
    assert values[-1] < tv_objective(ista_tv(y, op, lam, 60, tv_iters=10), op, y, lam)


def test_fista_starts_from_the_zero_filled_image() -> None:
    _, op, y = deblur_problem()
    torch.testing.assert_close(fista_tv(y, op, 0.01, iters=0), zero_filled(y, op), rtol=0, atol=0)
    torch.testing.assert_close(fista_wavelet(y, op, 0.01, iters=0), zero_filled(y, op), rtol=0, atol=0)


def test_wavelet_prox_keeps_the_coarse_means_and_nothing_else_under_a_huge_lambda() -> None:
    y = randn(2, 3, 16, 16, seed=11)  # A = I, L = 1: one FISTA step is the prox of y
    means = F.interpolate(F.avg_pool2d(y, 4), scale_factor=4, mode="nearest")
    torch.testing.assert_close(fista_wavelet(y, Identity(), 1e6, iters=1, levels=2), means)
    torch.testing.assert_close(fista_wavelet(y, Identity(), 0.0, iters=3, levels=2), y)


def test_fista_wavelet_decreases_its_objective() -> None:
    _, op, y = deblur_problem()
    lam, levels = 0.01, 3

    def objective(x: Tensor) -> float:
        z = haar(x, levels)
        z[..., :4, :4] = 0  # the coarsest LL block is not penalised
        return float(0.5 * (op.A(x) - y).square().sum() + lam * z.abs().sum())

    values = [objective(fista_wavelet(y, op, lam, iters, levels)) for iters in range(0, 61, 10)]
    assert values[-1] < 0.5 * values[0]
    assert all(b <= a * (1 + 1e-3) for a, b in zip(values, values[1:])), values


# --------------------------------------------------------------------------------------------------
# Reconstructions of a piecewise-constant 48×48 image
# --------------------------------------------------------------------------------------------------


def noisy(op: Operator, x: Tensor, seed: int, sigma: float = 0.01) -> Tensor:
    y = op.A(x)
    noise: Callable[[int], Tensor] = lambda s: sigma * torch.randn(y.shape, generator=gen(s), dtype=f64)
    return y + (noise(seed) + 1j * noise(seed + 1) if y.is_complex() else noise(seed))


def test_inpainting_half_the_pixels() -> None:
    x = rectangles()
    op = Inpainting(random_mask((1, 1, 48, 48), 0.5, gen(6)).to(f64))
    y = noisy(op, x, 7) * op.mask
    assert psnr(fista_tv(y, op, 0.01, iters=50, tv_iters=10), x) >= psnr(zero_filled(y, op), x) + 5


def test_deblurring() -> None:
    x = rectangles()
    op = Blur(gaussian_kernel(9, 1.6, f64))
    y = noisy(op, x, 8)
    assert psnr(fista_tv(y, op, 0.002, iters=50, tv_iters=10), x) >= psnr(y, x) + 5


def test_mri_cartesian_one_third() -> None:
    x = rectangles()
    op = MRI(cartesian_mask(48, 48, 0.33, gen(9)).to(f64))
    y = noisy(op, x, 10) * op.mask
    baseline = psnr(zero_filled(y, op), x)
    assert psnr(fista_tv(y, op, 0.005, iters=50, tv_iters=10), x) >= baseline + 5
    assert psnr(fista_wavelet(y, op, 0.005, iters=50), x) >= baseline + 5


def test_super_resolution_bicubic_beats_nearest_and_zero_filled() -> None:
    x = rectangles()
    op = Downsample(2)
    y = op.A(x)
    up = bicubic_upsample(y, 2)
    assert up.shape == x.shape and float(up.min()) >= 0 and float(up.max()) <= 1
    assert psnr(up, x) > psnr(F.interpolate(y, scale_factor=2, mode="nearest"), x) + 1
    assert psnr(up, x) > psnr(zero_filled(y, op), x) + 5

"""CDLNet against references written from the definitions (CPU, float64, small images, one thread).

The operator pair is checked for adjointness and against the official "same" Conv2d / ConvTranspose2d;
the tied model at init against :func:`conv_ista` (one layer = one ISTA step, many layers = the LASSO
solution of FISTA); the untied forward against a transcription of the official CDLNet.forward
(nikopj/CDLNet-OJSP, model/net.py + model/utils.py); then noise adaptivity, σ estimation on a real
Set12 image, the projection, set_depth and the parameter formula.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsefold.config import ConfigError, dataclass_from_dict
from sparsefold.models import MODELS, CDLNet, CDLNetConfig, count_parameters
from sparsefold.models.cdlnet import POWER_ITERS, POWER_SIZE, analysis, conv_ista, synthesis
from sparsefold.models.convops import power_method
from sparsefold.models.noise_level import estimate_sigma

f64 = torch.float64
SET12 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "set12"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small(**kw) -> CDLNet:
    return CDLNet(CDLNetConfig(**{**dict(depth=3, filters=6, kernel_size=5), **kw})).double()


def ref_soft(v: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(v) * torch.clamp(v.abs() - theta, min=0)


def lasso(y: torch.Tensor, z: torch.Tensor, W: torch.Tensor, lam: float, stride: int) -> float:
    return float(0.5 * (y - synthesis(z, W, stride)).pow(2).sum() + lam * z.abs().sum())


# ================================================================== the operator pair


@pytest.mark.parametrize("k,s,c", [(5, 1, 1), (7, 1, 3), (7, 2, 1), (6, 2, 2), (5, 3, 1), (7, 4, 1)])
def test_analysis_synthesis_are_adjoint(k: int, s: int, c: int) -> None:
    """⟨A x, z⟩ = ⟨x, B z⟩ for the same weight (B = D, A = Dᵀ)."""
    g = gen(0)
    w = torch.randn(4, c, k, k, generator=g, dtype=f64)
    x = torch.randn(2, c, 6 * s, 5 * s, generator=g, dtype=f64)
    z = torch.randn(2, 4, 6, 5, generator=g, dtype=f64)
    ax, bz = analysis(x, w, s), synthesis(z, w, s)
    assert ax.shape == z.shape and bz.shape == x.shape
    lhs, rhs = float((ax * z).sum()), float((x * bz).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("k,s", [(5, 1), (7, 1), (7, 2), (5, 2), (7, 4)])
def test_pair_is_the_official_same_convolution(k: int, s: int) -> None:
    """Conv2d(C, M, P, stride=s, padding=(P−1)//2) and ConvTranspose2d(..., output_padding=s−1)."""
    g, p = gen(1), (k - 1) // 2
    w = torch.randn(3, 1, k, k, generator=g, dtype=f64)
    x = torch.randn(2, 1, 8 * s, 6 * s, generator=g, dtype=f64)
    z = torch.randn(2, 3, 8, 6, generator=g, dtype=f64)
    torch.testing.assert_close(analysis(x, w, s), F.conv2d(x, w, stride=s, padding=p), rtol=1e-12, atol=1e-12)
    ref = F.conv_transpose2d(z, w, stride=s, padding=p, output_padding=s - 1)
    torch.testing.assert_close(synthesis(z, w, s), ref, rtol=1e-12, atol=1e-12)


# ================================================================== tied CDLNet at init = conv ISTA


def test_init_all_layers_the_same_normalized_dictionary() -> None:
    model = small(depth=4)
    w = model.B[0]
    for k in range(4):
        assert torch.equal(model.A[k], w) and torch.equal(model.B[k], w)
    assert torch.equal(model.dictionary(), w.detach()) and model.dictionary().shape == (6, 1, 5, 5)
    assert abs(power_method(w.detach(), 1, size=POWER_SIZE, iters=POWER_ITERS) - 1.0) < 1e-5  # ‖D‖₂ = 1
    assert torch.equal(model.tau0.detach(), torch.full((4, 6), 1e-2).double())
    assert torch.equal(model.tau1.detach(), torch.full((4, 6), 1e-2).double())


@pytest.mark.parametrize("stride", [1, 2])
def test_tied_layers_at_init_are_ista_steps(stride: int) -> None:
    """Thresholds λ/L (here via Eq. 4: τ₀ + τ₁σ/255 = λ/L at σ = 20): layer k = ISTA iteration k+1."""
    model = small(depth=3, tied=True, stride=stride)
    w = model.B[0].detach()
    L = power_method(w, stride, size=POWER_SIZE, iters=POWER_ITERS)
    lam, sigma = 0.05, torch.tensor([20.0, 20.0], dtype=f64)
    with torch.no_grad():
        model.tau1.copy_(torch.linspace(0.0, 0.3, 6, dtype=f64))
        model.tau0.copy_(lam / L - model.tau1 * 20.0 / 255.0)
    y = torch.rand(2, 1, 24, 20, generator=gen(2), dtype=f64)
    y = y - y.mean(dim=(-2, -1), keepdim=True)
    with torch.no_grad():
        codes = model.sparse_code(y, sigma)
    assert len(codes) == 3
    for k, z in enumerate(codes):
        ref = conv_ista(y, w, lam, iters=k + 1, stride=stride)
        torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-7)
        assert (z == 0).any() and (z != 0).any()  # the threshold is active, not trivial
    first = ref_soft(F.conv2d(y, w, stride=stride, padding=2), lam / L)  # z⁽⁰⁾ = S(Aᵀy/L) from scratch
    torch.testing.assert_close(codes[0], first, rtol=1e-6, atol=1e-7)


def test_tied_many_layers_reach_the_lasso_solution() -> None:
    model = small(depth=1000, tied=True, filters=4, noise_adaptive=False)
    w = model.B[0].detach()
    L = power_method(w, 1, size=POWER_SIZE, iters=POWER_ITERS)
    lam = 0.1
    with torch.no_grad():
        model.tau0.fill_(lam / L)
    y = torch.rand(1, 1, 16, 16, generator=gen(3), dtype=f64)
    y = y - y.mean()
    with torch.no_grad():
        z = model.sparse_code(y, None, keep_all=False)[-1]
    ista = conv_ista(y, w, lam, iters=1000)
    star = conv_ista(y, w, lam, iters=1500, fista=True)
    torch.testing.assert_close(z, ista, rtol=1e-6, atol=1e-7)  # 1000 tied layers = 1000 ISTA steps
    assert 0.05 < float((star != 0).double().mean()) < 0.9  # a sparse, non-trivial solution
    f_star, f_z = lasso(y, star, w, lam, 1), lasso(y, z, w, lam, 1)
    assert abs(f_z - f_star) <= 1e-9 * f_star, (f_z, f_star)
    assert float((z - star).abs().max()) < 1e-4


# ================================================================== untied forward = official forward


def official_forward(model: CDLNet, y: torch.Tensor, sigma: torch.Tensor, depth: int) -> torch.Tensor:
    """CDLNet.forward of the official code: pre_process, LISTA with Conv2d / ConvTranspose2d, D = B[0]."""
    cfg = model.config
    s, p = cfg.stride, (cfg.kernel_size - 1) // 2

    def pad1(n: int) -> tuple[int, int]:  # calc_pad_1D
        d = -n % s
        return d // 2, d - d // 2

    mean = y.mean(dim=(2, 3), keepdim=True)
    (top, bottom), (left, right) = pad1(y.shape[-2]), pad1(y.shape[-1])
    yp = F.pad(y - mean, (left, right, top, bottom), mode="reflect")
    c = sigma.view(-1, 1, 1, 1) / 255.0

    def tau(k: int) -> torch.Tensor:
        return model.tau0[k].view(1, -1, 1, 1) + c * model.tau1[k].view(1, -1, 1, 1)

    def a(k: int, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, model.A[k], stride=s, padding=p)

    def b(k: int, z: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(z, model.B[k], stride=s, padding=p, output_padding=s - 1)

    z = ref_soft(a(0, yp), tau(0))
    for k in range(1, depth):
        z = ref_soft(z - a(k, b(k, z) - yp), tau(k))
    x = b(0, z)
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right] + mean


@pytest.mark.parametrize("stride,kernel,h,w", [(1, 5, 21, 18), (2, 7, 23, 30), (3, 7, 19, 20)])
def test_untied_forward_equals_official_forward(stride: int, kernel: int, h: int, w: int) -> None:
    model = small(depth=4, stride=stride, kernel_size=kernel)
    g = gen(4)
    with torch.no_grad():  # untie every layer, so that a wrong layer index or a swapped A/B is caught
        for p in (model.A, model.B):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=f64))
        model.tau0.copy_(torch.rand(model.tau0.shape, generator=g, dtype=f64) * 0.05)
        model.tau1.copy_(torch.rand(model.tau1.shape, generator=g, dtype=f64) * 0.2)
    y = torch.rand(2, 1, h, w, generator=g, dtype=f64)
    sigma = torch.tensor([10.0, 45.0], dtype=f64)
    with torch.no_grad():
        got, recs = model(y, sigma), model.reconstructions(y, sigma)
        for depth in (1, 4):
            torch.testing.assert_close(recs[depth - 1], official_forward(model, y, sigma, depth),
                                       rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, recs[-1], rtol=0, atol=0)
    assert len(recs) == 4 and got.shape == y.shape


# ================================================================== noise adaptivity


def test_larger_sigma_larger_thresholds_sparser_codes() -> None:
    model = small(depth=4, filters=8)
    with torch.no_grad():
        model.tau1.fill_(0.2)
    y = torch.rand(1, 1, 32, 32, generator=gen(5), dtype=f64)
    lo, hi = torch.tensor([10.0], dtype=f64), torch.tensor([50.0], dtype=f64)
    for k in range(4):
        assert (model.thresholds(k, hi) > model.thresholds(k, lo)).all()
        torch.testing.assert_close(model.thresholds(k, hi).view(-1), model.tau0[k] + model.tau1[k] * 50 / 255)
    s_lo, s_hi = model.code_sparsity(y, lo), model.code_sparsity(y, hi)
    assert all(a > b > 0 for a, b in zip(s_lo, s_hi)), (s_lo, s_hi)
    yp, _, _ = model._prepare(y)
    with torch.no_grad():
        z_lo, z_hi = model.sparse_code(yp, lo)[0], model.sparse_code(yp, hi)[0]
    assert not ((z_hi != 0) & (z_lo == 0)).any()  # layer 0: the support shrinks


def test_non_adaptive_model_ignores_sigma() -> None:
    model = small(noise_adaptive=False)
    assert model.tau1 is None
    y = torch.rand(2, 1, 20, 20, generator=gen(6), dtype=f64)
    with torch.no_grad():
        assert torch.equal(model(y, torch.tensor([5.0, 5.0])), model(y, torch.tensor([50.0, 70.0])))
        assert torch.equal(model(y), model(y, 25.0))


def test_adaptive_thresholds_need_sigma() -> None:
    """forward fills σ in (:meth:`noise_level`); a direct call without it names what is missing."""
    with pytest.raises(ValueError, match="sigma is required"):
        small().thresholds(0, None)


def test_sigma_none_uses_the_mad_estimate() -> None:
    model = small(depth=3, filters=8)
    with torch.no_grad():
        model.tau1.fill_(0.2)
    y = torch.rand(2, 1, 24, 24, generator=gen(7), dtype=f64)
    with torch.no_grad():
        blind = model(y)
        torch.testing.assert_close(blind, model(y, estimate_sigma(y).to(f64)), rtol=0, atol=0)
        assert not torch.allclose(blind, model(y, torch.zeros(2, dtype=f64)))  # σ matters


@pytest.mark.skipif(not (SET12 / "01.png").exists(), reason="../shared/data/set12 not present")
@pytest.mark.parametrize("sigma", [15.0, 25.0, 50.0])
def test_sigma_estimate_on_a_real_image(sigma: float) -> None:
    from PIL import Image

    clean = np.asarray(Image.open(SET12 / "01.png").convert("L"), dtype=np.float32) / 255.0
    x = torch.from_numpy(clean)[None, None]
    y = x + sigma / 255.0 * torch.randn(x.shape, generator=gen(8))
    est = float(estimate_sigma(y)[0])
    assert abs(est - sigma) <= 1.0 + 0.08 * sigma, est  # MAD reads ≈2 on this clean image (texture)
    model = CDLNet(CDLNetConfig(depth=2, filters=4, kernel_size=5))
    assert float(model.noise_level(y, None)[0]) == est
    with torch.no_grad():
        torch.testing.assert_close(model(y), model(y, torch.tensor([est])), rtol=0, atol=0)


# ================================================================== training hooks


def test_project_enforces_the_constraints() -> None:
    model = small(depth=3)
    with torch.no_grad():
        model.tau0.copy_(torch.linspace(-0.1, 0.1, 18, dtype=f64).view(3, 6))
        model.tau1[1, 2] = -0.5
        model.A[1, 3].mul_(100.0)
        model.B[0, 0].mul_(100.0)  # D = B⁽⁰⁾ is projected too
    inside, big = model.A[0].clone(), model.A[1, 3].clone()
    model.project_()
    assert (model.tau0 >= 0).all() and (model.tau1 >= 0).all()
    assert float(model.tau0.detach()[2, 5]) == pytest.approx(0.1) and float(model.tau1.detach()[1, 2]) == 0.0
    for w in (model.A, model.B):
        assert (w.norm(dim=(-2, -1)) <= 1 + 1e-12).all()
    torch.testing.assert_close(model.A[1, 3], big / big.norm(), rtol=1e-12, atol=1e-14)
    assert float(model.dictionary()[0].norm()) == pytest.approx(1.0)
    assert torch.equal(model.A[0], inside)  # filters already in the ball are untouched


def test_set_depth_warm_starts_new_layers_from_the_last_trained_one() -> None:
    model = small(depth=5)
    model.set_depth(2)
    y = torch.rand(1, 1, 20, 20, generator=gen(9), dtype=f64)
    assert len(model.reconstructions(y)) == 2 and len(model.code_sparsity(y)) == 2
    with torch.no_grad():  # "training" of the two active layers
        for p in (model.A, model.B, model.tau0, model.tau1):
            p[:2].add_(0.01 * torch.randn(p[:2].shape, generator=gen(10), dtype=f64))
    first = [p[:2].clone() for p in (model.A, model.B, model.tau0, model.tau1)]
    model.set_depth(4)
    for p, before in zip((model.A, model.B, model.tau0, model.tau1), first):
        assert torch.equal(p[:2], before)
        assert torch.equal(p[2], before[1]) and torch.equal(p[3], before[1])
        assert not torch.equal(p[4], before[1])  # beyond the new depth: untouched
    assert len(model.reconstructions(y)) == 4
    with pytest.raises(ValueError, match="depth"):
        model.set_depth(6)


def test_tied_set_depth_only_changes_the_iteration_count() -> None:
    model = small(depth=6, tied=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_depth(2)
    model.set_depth(6)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.A.shape[0] == 1


# ================================================================== config and parameter count


@pytest.mark.parametrize("tied,adaptive,channels", [(False, True, 1), (True, False, 3)])
def test_parameter_formula(tied: bool, adaptive: bool, channels: int) -> None:
    K, M, P = 3, 6, 5
    model = small(depth=K, filters=M, kernel_size=P, tied=tied, noise_adaptive=adaptive, channels=channels)
    n = 1 if tied else K
    assert count_parameters(model) == 2 * n * M * channels * P * P + (2 if adaptive else 1) * n * M


def test_registry_count_is_the_paper_formula() -> None:
    cfg = CDLNetConfig()
    K, M, C, P = cfg.depth, cfg.filters, cfg.channels, cfg.kernel_size
    assert (K, M, P, cfg.stride, cfg.tied, cfg.noise_adaptive) == (20, 32, 7, 1, False, True)
    assert MODELS["cdlnet"].params == 2 * K * M * C * P * P + 2 * K * M == 62_720 + 1_280 == 64_000


def test_stride_that_leaves_pixels_uncovered_is_rejected() -> None:
    with pytest.raises(ConfigError, match="^stride"):
        CDLNetConfig(kernel_size=7, stride=5)
    with pytest.raises(ConfigError, match=r"^model\.stride"):
        dataclass_from_dict(CDLNetConfig, {"kernel_size": 7, "stride": 5}, "model")
    CDLNetConfig(kernel_size=7, stride=4)

"""Maths of the unfolded models against independent references (CPU, float64 where it matters).

Each test compares ``sparsefold.models`` with a reference written here from the definitions: the prox of
θ‖·‖₁ by brute force, the strided pair against ``F.conv2d`` / ``F.conv_transpose2d``, ‖A‖₂² from the
dense operator matrix, one CSCNet unfolding against one ISTA step, many unfoldings against a reference
FISTA solution of the LASSO, and the shift-averaging against a per-shift loop written like the
official CSCNet code (drorsimon/CSCNet, model/modules.py::ConvLista_T.split_image / forward).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsefold.models import CSCNet, CSCNetConfig, DnCNN, DnCNNConfig
from sparsefold.models.convops import (
    conv_analysis,
    conv_synthesis,
    power_method,
    shift_average,
    shift_geometry,
    shift_stack,
)
from sparsefold.models.prox import _SoftThreshold, soft_threshold

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_synthesis(weight: torch.Tensor, stride: int, h: int, w: int) -> torch.Tensor:
    """The matrix of A: codes (K, h, w) -> image (C, Ph, Pw), built column by column from unit codes."""
    k_, c, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    ph, pw = stride * (h - 1) + k, stride * (w - 1) + k
    n = k_ * h * w
    units = torch.eye(n, dtype=weight.dtype).reshape(n, k_, h, w)
    return conv_synthesis(units, weight, stride, (ph, pw)).reshape(n, c * ph * pw).T  # (C·Ph·Pw, K·h·w)


def reference_soft(v: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(v) * torch.clamp(v.abs() - theta, min=0)


# ================================================================== soft threshold = prox of θ‖·‖₁


def test_soft_threshold_is_the_prox_by_brute_force() -> None:
    g = gen(0)
    v = torch.rand(40, generator=g, dtype=f64) * 6 - 3
    theta = torch.rand(40, generator=g, dtype=f64) * 1.5 + 0.05
    step = 1e-4
    z = torch.arange(-4.0, 4.0 + step / 2, step, dtype=f64)  # fine grid, includes 0
    objective = 0.5 * (z[None, :] - v[:, None]) ** 2 + theta[:, None] * z[None, :].abs()  # (40, grid)
    brute = z[objective.argmin(dim=1)]
    for i in range(len(v)):
        got = soft_threshold(v[i : i + 1], float(theta[i]))
        assert abs(float(got) - float(brute[i])) <= step, (float(v[i]), float(theta[i]))


def test_soft_threshold_optimality_condition() -> None:
    """z = S_θ(v) iff v − z ∈ θ·∂|z|: v − z = θ·sign(z) where z ≠ 0, and |v| ≤ θ where z = 0."""
    g = gen(1)
    v = torch.randn(3, 5, 7, 9, generator=g, dtype=f64)
    theta = torch.rand(1, 5, 1, 1, generator=g, dtype=f64) * 0.8 + 0.1  # per-channel, as in CSCNet
    z = soft_threshold(v, theta)
    th = theta.expand_as(v)
    nz = z != 0
    assert nz.any() and (~nz).any()
    torch.testing.assert_close((v - z)[nz], (th * torch.sign(z))[nz], rtol=0, atol=1e-12)
    assert (v[~nz].abs() <= th[~nz]).all()
    assert (torch.sign(z[nz]) == torch.sign(v[nz])).all()
    torch.testing.assert_close(z, reference_soft(v, theta), rtol=0, atol=0)


def test_soft_threshold_float32_and_float_theta() -> None:
    v = torch.randn(2, 4, 6, 6, generator=gen(2))
    torch.testing.assert_close(soft_threshold(v, 0.3), reference_soft(v, 0.3))
    assert soft_threshold(v, 0.3).dtype == torch.float32
    assert torch.equal(soft_threshold(v, 0.0), v)


def away_from_kink(shape: tuple[int, ...], theta: torch.Tensor, seed: int, margin: float = 1e-2) -> torch.Tensor:
    """Random v with ||v| − θ| > margin everywhere (the prox is not differentiable at |v| = θ)."""
    v = torch.randn(shape, generator=gen(seed), dtype=f64)
    th = theta.expand_as(v) if theta.dim() else theta
    close = (v.abs() - th).abs() < margin
    return torch.where(close, v + torch.sign(v) * 3 * margin, v)


@pytest.mark.parametrize(
    "theta_shape",
    [(), (1, 4, 1, 1), (1, 1, 1, 1)],
    ids=["scalar", "per-channel", "keepdim-scalar"],
)
def test_soft_threshold_gradcheck(theta_shape: tuple[int, ...]) -> None:
    theta = (torch.rand(theta_shape, generator=gen(3), dtype=f64) * 0.6 + 0.2).requires_grad_()
    v = away_from_kink((2, 4, 3, 5), theta.detach(), seed=4).requires_grad_()
    assert torch.autograd.gradcheck(_SoftThreshold.apply, (v, theta), eps=1e-6, atol=1e-8)
    # The same through the public wrapper (θ cast to v's dtype).
    assert torch.autograd.gradcheck(soft_threshold, (v, theta), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("theta_shape", [(4, 1, 1), (5,), (2, 4, 3, 5)], ids=["3d", "last-dim", "elementwise"])
def test_soft_threshold_gradcheck_other_broadcasts(theta_shape: tuple[int, ...]) -> None:
    theta = (torch.rand(theta_shape, generator=gen(5), dtype=f64) * 0.6 + 0.2).requires_grad_()
    v = away_from_kink((2, 4, 3, 5), theta.detach(), seed=6).requires_grad_()
    assert torch.autograd.gradcheck(_SoftThreshold.apply, (v, theta), eps=1e-6, atol=1e-8)


def test_soft_threshold_gradcheck_negative_theta() -> None:
    """θ < 0 means no shrinkage (θ⁺ = 0): S(v) = v and ∂S/∂θ = 0 there; gradcheck agrees."""
    theta = torch.tensor([-0.1, 0.2, -0.3, 0.4], dtype=f64).view(1, 4, 1, 1).requires_grad_()
    v = away_from_kink((2, 4, 3, 5), theta.detach().abs(), seed=20)
    v = torch.where((v - theta.detach()).abs() < 1e-2, v + 0.05, v).requires_grad_()
    assert torch.autograd.gradcheck(_SoftThreshold.apply, (v, theta), eps=1e-6, atol=1e-8)


def test_soft_threshold_gradient_values() -> None:
    """∂S/∂v = 1{|v|>θ}, ∂S/∂θ = −sign(v)·1{|v|>θ}, summed over the broadcast axes of θ."""
    theta = torch.tensor([0.5, 1.0], dtype=f64).view(1, 2, 1).requires_grad_()
    v = torch.tensor([[[2.0, -0.2, -3.0], [0.7, -1.5, 4.0]]], dtype=f64, requires_grad=True)
    weights = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], dtype=f64)
    (soft_threshold(v, theta) * weights).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[[1.0, 0.0, 3.0], [0.0, 5.0, 6.0]]], dtype=f64))
    # channel 0: −(1·1 + 3·(−1)) = 2;  channel 1: −(5·(−1) + 6·1) = −1
    torch.testing.assert_close(theta.grad, torch.tensor([2.0, -1.0], dtype=f64).view(1, 2, 1))


# ================================================================== the strided convolution pair

# (kernel, stride, channels C, filters K, batch N, padded height, padded width)
PAIR_CASES = [
    (5, 2, 1, 4, 2, 17, 21),
    (7, 4, 1, 8, 1, 31, 27),
    (11, 8, 1, 6, 2, 43, 51),
    (5, 3, 3, 5, 1, 20, 26),  # colour, and sizes with (P − k) not a multiple of s: analysis floors
    (3, 1, 2, 3, 2, 9, 10),
    (4, 4, 1, 3, 1, 16, 20),  # stride == kernel: non-overlapping patches
]


@pytest.mark.parametrize("k,s,c,kf,n,ph,pw", PAIR_CASES)
def test_conv_pair_matches_torch_convolutions(k: int, s: int, c: int, kf: int, n: int, ph: int, pw: int) -> None:
    g = gen(7)
    weight = torch.randn(kf, c, k, k, generator=g, dtype=f64)
    x = torch.randn(n, c, ph, pw, generator=g, dtype=f64)
    bx = conv_analysis(x, weight, s)
    torch.testing.assert_close(bx, F.conv2d(x, weight, stride=s), rtol=1e-12, atol=1e-12)

    h, w = bx.shape[-2:]
    codes = torch.randn(n, kf, h, w, generator=g, dtype=f64)
    out_hw = (s * (h - 1) + k, s * (w - 1) + k)
    ag = conv_synthesis(codes, weight, s, out_hw)
    torch.testing.assert_close(ag, F.conv_transpose2d(codes, weight, stride=s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,c,kf,n,ph,pw", PAIR_CASES)
def test_conv_pair_adjointness(k: int, s: int, c: int, kf: int, n: int, ph: int, pw: int) -> None:
    """⟨A γ, x⟩ = ⟨γ, B x⟩ for the same weight."""
    g = gen(8)
    weight = torch.randn(kf, c, k, k, generator=g, dtype=f64)
    h, w = (ph - k) // s + 1, (pw - k) // s + 1
    out_hw = (s * (h - 1) + k, s * (w - 1) + k)
    x = torch.randn(n, c, *out_hw, generator=g, dtype=f64)
    codes = torch.randn(n, kf, h, w, generator=g, dtype=f64)
    lhs = (conv_synthesis(codes, weight, s, out_hw) * x).sum()
    rhs = (codes * conv_analysis(x, weight, s)).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * max(1.0, abs(float(lhs)))


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_conv_analysis_fused_add(alpha: float) -> None:
    g = gen(9)
    weight = torch.randn(6, 1, 7, 7, generator=g, dtype=f64)
    x = torch.randn(3, 1, 31, 35, generator=g, dtype=f64)
    bx = F.conv2d(x, weight, stride=4)
    add = torch.randn(bx.shape, generator=g, dtype=f64)
    torch.testing.assert_close(conv_analysis(x, weight, 4, add=add, alpha=alpha), add + alpha * bx,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_analysis(x, weight, 4, alpha=alpha), alpha * bx, rtol=1e-12, atol=1e-12)


def test_conv_pair_gradients() -> None:
    """Autograd through the GEMM + im2col/col2im pair, wrt inputs and weights."""
    g = gen(10)
    weight = torch.randn(3, 1, 5, 5, generator=g, dtype=f64, requires_grad=True)
    x = torch.randn(1, 1, 13, 11, generator=g, dtype=f64, requires_grad=True)
    codes = torch.randn(1, 3, 5, 4, generator=g, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, wt: conv_analysis(a, wt, 2), (x, weight))
    assert torch.autograd.gradcheck(lambda c, wt: conv_synthesis(c, wt, 2, (13, 11)), (codes, weight))


# ================================================================== power method


@pytest.mark.parametrize(
    "kf,c,k,s,size",
    [(4, 1, 5, 2, 24), (8, 1, 7, 4, 40), (6, 3, 5, 3, 23), (16, 1, 11, 8, 64)],
)
def test_power_method_matches_dense_spectral_norm(kf: int, c: int, k: int, s: int, size: int) -> None:
    weight = torch.randn(kf, c, k, k, generator=gen(11), dtype=f64)
    h = (size - k) // s + 1
    true = float(torch.linalg.matrix_norm(dense_synthesis(weight, s, h, h), ord=2) ** 2)
    # The default 50 iterations fall short by up to ~2 % on these grids (power iteration converges slowly
    # when the top of the spectrum is nearly flat); 1000 iterations reach 1e-3 on every case here.
    est = power_method(weight, s, size=size, iters=1000)
    assert abs(est - true) <= 1e-3 * true, (est, true)
    # A Rayleigh quotient never overshoots λ_max.
    assert power_method(weight, s, size=size) <= true * (1 + 1e-12)


def test_power_method_scales_quadratically() -> None:
    weight = torch.randn(5, 1, 7, 7, generator=gen(12), dtype=f64)
    a = power_method(weight, 4, size=48, iters=100)
    b = power_method(3.0 * weight, 4, size=48, iters=100)
    assert abs(b - 9.0 * a) <= 1e-9 * b


# ================================================================== CSCNet = unfolded ISTA


def small_cscnet(**kw) -> CSCNet:
    cfg = CSCNetConfig(**{**dict(depth=3, filters=8, kernel_size=5, stride=4), **kw})
    model = CSCNet(cfg).double()
    with torch.no_grad():  # distinct per-filter thresholds, to catch a wrong broadcast of θ
        model.threshold.copy_(torch.linspace(0.1, 0.3, cfg.filters, dtype=f64))
    return model


def test_cscnet_init_is_ista() -> None:
    """At init A = B = C = W/√L with ‖A‖₂ ≈ 1 (step 1/L absorbed)."""
    model = small_cscnet()
    assert torch.equal(model.A, model.B) and torch.equal(model.A, model.C)
    cfg = model.config
    assert model.threshold.shape == (cfg.filters,)
    w = model.A.detach()
    h = (40 - cfg.kernel_size) // cfg.stride + 1
    norm2_small = float(torch.linalg.matrix_norm(dense_synthesis(w, cfg.stride, h, h), ord=2) ** 2)
    norm2_big = power_method(w, cfg.stride, size=160, iters=500)
    # On a finite grid ‖A‖₂ grows with the grid toward its limit; init normalizes on 128² with 50 iterations.
    assert 0.8 < norm2_small <= norm2_big * (1 + 1e-9)
    assert abs(norm2_big - 1.0) < 0.02, norm2_big
    fresh = CSCNet(CSCNetConfig(depth=3, filters=8, kernel_size=5, stride=4, threshold_init=0.05))
    assert torch.equal(fresh.threshold.detach(), torch.full((8,), 0.05))


def test_cscnet_one_unfolding_is_one_ista_step() -> None:
    model = small_cscnet()
    s, w = model.config.stride, model.A.detach()
    theta = model.threshold.detach().view(1, -1, 1, 1)
    y = torch.rand(2, 1, 29, 23, generator=gen(13), dtype=f64)
    ys = shift_stack(y, model.config.kernel_size, s)
    with torch.no_grad():
        gammas = model.sparse_code(ys, depth=2)
    assert len(gammas) == 2
    g0 = reference_soft(F.conv2d(ys, w, stride=s), theta)  # γ_0 = S_θ(B y)
    residual = F.conv_transpose2d(g0, w, stride=s) - ys  # A γ_0 − y
    assert residual.shape == ys.shape
    g1 = reference_soft(g0 - F.conv2d(residual, w, stride=s), theta)  # γ_1 = S_θ(γ_0 − Aᵀ(Aγ_0 − y))
    torch.testing.assert_close(gammas[0], g0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gammas[1], g1, rtol=1e-10, atol=1e-12)
    assert (gammas[1] == 0).any() and (gammas[1] != 0).any()  # the threshold is active, not trivial
    # The default depth gives T = config.depth codes γ_0..γ_{T−1}.
    with torch.no_grad():
        assert len(model.sparse_code(ys)) == model.config.depth


def test_cscnet_one_unfolding_uses_separate_a_and_b() -> None:
    """After training A ≠ B: the update is γ − B(Aγ − y) (A inside, B outside), not some other pairing."""
    model = small_cscnet()
    g = gen(14)
    with torch.no_grad():
        model.A.add_(0.05 * torch.randn(model.A.shape, generator=g, dtype=f64))
        model.B.add_(0.05 * torch.randn(model.B.shape, generator=g, dtype=f64))
    s, a, b = model.config.stride, model.A.detach(), model.B.detach()
    theta = model.threshold.detach().view(1, -1, 1, 1)
    ys = torch.rand(1, 1, 25, 29, generator=g, dtype=f64)
    with torch.no_grad():
        gammas = model.sparse_code(ys, depth=2)
    g0 = reference_soft(F.conv2d(ys, b, stride=s), theta)
    g1 = reference_soft(g0 - F.conv2d(F.conv_transpose2d(g0, a, stride=s) - ys, b, stride=s), theta)
    torch.testing.assert_close(gammas[1], g1, rtol=1e-10, atol=1e-12)


def fista(m: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, iters: int) -> torch.Tensor:
    """Reference LASSO solver, min ½‖y − M z‖² + Σ θ_i |z_i|, step 1/‖M‖₂² (Beck & Teboulle 2009)."""
    lip = float(torch.linalg.matrix_norm(m, ord=2) ** 2)
    z = torch.zeros(m.shape[1], dtype=m.dtype)
    x, t = z.clone(), 1.0
    for _ in range(iters):
        z_new = reference_soft(x - m.T @ (m @ x - y) / lip, theta / lip)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        x = z_new + (t - 1) / t_new * (z_new - z)
        z, t = z_new, t_new
    return z


def test_cscnet_many_unfoldings_solve_the_lasso() -> None:
    """With A = B at init and T large, γ_{T−1} is the LASSO solution for the model's θ."""
    model = small_cscnet(depth=300)
    cfg = model.config
    kf, k, s = cfg.filters, cfg.kernel_size, cfg.stride
    p = 21
    h = (p - k) // s + 1
    mat = dense_synthesis(model.A.detach(), s, h, h)  # (P², K·h²)
    y = torch.rand(1, 1, p, p, generator=gen(15), dtype=f64)
    with torch.no_grad():
        gamma = model.sparse_code(y)[-1].reshape(-1)
    theta = model.threshold.detach().view(kf, 1, 1).expand(kf, h, h).reshape(-1)
    ref = fista(mat, y.reshape(-1), theta, iters=3000)

    def objective(z: torch.Tensor) -> float:
        return float(0.5 * ((y.reshape(-1) - mat @ z) ** 2).sum() + (theta * z.abs()).sum())

    assert 0.1 < float((ref != 0).double().mean()) < 0.9  # a genuinely sparse, non-trivial solution
    assert float((gamma - ref).abs().max()) < 1e-6
    assert objective(gamma) <= objective(ref) + 1e-10
    assert torch.equal(gamma != 0, ref != 0)


# ================================================================== shift-averaging


def official_forward(model: CSCNet, y: torch.Tensor) -> torch.Tensor:
    """CSCNet's forward written like the official ConvLista_T: one reflect-padded copy per shift (i, j),
    run separately, cropped back, averaged over the s² shifts."""
    cfg = model.config
    s, k = cfg.stride, cfg.kernel_size
    h, w = y.shape[-2:]
    top, bottom, left, right = shift_geometry(h, w, k, s)
    outs = []
    for i, j in itertools.product(range(s), range(s)):
        yp = F.pad(y, (left - j, right + j, top - i, bottom + i), mode="reflect")
        gamma = model.sparse_code(yp)[-1]
        xp = F.conv_transpose2d(gamma, model.C, stride=s)
        assert xp.shape == yp.shape
        outs.append(xp[..., top - i : top - i + h, left - j : left - j + w])
    return torch.stack(outs).mean(dim=0)


def test_shift_geometry_matches_official_pad_sizes() -> None:
    """drorsimon/CSCNet model/utils.py::calc_pad_sizes, transcribed."""
    for n, k, s in itertools.product((16, 37, 45, 64, 321, 481), (5, 7, 11), (1, 2, 4, 8)):
        if s > k:
            continue
        lead = s
        trail = (0 if (n + lead - k) % s == 0 else s - (n + lead - k) % s) + s
        top, bottom, left, right = shift_geometry(n, n + 3, k, s)
        assert (top, bottom) == (lead, trail)
        assert (n + top + bottom - k) % s == 0
        assert left == s and (n + 3 + left + right - k) % s == 0


@pytest.mark.parametrize(
    "h,w,stride,kernel,c", [(29, 23, 4, 7, 1), (32, 32, 2, 5, 1), (24, 33, 8, 11, 1), (21, 19, 3, 5, 3)]
)
def test_cscnet_forward_equals_official_shift_loop(h: int, w: int, stride: int, kernel: int, c: int) -> None:
    model = small_cscnet(depth=3, filters=6, kernel_size=kernel, stride=stride, channels=c)
    g = gen(16)
    with torch.no_grad():  # untie A, B, C so that a swapped decoder would be caught
        for p in (model.A, model.B, model.C):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=f64))
    y = torch.rand(2, c, h, w, generator=g, dtype=f64)
    with torch.no_grad():
        got, want = model(y), official_forward(model, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("h,w,stride,kernel", [(37, 45, 4, 7), (32, 32, 8, 11), (20, 17, 3, 3), (9, 12, 1, 3)])
def test_shift_stack_windows_and_round_trip(h: int, w: int, stride: int, kernel: int) -> None:
    y = torch.rand(2, 3, h, w, generator=gen(17), dtype=f64)
    stacked = shift_stack(y, kernel, stride)
    top, bottom, left, right = shift_geometry(h, w, kernel, stride)
    assert stacked.shape == (2 * stride * stride, 3, h + top + bottom, w + left + right)
    windows = stacked.reshape(2, stride, stride, 3, *stacked.shape[-2:])
    for i, j in itertools.product(range(stride), range(stride)):  # shift index = i·s + j
        ref = F.pad(y, (left - j, right + j, top - i, bottom + i), mode="reflect")
        assert torch.equal(windows[:, i, j], ref), (i, j)
    # identity network: averaging s² identical copies gives y back (up to the rounding of the mean)
    torch.testing.assert_close(shift_average(stacked, h, w, kernel, stride), y, rtol=1e-14, atol=1e-15)


def test_shift_average_weights_every_shift_equally() -> None:
    """Shift (i, j) filled with the constant i·s + j averages to the mean index (s² − 1)/2 everywhere."""
    s, k, h, w = 4, 7, 13, 18
    top, bottom, left, right = shift_geometry(h, w, k, s)
    x = torch.arange(s * s, dtype=f64).view(s * s, 1, 1, 1).expand(s * s, 1, h + top + bottom, w + left + right)
    torch.testing.assert_close(shift_average(x, h, w, k, s), torch.full((1, 1, h, w), (s * s - 1) / 2, dtype=f64))


# ================================================================== DnCNN


def test_dncnn_is_residual() -> None:
    """x̂ = y − f(y): with the last convolution zeroed, f ≡ 0 and the output is the input."""
    torch.manual_seed(0)
    model = DnCNN(DnCNNConfig(depth=5, features=8))
    last = model.body[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.out_channels == 1
    y = torch.rand(2, 1, 19, 23, generator=gen(18))
    assert not torch.equal(model.eval()(y), y)
    with torch.no_grad():
        last.weight.zero_()
    for mode in (model.train(), model.eval()):
        assert torch.equal(mode(y), y)


def test_dncnn_subtracts_the_predicted_noise() -> None:
    """The body predicts the noise v and the model returns y − v (not y + v, not v)."""
    torch.manual_seed(0)
    model = DnCNN(DnCNNConfig(depth=5, features=8)).eval()
    y = torch.rand(2, 1, 19, 23, generator=gen(19))
    with torch.no_grad():
        v = model.body(y)
        assert v.abs().max() > 1e-3
        torch.testing.assert_close(model(y), y - v, rtol=0, atol=0)


@pytest.mark.parametrize("k, s", [(7, 2), (11, 8), (5, 1)])
def test_conv_analysis_gemm_path_equals_conv2d(k: int, s: int) -> None:
    """With autograd on, B runs as im2col + batched GEMM; without, as F.conv2d. Both must agree."""
    g = gen(31)
    weight = torch.randn(5, 1, k, k, generator=g, dtype=f64, requires_grad=True)
    x = torch.randn(2, 1, 3 * k + 2, 2 * k + 5, generator=g, dtype=f64, requires_grad=True)
    add = torch.randn(F.conv2d(x, weight, stride=s).shape, generator=g, dtype=f64)
    gemm = conv_analysis(x, weight, s, add=add, alpha=-0.5)
    with torch.no_grad():
        fast = conv_analysis(x, weight, s, add=add, alpha=-0.5)
    torch.testing.assert_close(gemm.detach(), fast, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, add - 0.5 * F.conv2d(x, weight, stride=s).detach(), rtol=1e-12, atol=1e-12)

"""ADMM-Net against references written from the definitions (CPU, float64, small images, one thread).

The reconstruction layer is checked to solve its linear system, with AᵀA from the operator and the filters as
explicit circular convolutions (``F.conv2d`` on circularly padded images, adjoints by autograd), for MRI masks
symmetric or not, with and without the DC sample, and the identity; the PLF at init against the soft
threshold; the network at init against ADMM written here with dense matrices (one stage, T stages), and that
ADMM against its own convergence; then shapes, gradients, the operator checks, the config and the formula.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsefold.errors import ConfigError
from sparsefold.models import MODELS, build_model, count_parameters
from sparsefold.models.admmnet import ADMMNet, ADMMNetConfig, dct_basis, plf
from sparsefold.models.operators import (
    MRI,
    Identity,
    Inpainting,
    Operator,
    cartesian_mask,
    radial_mask,
    random_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

f64 = torch.float64
SHAPE = (2, 1, 12, 11)  # one odd side


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact(**kw) -> ADMMNet:
    """A grid of spacing 1/32 on [−1, 1] and θ = 1/32 on it (every p_i and q_i exact in binary), η = 1: at
    init every stage is one ADMM iteration."""
    cfg = dict(depth=1, control_points=65, control_range=1.0, threshold_init=0.03125, rho_init=0.5, eta_init=1.0)
    return ADMMNet(ADMMNetConfig(**{**cfg, **kw})).double()


def mri(kind: str, h: int = SHAPE[2], w: int = SHAPE[3]) -> Operator:
    if kind == "identity":
        return Identity()
    if kind == "cartesian":
        return MRI(cartesian_mask(h, w, 0.4, gen(2)))
    if kind == "radial":
        return MRI(radial_mask(h, w, 0.3))
    mask = random_mask((SHAPE[0], 1, h, w), 0.4, gen(3))  # per sample, not conjugate-symmetric
    mask[..., 0, 0] = 1.0 if kind == "random" else 0.0
    return MRI(mask)


KINDS = ["identity", "cartesian", "radial", "random", "random_no_dc"]


def image(seed: int = 0) -> torch.Tensor:
    """SHAPE images in [0, 1]: a ramp and a disc of random levels, plus a little texture."""
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SHAPE[2], dtype=f64), torch.linspace(-1, 1, SHAPE[3], dtype=f64),
                            indexing="ij")
    a = torch.rand(SHAPE[0], 4, generator=g, dtype=f64).view(SHAPE[0], 1, 4, 1, 1)
    disc = ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.35).to(f64)
    x = 0.3 + 0.3 * a[:, :, 0] * xx + 0.2 * a[:, :, 1] * yy + 0.4 * a[:, :, 2] * disc
    return (x + 0.1 * torch.randn(SHAPE, generator=g, dtype=f64)).clamp(0, 1)


def measurement(op: Operator, seed: int = 0) -> torch.Tensor:
    y = op.A(image(seed))
    noise = 0.03 * torch.randn(y.shape, generator=gen(seed + 10), dtype=f64)
    return y + (torch.complex(noise, noise.flip(-1)) if y.is_complex() else noise)


# ================================================================== references


def circ(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(H_l x)[i, j] = Σ_{u,v} f_l[u, v]·x[i + u − p, j + v − p], indices mod (H, W): x (N, 1, H, W), f (L, k, k)."""
    p = f.shape[-1] // 2
    return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), f.unsqueeze(1))


def circ_t(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Σ_l H_lᵀ v_l, by autograd through :func:`circ` (no adjoint written): v (N, L, H, W) -> (N, 1, H, W)."""
    x = torch.zeros(v.shape[0], 1, *v.shape[-2:], dtype=v.dtype, requires_grad=True)
    (grad,) = torch.autograd.grad((circ(x, f) * v).sum(), x)
    return grad


def dense(fn, h: int, w: int) -> torch.Tensor:
    """The matrix (out, h·w) of a linear map of one (1, 1, h, w) image, column j = fn(e_j) flattened."""
    eye = torch.eye(h * w, dtype=f64).view(h * w, 1, h, w)
    return fn(eye).reshape(h * w, -1).T


def soft(v: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.sign(v) * torch.clamp(v.abs() - tau, min=0)


def sample_op(op: Operator, i: int) -> Operator:
    return op if isinstance(op, Identity) or op.mask.shape[0] == 1 else MRI(op.mask[i:i + 1])


def admm(y: torch.Tensor, op: Operator, f: torch.Tensor, rho: torch.Tensor, theta: float, iters: int):
    """Scaled ADMM on ½‖A x − y‖² + Σ_l θρ_l ‖H_l x‖₁ (z_l = H_l x, η = 1), dense, per sample: returns the
    x's [x⁽¹⁾, .., x⁽ⁱᵗᵉʳˢ⁺¹⁾] (each (B, 1, H, W)) and the last (z, H x)."""
    b, (h, w), L = y.shape[0], y.shape[-2:], f.shape[0]
    aty = op.A_adjoint(y).reshape(b, h * w)
    Hs = dense(lambda e: circ(e, f), h, w).reshape(L, h * w, h * w)  # H_l: (L, N, N)
    xs, zs, cs = [], [], []
    for i in range(b):
        AtA = dense(sample_op(op, i).AtA, h, w)
        K = AtA + torch.einsum("l,lji,ljk->ik", rho, Hs, Hs)  # AᵀA + Σ ρ HᵀH
        z = beta = torch.zeros(L, h * w, dtype=f64)
        out = []
        for _ in range(iters + 1):
            x = torch.linalg.solve(K, aty[i] + torch.einsum("l,lji,lj->i", rho, Hs, z - beta))
            out.append(x)
            c = Hs @ x
            z_next = soft(c + beta, theta)
            beta, z = beta + c - z_next, z_next
        xs.append(torch.stack(out))
        zs.append(z)
        cs.append(Hs @ out[-2])  # H x of the last z-update
    return [x.view(b, 1, h, w) for x in torch.stack(xs, 1)], torch.stack(zs), torch.stack(cs)


def objective(x: torch.Tensor, y: torch.Tensor, op: Operator, f: torch.Tensor, lam: torch.Tensor) -> float:
    return float(0.5 * (op.A(x) - y).abs().square().sum() + (lam.view(1, -1, 1, 1) * circ(x, f).abs()).sum())


# ================================================================== the reconstruction layer (Eq. 1)


@pytest.mark.parametrize("kind", KINDS)
def test_x_layer_solves_its_linear_system(kind: str) -> None:
    """(AᵀA + Σ ρ_l H_lᵀH_l) x = Aᵀy + Σ ρ_l H_lᵀ(z_l − β_l) with random filters and ρ; without the DC sample
    (zero-mean filters: a singular system) the minimum-norm solution, of zero mean."""
    model, op = exact(filters=6, kernel_size=5), mri(kind)
    g = gen(4)
    with torch.no_grad():
        model.H.copy_(torch.randn(model.H.shape, generator=g, dtype=f64))
        model.rho.copy_(torch.rand(model.rho.shape, generator=g, dtype=f64) + 0.05)
    y, (h, w) = measurement(op), SHAPE[-2:]
    aty = op.A_adjoint(y)
    v = torch.randn(SHAPE[0], 6, h, w, generator=g, dtype=f64)  # z − β
    with torch.no_grad():
        x = model.x_layer(1, torch.fft.rfft2(aty), model.gram(op, aty), v, (h, w))
    f, rho = model.filters(model.H[1]).detach(), model.rho[1].detach().view(1, -1, 1, 1)
    rhs = aty + circ_t(rho * v, f)
    residual = op.AtA(x) + circ_t(rho * circ(x, f), f) - rhs
    assert float(residual.norm()) < 1e-10 * float(rhs.norm())
    if kind == "random_no_dc":
        assert float(x.mean((-2, -1)).abs().max()) < 1e-12
    else:  # the x of a nonsingular system: no other solution
        assert float(x.mean((-2, -1)).abs().min()) > 1e-3


def test_dct_basis_is_orthonormal_zero_mean_in_the_officials_order() -> None:
    B = dct_basis(3)
    torch.testing.assert_close(torch.einsum("mij,nij->mn", B, B), torch.eye(8, dtype=f64), rtol=0, atol=1e-14)
    assert float(B.sum((1, 2)).abs().max()) < 1e-14
    c1 = (2 / 3) ** 0.5 * torch.cos(torch.pi * torch.tensor([1.0, 3.0, 5.0], dtype=f64) / 6)  # dctmtx(3)(2, :)
    torch.testing.assert_close(B[0], (c1 / 3 ** 0.5).view(3, 1).expand(3, 3))  # (a, b) = (0, 1): C[0, c]·C[1, r]
    torch.testing.assert_close(B[2], (c1 / 3 ** 0.5).view(1, 3).expand(3, 3))  # (1, 0): C[1, c]·C[0, r]


# ================================================================== the nonlinear layer (Eq. 5)


def test_plf_at_init_is_the_soft_threshold_and_differentiable_in_q() -> None:
    model = exact()
    q = model.q[0].detach()  # (8, 65)
    v = torch.cat((torch.linspace(-3, 3, 2001, dtype=f64), torch.linspace(-1, 1, 65, dtype=f64),
                   torch.tensor([-0.05, 0.05], dtype=f64)))
    v = v.view(1, 1, 1, -1).expand(2, 8, 1, -1)
    torch.testing.assert_close(plf(v, q, 1.0), soft(v, 0.03125), rtol=0, atol=1e-15)
    default = ADMMNet(ADMMNetConfig()).double()  # θ = 0.05 off the 0.02 grid: S's interpolant
    gap = (plf(v, default.q[0].detach(), 1.0) - soft(v, 0.05)).abs()
    assert float(gap.max()) == pytest.approx(0.005, abs=1e-8)  # at ±θ, the middle of [0.04, 0.06]
    assert float(gap[(v.abs() - 0.05).abs() > 0.01].max()) < 1e-7  # equal away from the kinks (q in float32)
    qg = q.clone().requires_grad_()
    point = torch.tensor([-2.0, 0.3, 1.7], dtype=f64).view(1, 1, 1, 3).expand(1, 8, 1, 3)
    (grad,) = torch.autograd.grad(plf(point, qg, 1.0)[0, 2].sum(), qg)
    want = torch.zeros(8, 65, dtype=f64)
    want[2, 0], want[2, 64] = 1.0, 1.0  # outside: the end values
    k, t = divmod(1.3 * 32, 1)  # 0.3 = p_41 + 0.6·δ
    want[2, int(k)], want[2, int(k) + 1] = 1 - t, t
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)
    inputs = (torch.tensor([[-1.5, -0.4, 0.01, 0.77, 2.2]], dtype=f64).view(1, 1, 1, 5).requires_grad_(),
              torch.randn(1, 65, generator=gen(0), dtype=f64).requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: plf(a, b, 1.0), inputs)


# ================================================================== the network at init = ADMM


@pytest.mark.parametrize("kind", ["identity", "cartesian", "random"])
@pytest.mark.parametrize("T", [1, 4])
def test_T_stages_at_init_are_T_admm_iterations(kind: str, T: int) -> None:
    """H = D = the DCT atoms, η = 1, θ on the grid, every stage's weights equal: x̂ = x⁽ᵀ⁺¹⁾ of ADMM."""
    model, op = exact(depth=T), mri(kind)
    assert all(torch.equal(model.H[0], h) for h in model.H) and torch.equal(model.H[:T], model.D)
    y = measurement(op)
    f = model.filters(model.H[0]).detach()
    xs, z, c = admm(y, op, f, model.rho[0].detach(), 0.03125, T)
    with torch.no_grad():
        out = model(y, op=op)
    torch.testing.assert_close(out, xs[-1], rtol=1e-10, atol=1e-12)
    assert 0.1 < float((z == 0).double().mean()) < 0.9  # the threshold is active
    assert float((xs[-1] - xs[0]).norm()) > 1e-3 * float(xs[0].norm())  # the stages move x


@pytest.mark.parametrize("kind", ["identity", "cartesian"])
def test_admm_converges_and_the_net_follows_it(kind: str) -> None:
    """The reference ADMM drives H x − z to 0 and the objective to a plateau below its start; for A = I (a
    strictly convex problem) two penalties ρ reach the same minimizer; a 30-stage net at init is ADMM's 30."""
    model, op = exact(depth=30), mri(kind)
    y = measurement(op)
    f, rho = model.filters(model.H[0]).detach(), model.rho[0].detach()
    lam = 0.03125 * rho
    xs, z, c = admm(y, op, f, rho, 0.03125, 600)
    obj = [objective(x, y, op, f, lam) for x in xs]
    assert obj[-1] < 0.9 * obj[0]
    assert 0 <= obj[-100] - obj[-1] < 2e-5 * obj[0]  # measured 2.4e-6 (identity), 7e-6 (cartesian)
    assert float((c - z).norm()) < 1e-4 * float(c.norm())
    if kind == "identity":
        other, *_ = admm(y, op, f, 2 * rho, 0.015625, 600)  # λ = θρ unchanged
        torch.testing.assert_close(other[-1], xs[-1], rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(y, op=op), xs[30], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["identity", "cartesian", "random"])
def test_tv_init_is_admm_on_anisotropic_tv(kind: str) -> None:
    """filter_init="tv": H_1 = D_1 = ∂_h, H_2 = D_2 = ∂_v (circular forward differences), ρ_l = 0 for the
    other filters: 3 stages at init are 3 ADMM iterations on ½‖A x − y‖² + θρ (‖∂_h x‖₁ + ‖∂_v x‖₁)."""
    model, op = exact(depth=3, filter_init="tv"), mri(kind)
    f, x = model.filters(model.H[0]).detach(), image()
    torch.testing.assert_close(circ(x, f[:2]), torch.cat((x.roll(-1, -1) - x, x.roll(-1, -2) - x), 1),
                               rtol=0, atol=1e-7)  # γ filled in float32 before .double()
    assert bool((model.rho[:, 2:] == 0).all() and (model.rho[:, :2] == 0.5).all())
    assert torch.equal(model.H[:3], model.D) and torch.equal(model.H[1:], model.H[:-1])
    y = measurement(op)
    xs, z, _ = admm(y, op, f[:2], model.rho[0, :2].detach(), 0.03125, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(y, op=op), xs[-1], rtol=1e-10, atol=1e-12)
    assert 0.1 < float((z == 0).double().mean()) < 0.95  # the threshold is active


# ================================================================== shapes, gradients, operators


def test_mri_forward_shapes_and_gradients_reach_every_parameter() -> None:
    model = ADMMNet(ADMMNetConfig(depth=2))
    op = MRI(cartesian_mask(17, 15, 0.4, gen(1)))
    x = torch.rand(2, 1, 17, 15, generator=gen(2))
    y = op.A(x)
    assert y.is_complex() and y.shape == (2, 1, 17, 15)
    out = model(y, op=op)
    assert out.shape == x.shape and out.dtype == torch.float32
    ((out - x) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.isfinite().all()), name
        assert float(p.grad.abs().sum()) > 0, name
    with torch.no_grad():
        assert model(x).shape == x.shape and torch.equal(model(x), model(x, op=Identity()))
        assert model(MRI(radial_mask(17, 15, 0.3)).A(x), op=MRI(radial_mask(17, 15, 0.3))).shape == x.shape


def test_unsupported_operators_and_sizes_are_one_line_errors() -> None:
    model = ADMMNet(ADMMNetConfig(depth=1, kernel_size=5))
    x = torch.rand(1, 1, 8, 8)
    op = Inpainting(torch.ones(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="^op: .*identity .* MRI .*not inpainting"):
        model(op.A(x), op=op)
    with pytest.raises(ConfigError, match="^y: "):
        model(torch.rand(1, 1, 4, 9))


# ================================================================== config


def test_config_validation_parameter_count_and_projection() -> None:
    for bad in (dict(kernel_size=4), dict(kernel_size=1), dict(depth=0), dict(channels=3), dict(filters=0),
                dict(control_points=1), dict(control_range=0.0), dict(threshold_init=-1.0), dict(rho_init=-0.1),
                dict(filter_init="haar"), dict(filters=1, filter_init="tv")):
        with pytest.raises(ConfigError, match="^" + next(iter(bad))):
            ADMMNetConfig(**bad)
    n = count_parameters(build_model(ADMMNetConfig()))
    assert n == MODELS["admmnet"].params == 16 * 8 * (8 + 1) + 15 * 8 * (8 + 101 + 1) == 14_352
    assert count_parameters(ADMMNet(ADMMNetConfig(depth=3, filters=4, kernel_size=5), init=False)) == \
        4 * 4 * 25 + 3 * 4 * (24 + 101 + 1)
    model = ADMMNet(ADMMNetConfig(depth=2))
    with torch.no_grad():
        model.rho.sub_(1.0)
    model.project_()
    assert bool((model.rho == 0).all())
    assert model.dictionary().shape == (8, 1, 3, 3)

"""Maths of the patch-based unfolded models (LISTA on patches, Deep K-SVD) against references written here.

References: the patch operators by explicit loops over patches, the overcomplete DCT as in the official
Deep K-SVD ``init_dct`` (numpy, column-major reorder), the LASSO optimality conditions, and the ISTA/FISTA
solvers of ``models/lista.py`` (themselves checked against the optimality conditions first).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsefold.config import ConfigError
from sparsefold.models import MODELS, build_model, count_parameters
from sparsefold.models._patches import aggregate_patches, extract_patches, fold_patches, overcomplete_dct
from sparsefold.models.deep_ksvd import DeepKSVD, DeepKSVDConfig
from sparsefold.models.lista import LISTA, LISTAConfig, initial_dictionary, ista, lasso_objective
from sparsefold.models.prox import soft_threshold

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loop_aggregate(x: torch.Tensor, p: int, patch_fn, weight: torch.Tensor) -> torch.Tensor:
    """Σ_k R_kᵀ(w⊙f(R_k x)) / Σ_k R_kᵀ w by an explicit loop over patch positions; x (C, H, W)."""
    c, h, w = x.shape
    num, den = torch.zeros_like(x), torch.zeros_like(x)
    for i in range(h - p + 1):
        for j in range(w - p + 1):
            out = patch_fn(x[:, i:i + p, j:j + p].reshape(-1)).reshape(c, p, p)
            num[:, i:i + p, j:j + p] += weight * out
            den[:, i:i + p, j:j + p] += weight
    return num / den


# ================================================================== patch operators


@pytest.mark.parametrize("c,h,w,p", [(1, 9, 11, 4), (3, 8, 8, 3), (2, 7, 13, 7)])
def test_patch_extraction_and_fold_are_adjoint(c: int, h: int, w: int, p: int) -> None:
    x = torch.randn(2, c, h, w, generator=gen(0), dtype=f64)
    P = torch.randn(2, (h - p + 1) * (w - p + 1), c * p * p, generator=gen(1), dtype=f64)
    Rx = extract_patches(x, p)
    assert Rx.shape == P.shape
    torch.testing.assert_close((Rx * P).sum(), (x * fold_patches(P, (h, w), p)).sum(), rtol=1e-12, atol=1e-12)
    # R_k is the (i, j) window, channel-major.
    k, i, j = 5, 5 // (w - p + 1), 5 % (w - p + 1)
    torch.testing.assert_close(Rx[1, k], x[1, :, i:i + p, j:j + p].reshape(-1))


@pytest.mark.parametrize("value", [1.0, 0.37])
def test_aggregation_inverts_extraction_on_a_constant_mask(value: float) -> None:
    x = torch.rand(2, 3, 10, 13, generator=gen(2), dtype=f64)
    for weight in (None, torch.full((16,), value, dtype=f64), torch.full((3 * 16,), value, dtype=f64)):
        torch.testing.assert_close(aggregate_patches(extract_patches(x, 4), weight, (10, 13)), x, rtol=0, atol=1e-14)


def test_weighted_aggregation_matches_a_loop() -> None:
    x = torch.randn(1, 6, 7, generator=gen(3), dtype=f64)
    weight = torch.rand(3, 3, generator=gen(4), dtype=f64) + 0.5
    f = lambda v: torch.sin(3 * v.flip(-1)) + v.mean(-1, keepdim=True)  # noqa: E731 - mixes each patch
    got = aggregate_patches(f(extract_patches(x[None], 3)), weight, (6, 7))[0]
    torch.testing.assert_close(got, loop_aggregate(x, 3, f, weight))
    # The patches disagree on shared pixels, so the mask matters (unlike plain averaging).
    assert not torch.allclose(got, aggregate_patches(f(extract_patches(x[None], 3)), None, (6, 7))[0])


def test_patch_larger_than_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="smaller"):
        extract_patches(torch.zeros(1, 1, 5, 9), 6)


def official_init_dct(n: int, m: int) -> np.ndarray:
    """meyerscetbon/Deep-K-SVD ``Deep_KSVD.init_dct``, re-typed from its definition."""
    d = np.zeros((n, m))
    for k in range(m):
        v = np.cos(np.arange(n) * k * np.pi / m)
        if k > 0:
            v = v - v.mean()
        d[:, k] = v / np.linalg.norm(v)
    d = np.kron(d, d)
    d = d / np.sqrt((d ** 2).sum(axis=0))
    idx = np.arange(n * n).reshape(n, n, order="F").reshape(n * n, order="C")
    return d[idx, :]


def test_overcomplete_dct_matches_the_official_construction() -> None:
    got = overcomplete_dct(8, 16, dtype=f64)
    np.testing.assert_allclose(got.numpy(), official_init_dct(8, 16), atol=1e-12)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(256, dtype=f64))
    # Atom (k₁, k₂) = column k₁·q + k₂ oscillates k₁ times along the patch columns j (after the reorder).
    atom = got[:, 1 * 16 + 0].reshape(8, 8)
    torch.testing.assert_close(atom, atom[0:1].expand(8, 8))


def test_dictionary_atoms_have_the_patch_layout() -> None:
    for model in (LISTA(LISTAConfig(channels=3, atoms=3 * 64, patch_size=5)), DeepKSVD(DeepKSVDConfig())):
        atoms = model.dictionary()  # (K, C, p, p)
        for k in (0, 17, atoms.shape[0] - 1):
            torch.testing.assert_close(extract_patches(atoms[k][None], atoms.shape[-1])[0, 0], model.D[:, k].detach())


# ================================================================== the reference solvers


def random_lasso(seed: int, m: int = 20, k: int = 50, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, float]:
    D = torch.randn(m, k, generator=gen(seed), dtype=f64)
    D = D / D.norm(dim=0)
    y = torch.randn(n, m, generator=gen(seed + 1), dtype=f64)
    return D, y, 0.3


def test_fista_solution_satisfies_the_lasso_optimality_conditions() -> None:
    """0 ∈ Dᵀ(Dz − y) + λ∂‖z‖₁: Dᵀ(y − Dz) = λ·sign(z) on the support, |Dᵀ(y − Dz)| ≤ λ off it."""
    D, y, lam = random_lasso(0)
    z = ista(D, y, lam, 3000, fista=True)
    corr = (y - z @ D.T) @ D  # (N, K)
    on = z != 0
    assert on.any() and (~on).any()
    torch.testing.assert_close(corr[on], lam * torch.sign(z[on]), rtol=0, atol=1e-6)
    assert (corr[~on].abs() <= lam + 1e-6).all()


def test_fista_converges_faster_than_ista() -> None:
    D, y, lam = random_lasso(1, m=30, k=90, n=8)
    best = lasso_objective(D, y, ista(D, y, lam, 5000, fista=True), lam).sum()
    gap = {f: float(lasso_objective(D, y, ista(D, y, lam, 60, fista=f), lam).sum() - best) for f in (False, True)}
    assert 0 <= gap[True] < 0.1 * gap[False], gap


def test_ista_one_step_is_the_prox_gradient_step() -> None:
    D, y, lam = random_lasso(2)
    z0 = torch.randn(6, 50, generator=gen(3), dtype=f64)
    L = float(torch.linalg.svdvals(D)[0]) ** 2
    expected = torch.sign(v := z0 + (y - z0 @ D.T) @ D / L) * torch.clamp(v.abs() - lam / L, min=0)
    torch.testing.assert_close(ista(D, y, lam, 1, z0=z0), expected)


# ================================================================== LISTA at initialization = ISTA


def centered_patches(model: LISTA, y: torch.Tensor) -> torch.Tensor:
    return model._centered_patches(y)[0]


@pytest.mark.parametrize("init", ["dct", "random"])
def test_lista_one_layer_is_one_ista_step(init: str) -> None:
    cfg = LISTAConfig(patch_size=4, atoms=64, depth=1, dictionary_init=init, lam=0.05)
    model = LISTA(cfg).double()
    D0 = initial_dictionary(init, 16, 64, 1, cfg.init_seed).double()
    torch.testing.assert_close(model.D.detach(), D0)
    yc = centered_patches(model, torch.rand(2, 1, 9, 10, generator=gen(4), dtype=f64))
    z = model.sparse_code(yc)
    assert len(z) == 1
    torch.testing.assert_close(z[0], ista(D0, yc, cfg.lam, 1), rtol=0, atol=1e-7)  # fp32-stored weights


@pytest.mark.parametrize("tied", [True, False])
def test_lista_forward_at_init_is_patchwise_ista_with_dc_and_averaging(tied: bool) -> None:
    """The whole denoiser against a loop: per patch, remove the mean, T ISTA steps, decode, add the mean,
    average the overlapping patches."""
    cfg = LISTAConfig(patch_size=4, atoms=3 * 25, channels=3, depth=3, tied=tied, lam=0.02)
    model = LISTA(cfg).double()
    D0 = model.D.detach()
    x = torch.rand(3, 7, 8, generator=gen(5), dtype=f64)

    def patch_fn(v: torch.Tensor) -> torch.Tensor:
        mu = v.view(3, 16).mean(dim=1, keepdim=True)  # per-channel DC
        z = ista(D0, (v.view(3, 16) - mu).reshape(1, -1), cfg.lam, cfg.depth)
        return (z @ D0.T).view(3, 16) + mu

    torch.testing.assert_close(model(x[None])[0], loop_aggregate(x, 4, patch_fn, torch.ones(4, 4, dtype=f64)))


def test_tied_lista_with_many_layers_reaches_the_lasso_solution() -> None:
    """500 tied layers at init = 500 ISTA steps: the LASSO minimizer of a long FISTA run. A random unit-norm
    dictionary (2× overcomplete, unique solution); the 4× overcomplete DCT is too coherent for ISTA to reach
    the codes in a few hundred steps (its objective gap is still ~1e-3 after 1000)."""
    cfg = LISTAConfig(patch_size=4, atoms=32, depth=500, lam=0.2, dictionary_init="random", init_seed=1)
    model = LISTA(cfg)  # float32, as trained
    yc = centered_patches(model, torch.rand(1, 1, 10, 10, generator=gen(6)))  # (49, 16)
    D, yd = model.D.detach().double(), yc.double()
    z_star = ista(D, yd, cfg.lam, 5000, fista=True)
    with torch.no_grad():
        codes = model.sparse_code(yc)
    f_star = lasso_objective(D, yd, z_star, cfg.lam)

    def gap(z: torch.Tensor) -> float:
        return float(((lasso_objective(D, yd, z.double(), cfg.lam) - f_star) / f_star).max())

    assert gap(codes[-1]) < 1e-6
    torch.testing.assert_close(codes[-1].double(), z_star, rtol=0, atol=1e-4)
    assert ((codes[-1] != 0) == (z_star != 0)).all()  # the same support
    assert gap(codes[4]) > 1e-2  # ... while 5 layers are far from it: the test tells converged from early codes


# ================================================================== LISTA depth growth


def test_untied_set_depth_growth_keeps_the_trained_prefix() -> None:
    model = LISTA(LISTAConfig(patch_size=4, atoms=16, depth=5, tied=False))
    model.set_depth(2)
    with torch.no_grad():  # stand-in for training the first two layers: move every parameter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen(7)))
    y = torch.rand(2, 1, 9, 9, generator=gen(8))
    before = [r.detach() for r in model.reconstructions(y)]
    assert len(before) == 2
    model.set_depth(5)
    after = model.reconstructions(y)
    assert len(after) == 5
    for a, b in zip(after[:2], before):
        assert torch.equal(a.detach(), b)
    for t in (2, 3, 4):  # new layers start as copies of the last trained one
        assert torch.equal(model.W_e[t], model.W_e[1]) and torch.equal(model.threshold[t], model.threshold[1])
        assert torch.equal(model.S[t - 1], model.S[0])
    assert not torch.equal(after[2], after[1])  # the copied layer still acts: z_3 = S_θ(W_e y + S z_2) ≠ z_2
    with pytest.raises(ValueError, match="depth"):
        model.set_depth(6)


def test_untied_layers_use_their_own_weights() -> None:
    """Eq. (1)-(2) with distinct per-layer (W_e,t, S_t, θ_t), written out layer by layer."""
    model = LISTA(LISTAConfig(patch_size=4, atoms=16, depth=3, tied=False)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen(13), dtype=f64))
    yc = centered_patches(model, torch.rand(1, 1, 6, 7, generator=gen(14), dtype=f64))
    W, S, th = model.W_e.detach(), model.S.detach(), model.threshold.detach()
    z1 = soft_threshold(yc @ W[0].T, th[0])
    z2 = soft_threshold(yc @ W[1].T + z1 @ S[0].T, th[1])
    z3 = soft_threshold(yc @ W[2].T + z2 @ S[1].T, th[2])
    for got, ref in zip(model.sparse_code(yc), (z1, z2, z3)):
        torch.testing.assert_close(got, ref)


def test_untied_growth_from_one_layer_keeps_the_ista_s() -> None:
    model = LISTA(LISTAConfig(patch_size=4, atoms=16, depth=3, tied=False))
    s_init = model.S.detach().clone()
    model.set_depth(1)
    with torch.no_grad():
        model.W_e.mul_(1.5)
    model.set_depth(3)
    assert torch.equal(model.S, s_init) and torch.equal(model.W_e[2], model.W_e[0])


def test_lista_parameter_counts() -> None:
    assert count_parameters(LISTA(LISTAConfig())) == 256 * 64 + 256 ** 2 + 256 + 64 * 256 == MODELS["lista"].params
    untied = LISTA(LISTAConfig(tied=False))
    assert count_parameters(untied) == 5 * 256 * 64 + 4 * 256 ** 2 + 5 * 256 + 64 * 256 == 361_728


def test_lista_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="^atoms"):
        LISTAConfig(atoms=200)  # not a square for the DCT
    with pytest.raises(ConfigError, match="^dictionary_init"):
        LISTAConfig(dictionary_init="ksvd")
    LISTAConfig(atoms=200, dictionary_init="random")  # any K for a random dictionary


# ================================================================== Deep K-SVD


def test_deep_ksvd_default_is_the_official_model() -> None:
    model = build_model(DeepKSVDConfig())
    assert count_parameters(model) == 16_384 + 18_689 + 1 + 64 == 35_138 == MODELS["deep_ksvd"].params
    assert [m.out_features for m in model.mlp if isinstance(m, torch.nn.Linear)] == [128, 64, 32, 1]
    torch.testing.assert_close(model.D.detach(), overcomplete_dct(8, 16))
    assert abs(float(model.c.detach()) - float(torch.linalg.matrix_norm(model.D.detach().double(), ord=2)) ** 2) < 1e-4
    assert model.config.depth == 5


def deep_ksvd_reference(model: DeepKSVD, v: torch.Tensor) -> torch.Tensor:
    """One patch v (m,) in [−1, 1]: λ from the model's MLP, z_0 = S_{λ/L}(Dᵀv), then T ISTA steps of the
    reference solver (step 1/L, L = ‖D‖²₂ = c at init), x̂ = clamp(D z, −1, 1)."""
    D = model.D.detach()
    lam = model.mlp(v[None]).detach().clamp_min(0)  # (1, 1)
    L = float(torch.linalg.matrix_norm(D, ord=2)) ** 2
    z0 = soft_threshold(v[None] @ D, lam / L)
    z = ista(D, v[None], lam, model.config.depth, z0=z0)
    return torch.clamp(z @ D.T, -1, 1)[0]


def test_deep_ksvd_at_init_is_the_ista_unfolding_on_one_patch() -> None:
    model = DeepKSVD(DeepKSVDConfig(depth=7)).double()
    y = torch.rand(1, 1, 8, 8, generator=gen(9), dtype=f64)
    v = (2 * y - 1).reshape(64)
    codes, lam = model.sparse_code(v[None])
    assert len(codes) == 8 and float(lam.detach()) > 0  # a shrinking λ, so the comparison is a LASSO one
    expected = deep_ksvd_reference(model, v)
    torch.testing.assert_close(model(y).reshape(64), (expected + 1) / 2, rtol=0, atol=1e-7)  # c is stored in fp32


def test_deep_ksvd_lambda_init_is_fixed_lambda_ista_on_every_patch() -> None:
    model = DeepKSVD(DeepKSVDConfig(lambda_init=0.7, depth=3)).double()
    P = 2 * torch.rand(5, 64, generator=gen(13), dtype=f64) - 1
    _, lam = model.sparse_code(P)
    torch.testing.assert_close(lam, torch.full((5, 1), 0.7, dtype=f64))  # λ_k ≡ λ₀ whatever the patch
    y = torch.rand(1, 1, 8, 8, generator=gen(14), dtype=f64)
    v = (2 * y - 1).reshape(64)
    torch.testing.assert_close(model(y).reshape(64), (deep_ksvd_reference(model, v) + 1) / 2, rtol=0, atol=1e-7)
    assert count_parameters(model) == 35_138  # the same parameters, only their starting values differ
    loss = model(y).square().sum()
    loss.backward()
    assert model.mlp[-1].weight.grad.abs().sum() > 0  # W₄ = 0 still receives a gradient, so λ can adapt
    with pytest.raises(ValueError, match="lambda_init"):
        DeepKSVDConfig(lambda_init=0.0)


def test_deep_ksvd_forward_is_patchwise_with_the_learned_mask() -> None:
    model = DeepKSVD(DeepKSVDConfig(patch_size=4, atoms=36, depth=3)).double()
    with torch.no_grad():
        model.w.copy_(torch.rand(16, generator=gen(10), dtype=f64) + 0.5)
    y = torch.rand(1, 1, 7, 9, generator=gen(11), dtype=f64)
    ref = loop_aggregate(2 * y[0] - 1, 4, lambda v: deep_ksvd_reference(model, v), model.w.detach().view(4, 4))
    torch.testing.assert_close(model(y)[0], (ref + 1) / 2, rtol=0, atol=1e-7)


def test_deep_ksvd_set_depth_and_monitoring() -> None:
    model = DeepKSVD(DeepKSVDConfig(patch_size=4, atoms=16, depth=4))
    y = torch.rand(2, 1, 10, 11, generator=gen(12))
    full = model.reconstructions(y)
    assert len(full) == 5 and torch.equal(full[-1], model(y))
    model.set_depth(2)
    short = model.reconstructions(y)
    assert len(short) == 3 and all(torch.equal(a, b) for a, b in zip(short, full[:3]))
    sparsity = model.code_sparsity(y)
    assert len(sparsity) == 3 and all(0 <= s <= 1 for s in sparsity)
    assert model.dictionary().shape == (16, 1, 4, 4)
    with pytest.raises(ValueError, match="depth"):
        model.set_depth(5)

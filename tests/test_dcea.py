"""DCEA-C / DCEA-UC and the exponential-family likelihoods (CPU, float64 where it matters).

The unfolded encoder is checked against a proximal-gradient loop written here with ``F.conv2d`` /
``F.conv_transpose2d``; the NLLs against finite differences and against the data module's noise; and the
unsupervised (dictionary-learning) mode against planted filters, as in the DCEA paper's binomial experiment.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from sparsefold.config import ConfigError, NoiseConfig, dataclass_from_dict, run_config_from_dict
from sparsefold.datasets.noise import add_noise
from sparsefold.models import DCEA, DCEAConfig, DCEAUCConfig, build_model, count_parameters
from sparsefold.models import likelihoods as lk

f64 = torch.float64
KINDS = list(lk.KINDS)
UNITS = dict(peak=3.0, trials=5)  # non-trivial peak / number of trials for the likelihood tests


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def small(kind: str = "poisson", tied: bool = True, **kw) -> DCEAConfig:
    cls = DCEAConfig if tied else DCEAUCConfig
    args = dict(likelihood=kind, depth=4, filters=8, kernel_size=5, stride=3, peak=4.0, trials=6) | kw
    return cls(**args)


# ------------------------------------------------------------------ likelihoods


@pytest.mark.parametrize("kind", KINDS)
def test_nll_gradient_matches_finite_differences(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 1, 5, 6, generator=g, dtype=f64)
    eta = torch.randn(2, 1, 5, 6, generator=g, dtype=f64).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: lk.nll(kind, e, y, **UNITS), (eta,))
    # and the gradient is the mean-domain residual (f⁻¹(η) − c) / #pixels that the encoder uses
    (grad,) = torch.autograd.grad(lk.nll(kind, eta, y, **UNITS), eta)
    resid = lk.inverse_link(kind, eta, trials=UNITS["trials"]) - lk.counts(kind, y, **UNITS)
    torch.testing.assert_close(grad, resid.detach() / y.numel())


@pytest.mark.parametrize("kind", KINDS)
def test_nll_is_minimized_at_the_natural_parameter_of_the_mean(kind: str) -> None:
    m = torch.linspace(0.05, 0.95, 19, dtype=f64)
    eta = lk.natural_from_observation(kind, m, **UNITS)
    torch.testing.assert_close(lk.mean(kind, eta, **UNITS), m)  # mean ∘ natural = identity
    eta = eta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(lk.nll(kind, eta, m, **UNITS), eta)
    assert grad.abs().max() < 1e-12  # stationary, and (convexity) strictly larger when moved
    for d in (-0.1, 0.1):
        assert lk.nll(kind, eta + d, m, **UNITS) > lk.nll(kind, eta, m, **UNITS)


@pytest.mark.parametrize("kind", KINDS)
def test_nll_in_the_data_modules_units(kind: str) -> None:
    """Noisy y from ``datasets.noise.add_noise`` (normalized counts): the η minimizing the NLL over a grid is the
    natural parameter of the clean intensity (E nll(η, y) = nll(η, E y), the NLL is linear in y)."""
    noise = NoiseConfig(kind=kind, sigma=50.0, peak=UNITS["peak"], trials=UNITS["trials"])
    clean = torch.full((4, 1, 64, 64), 0.3)
    y, _ = add_noise(clean, noise, torch.Generator().manual_seed(0))
    grid = lk.natural_from_observation(kind, torch.tensor(0.3, dtype=f64), **UNITS) + torch.linspace(-1, 1, 401)
    losses = torch.stack([lk.nll(kind, torch.full_like(y, float(e)), y, **UNITS) for e in grid])
    best = lk.mean(kind, grid[losses.argmin()], **UNITS)
    assert abs(float(best) - 0.3) < 0.01, (kind, float(best))


# ------------------------------------------------------------------ the unfolded encoder


def reference_codes(cfg: DCEAConfig, H: torch.Tensor, b: torch.Tensor, cs: torch.Tensor, mu: torch.Tensor):
    """x ← ReLU(x + Hᵀ ρ(c − f⁻¹(H x + μ)) − b) from x = 0, with library convolutions (not models/convops.py)."""
    x = torch.zeros(cs.shape[0], H.shape[0], (cs.shape[2] - cfg.kernel_size) // cfg.stride + 1,
                    (cs.shape[3] - cfg.kernel_size) // cfg.stride + 1, dtype=cs.dtype)
    out = []
    for _ in range(cfg.depth):
        eta = F.conv_transpose2d(x, H, stride=cfg.stride) + mu
        mean = {"gaussian": eta, "poisson": torch.exp(eta), "binomial": cfg.trials * torch.sigmoid(eta)}
        r = cs - mean[cfg.likelihood]
        if cfg.likelihood == "poisson" and cfg.residual_elu:
            r = torch.where(r > 0, r, cfg.peak * (torch.exp(r) - 1))
        v = x + F.conv2d(r, H, stride=cfg.stride)
        b4 = b.view(1, -1, 1, 1)
        soft = torch.where(v > b4, v - b4, torch.where(v < -b4, v + b4, 0.0))  # S_b(v), written out
        x = soft if cfg.twosided else torch.clamp_min(v - b4, 0)
        out.append(x)
    return out


@pytest.mark.parametrize("kind,elu,twosided", [("gaussian", True, False), ("gaussian", True, True),
                                               ("poisson", True, False), ("poisson", False, False),
                                               ("binomial", True, False)])
def test_encoder_is_proximal_gradient_on_the_nll(kind: str, elu: bool, twosided: bool) -> None:
    cfg = small(kind, residual_elu=elu, depth=6, threshold_init=0.05, twosided=twosided)
    model = DCEA(cfg).double()
    y = torch.rand(2, 1, 23, 19, generator=torch.Generator().manual_seed(1), dtype=f64)
    cs, mus, _ = model._stack(y)
    with torch.no_grad():
        got = model.sparse_code(cs, mus)
        want = reference_codes(cfg, model.H, model.threshold, cs, mus)
    assert len(got) == cfg.depth
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert 0 < float((got[-1] > 0).float().mean()) < 1  # the threshold is active, not trivially 0 / all
    assert bool((got[-1] < 0).any()) == twosided  # signed codes only with the two-sided threshold


@pytest.mark.parametrize("twosided", [False, True], ids=["x>=0", "signed"])
def test_gaussian_objective_decreases_monotonically_at_init(twosided: bool) -> None:
    """Step 1/L is folded into H (‖H‖₂ = 1 for the Gaussian link), so every unfolding is a descent step of
    F(x) = ½‖c − μ − Hx‖² + ⟨b, |x|⟩ on x ≥ 0, or on signed x (ISTA's monotonicity with step 1/L)."""
    cfg = small("gaussian", depth=40, threshold_init=0.02, twosided=twosided)
    model = DCEA(cfg).double()
    y = torch.rand(1, 1, 30, 30, generator=torch.Generator().manual_seed(2), dtype=f64)
    cs, mus, _ = model._stack(y)
    with torch.no_grad():
        codes = model.sparse_code(cs, mus)
        objective = [float(0.5 * ((cs - mus - F.conv_transpose2d(x, model.H, stride=cfg.stride)) ** 2).sum()
                           + (model.threshold.view(1, -1, 1, 1) * x.abs()).sum()) for x in codes]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(objective, objective[1:])), objective
    assert objective[-1] < 0.9 * objective[0]


@pytest.mark.parametrize("kind", KINDS)
def test_no_codes_gives_the_image_mean(kind: str) -> None:
    """With a huge threshold x = 0, η̂ = μ and x̂ is each image's mean intensity: checks μ and the units."""
    model = DCEA(small(kind, threshold_init=1e6))
    y = torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(3)) * torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
    with torch.no_grad():
        out = model(y)
    torch.testing.assert_close(out, y.mean(dim=(2, 3), keepdim=True).expand_as(y), rtol=1e-5, atol=1e-6)


def test_untied_equals_tied_at_init_and_unties() -> None:
    tied, untied = DCEA(small()), DCEA(small(tied=False))
    y = torch.rand(1, 1, 26, 26, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(untied(y), tied(y))
        untied.W_d.mul_(1.5)
        assert not torch.allclose(untied(y), tied(y))
    assert {n for n, _ in untied.named_parameters()} == {"H", "W_e", "W_d", "threshold"}
    assert {n for n, _ in tied.named_parameters()} == {"H", "threshold"}


def test_dictionary_learning_options() -> None:
    """learn_threshold=False: b is a buffer; normalize_atoms: the output does not depend on the atoms' scale."""
    model = DCEA(small(tied=False, learn_threshold=False, normalize_atoms=True))
    assert {n for n, _ in model.named_parameters()} == {"H", "W_e", "W_d"} and "threshold" in model.state_dict()
    y = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model(y)
        for w in (model.H, model.W_e, model.W_d):
            w.mul_(torch.linspace(0.5, 3.0, w.shape[0]).view(-1, 1, 1, 1))
        torch.testing.assert_close(model(y), before)
    norms = model.dictionary().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, model.atom_norm))


def test_paper_parameter_counts() -> None:
    assert count_parameters(build_model(DCEAConfig())) == 169 * 121 + 169 == 20_618
    assert count_parameters(build_model(DCEAUCConfig())) == 3 * 169 * 121 + 169 == 61_516
    cfg = DCEAConfig()
    assert (cfg.depth, cfg.filters, cfg.kernel_size, cfg.stride, cfg.likelihood) == (15, 169, 11, 7, "poisson")


def test_reconstructions_depth_and_monitoring() -> None:
    model = DCEA(small("binomial"))
    y = torch.rand(2, 1, 21, 21, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        recs = model.reconstructions(y)
        assert len(recs) == 4
        torch.testing.assert_close(recs[-1], model(y))
        torch.testing.assert_close(model(y), lk.mean("binomial", model.natural(y)))
        model.set_depth(2)
        assert len(model.reconstructions(y)) == 2 and len(model.code_sparsity(y)) == 2
        torch.testing.assert_close(model(y), recs[1])
    assert all(0 <= s <= 1 for s in model.code_sparsity(y))
    assert model.dictionary().shape == (8, 1, 5, 5)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="depth"):
            model.set_depth(bad)


# ------------------------------------------------------------------ config


def test_check_noise() -> None:
    small("poisson", peak=4.0).check_noise(NoiseConfig(kind="poisson", peak=4.0))
    small("binomial", trials=6).check_noise(NoiseConfig(kind="binomial", trials=6))
    small("gaussian").check_noise(NoiseConfig(kind="gaussian", sigma=25.0))
    with pytest.raises(ConfigError, match=r"^model\.likelihood"):
        small("poisson").check_noise(NoiseConfig(kind="gaussian"))
    with pytest.raises(ConfigError, match=r"^model\.peak"):
        small("poisson", peak=2.0).check_noise(NoiseConfig(kind="poisson", peak=4.0))
    with pytest.raises(ConfigError, match=r"^model\.trials"):
        small("binomial", trials=3).check_noise(NoiseConfig(kind="binomial", trials=6))
    with pytest.raises(ConfigError, match=r"^model\.likelihood"):  # wired into the run config
        run_config_from_dict({"model": {"name": "dcea_uc"}, "noise": {"kind": "gaussian"}})
    with pytest.raises(ConfigError, match=r"^model\.likelihood: must be one of"):
        dataclass_from_dict(DCEAConfig, {"likelihood": "gamma"}, "model")


# ------------------------------------------------------------------ training


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Blurred noise rescaled to [0.05, 0.95]: piecewise-smooth test images without any file."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 1, size + 6, size + 6, generator=g), 7, stride=1)
    x = x - x.amin(dim=(2, 3), keepdim=True)
    return 0.05 + 0.9 * x / x.amax(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("tied", [True, False], ids=["dcea_c", "dcea_uc"])
def test_supervised_mse_on_poisson_peak4_lowers_the_loss(tied: bool) -> None:
    clean = smooth_images(4, 32, seed=6)
    noisy, _ = add_noise(clean, NoiseConfig(kind="poisson", peak=4.0), torch.Generator().manual_seed(7))
    model = DCEA(small("poisson", tied=tied, filters=16, kernel_size=7, stride=4, depth=5))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(model(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------ unsupervised dictionary learning


def atom_recovery(learned: torch.Tensor, planted: torch.Tensor) -> torch.Tensor:
    """For each planted filter (K, 1, p, p), the max over learned atoms (J, 1, k, k), k ≥ p, and over the
    (k − p + 1)² placements of |⟨h, window of d⟩| / (‖h‖ ‖d‖): 1 iff some atom is ±h, shifted, zero elsewhere."""
    d = learned / learned.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    h = planted / planted.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return F.conv2d(d, h).abs().amax(dim=(0, 2, 3))  # (J, K, shifts, shifts) -> (K,)


def test_unsupervised_binomial_dictionary_learning_recovers_planted_filters() -> None:
    """The DCEA paper's binomial experiment, in 2-D and small: y ~ Binomial(n, sigmoid(Σ h_k ⊛ x_k + μ)) / n with
    K = 4 planted random 5×5 filters and sparse non-negative codes; DCEA-C (16 atoms 7×7, T = 15, fixed b,
    normalized atoms) is trained with Adam on the binomial NLL of y alone.

    Criterion: every planted filter has a learned atom with normalized correlation ≥ 0.9 (angle < 26°). Chance
    level (random init, 16 atoms × 9 placements of 25 i.i.d. entries, correlations ~ N(0, 1/49)) is ≈ 0.3–0.5;
    measured here 0.93–0.99 after 150 steps (≈ 13 s on one shared core); with six other (planted, init) seeds
    and 300 steps the worst filter scored 0.91–0.97. Fixed b and normalized atoms matter: with a learned b the
    NLL drives b down and the codes fill with noise; projecting atoms back to the sphere after each Adam step
    (instead of ``normalize_atoms``) equalizes the entries' magnitudes and stalls at ≈ 0.85–0.9."""
    K, p, n, mu, size = 4, 5, 50, -1.0, 32
    g = torch.Generator().manual_seed(0)
    planted = torch.randn(K, 1, p, p, generator=g)
    planted /= planted.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    noise = NoiseConfig(kind="binomial", trials=n)

    def batch(gen: torch.Generator, b: int = 8) -> torch.Tensor:
        grid = size + p - 1  # codes also just outside the image, so that atoms enter through the border
        x = (torch.rand(b, K, grid, grid, generator=gen) < 0.005) * (4 + 4 * torch.rand(b, K, grid, grid, generator=gen))
        eta = F.conv_transpose2d(x, planted)[..., p - 1:p - 1 + size, p - 1:p - 1 + size] + mu
        return add_noise(torch.sigmoid(eta), noise, gen)[0]  # Binomial(n, sigmoid(η)) / n, the data module's units

    cfg = DCEAConfig(likelihood="binomial", trials=n, mu=mu, filters=16, kernel_size=7, stride=1, depth=15,
                     threshold_init=1.0, learn_threshold=False, normalize_atoms=True, init_seed=1)
    model = DCEA(cfg)
    cfg.check_noise(noise)
    at_init = atom_recovery(model.dictionary(), planted)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 150
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen, start = torch.Generator().manual_seed(1), time.perf_counter()
    losses = []
    for _ in range(steps):
        y = batch(gen)
        loss = lk.nll("binomial", model.natural(y), y, trials=n)  # no clean target
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    learned = atom_recovery(model.dictionary(), planted)
    print(f"atom recovery: random init {at_init.numpy().round(3)}, learned {learned.numpy().round(3)}, "
          f"NLL {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}, {time.perf_counter() - start:.1f} s")
    assert at_init.max() < 0.6
    assert learned.min() >= 0.9, learned

r"""DCEA: convolutional dictionary-learning auto-encoders for natural exponential-family data
(Tolooshams, Song, Temereanca & Ba, ICML 2020; official code github.com/btolooshams/dea, src/model.py).

Generative model (c the counts of the observation, see :mod:`.likelihoods`; x ≥ 0 sparse codes):

    c ~ p(c | η),   η = H x + μ,   E[c] = f⁻¹(η),   f⁻¹ = identity / exp / n·sigmoid (Gauss. / Poisson / Binom.)

Problem (sparse coding under the exponential-family NLL, one-sided ℓ₁):

    x̂ = argmin_{x ≥ 0}  Σ_pixels nll(H x + μ, c) + ⟨b, x⟩

Classical iteration (proximal gradient, step 1/L, L = κ·‖H‖²₂, κ the link's curvature bound: 1, peak, n/4;
the gradient of the NLL w.r.t. η is f⁻¹(η) − c, so the residual is formed in the mean domain):

    x_{t+1} = ReLU( x_t + (1/L) Hᵀ (c − f⁻¹(H x_t + μ)) − b/L )

Learned iteration (T unfoldings, all weights tied across t, step 1/L absorbed into H at initialization):

    x_0     = 0
    r_t     = c − f⁻¹(H x_t + μ)                        (Eq. 1, residual in the mean domain)
    r_t     ← ELU_{α=peak}(r_t)                          (Eq. 1', Poisson only, ``residual_elu``)
    x_{t+1} = ReLU(x_t + W_e r_t − b)                    (Eq. 2, one-sided threshold per filter)
            (``twosided=True``: soft threshold S_b, the prox of ⟨b, |x|⟩ with x signed; official RELUTwosided)
    η̂      = W_d x_T + μ,   x̂ = mean(η̂)                (Eq. 3; x̂ = exp(η̂)/peak, sigmoid(η̂) or η̂)

DCEA-C (``dcea_c``) ties W_e = W_d = H; DCEA-UC (``dcea_uc``) learns H, W_e, W_d separately. The stride-s
filters run on the s² shifted copies of the padded observation and η̂ is averaged over the aligned copies,
exactly as in CSCNet (``convops.shift_stack`` / ``shift_average``; the official code averages η̂ too).

Offset μ. The official code uses μ = 0, so an untrained Poisson model starts from exp(0) = 1 count
everywhere. Here ``mu=None`` (default) sets μ per image and channel to the natural parameter of the
observed mean intensity, μ = log(peak·ȳ) / logit(ȳ) / ȳ (no parameter; the codes model the deviations
from the mean); a number fixes μ (``mu=0`` is the official behaviour, the unsupervised test plants one).

ELU. The official 2-D code applies ELU(α=peak) to the Poisson residual (``"nonlin": "ELU"``, not in the paper):
it bounds r ≥ −peak when exp(Hx + μ) overshoots early in training and keeps r = 0 the fixed point, but is no
longer exact proximal gradient on the NLL. Default ``residual_elu=True``; ``False`` is the exact iteration.

Official code (src/model.py DEA2Dtied / DEA2Dfree; ``sparsefold import dcea`` sets what differs): μ = 0
(``mu=0``); the ELU only when the release has ``nonlin`` ELU; its two-sided shrink sign(v)·ReLU(|v| − b) lets a
negative b push codes away from 0 (``negative_threshold="official"``; default "clamp": b < 0 = no shrinkage).
It takes raw counts c and returns η̂; here y = c/peak goes in and exp(η̂)/peak comes out (its predict.py
shows Q·exp(η̂), Q = max(clean)/peak). Not reproduced: per-unfolding biases, stride 1 (no padding there).

Unsupervised (dictionary-learning) mode, loss nll(η̂, y) without a clean target: the NLL rewards fitting
the noise, so a learned b drifts to 0, and the atoms' scale is free. Set ``learn_threshold=False,
normalize_atoms=True`` (the official simulated runs fix λ and renormalize H after every step; here the atoms
are reparametrized as (1/√L)·h/‖h‖, because projecting after each Adam step equalizes the entries' magnitudes).

Symbol → attribute:

    ==========  ================================================  ===================================
    symbol      attribute                                         shape
    ==========  ================================================  ===================================
    H           ``self.H`` (inside the residual)                  (K, C, k, k)
    W_e, W_d    ``self.H`` (tied) / ``self.W_e``, ``self.W_d``    (K, C, k, k)
    b           ``self.threshold``                                (K,)  one per filter, shared by all t
    μ           ``config.mu`` or the per-image mean (above)       (B, C, 1, 1)
    c           ``likelihoods.counts(y)``: y, peak·y, n·y         (B, C, H, W)
    T, K, k, s  ``depth, filters, kernel_size, stride``
    ==========  ================================================  ===================================

Paper configuration (Poisson, peaks 1/2/4): T=15, K=169, k=11, s=7, b₀ = 0.1 (peak 4) or 0.01 (peaks 1, 2)
→ DCEA-C 169·121 + 169 = 20,618 and DCEA-UC 3·169·121 + 169 = 61,516 parameters. Init: unit-norm random
normal atoms / √L, L = κ·(power-method ‖H‖²₂) (official: 5× a power-method estimate through the exp link).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models import likelihoods as lk
from sparsefold.models.convops import conv_analysis, conv_synthesis, power_method, shift_average, shift_stack
from sparsefold.models.prox import soft_threshold
from sparsefold.models.tiling import Tiling
from sparsefold.models.unfolding import unfolding


@dataclass(frozen=True, kw_only=True)
class DCEAConfig:
    """Hyperparameters of :class:`DCEA`, tied (DCEA-C). Defaults: the paper's Poisson peak-4 model."""

    tied: ClassVar[bool] = True

    name: str = "dcea_c"
    likelihood: str = "poisson"
    peak: float = 4.0  # Poisson: counts = peak·y
    trials: int = 1  # Binomial: counts = trials·y
    depth: int = 15
    filters: int = 169
    kernel_size: int = 11
    stride: int = 7
    channels: int = 1
    threshold_init: float = 0.1
    mu: float | None = None  # None: μ = natural parameter of each image's mean intensity
    residual_elu: bool = True  # Poisson only: the official ELU(α=peak) on the residual
    learn_threshold: bool = True  # False: b is a fixed buffer (dictionary-learning mode, loss.kind=nll)
    normalize_atoms: bool = False  # True: every atom is kept at its initial norm 1/√L (ditto)
    twosided: bool = False  # True: signed codes, x = S_b(v) (Gaussian data: ±atoms at no extra parameters)
    negative_threshold: str = field(default="clamp", metadata={"run_name": "if_set"})  # "official": see above
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.likelihood in lk.KINDS, "likelihood",
              f"must be one of {', '.join(lk.KINDS)}, got {self.likelihood!r}")
        check(self.peak > 0, "peak", f"must be > 0, got {self.peak}")
        check(self.trials >= 1, "trials", f"must be >= 1, got {self.trials}")
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.filters >= 1, "filters", f"must be >= 1, got {self.filters}")
        check(self.kernel_size >= 1, "kernel_size", f"must be >= 1, got {self.kernel_size}")
        check(1 <= self.stride <= self.kernel_size, "stride",
              f"must be in [1, kernel_size={self.kernel_size}], got {self.stride}")
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        check(self.negative_threshold in ("clamp", "official"), "negative_threshold",
              f"must be 'clamp' or 'official', got {self.negative_threshold!r}")

    def check_noise(self, noise: Any) -> None:
        """The likelihood must be the data's noise model, with the same peak / number of trials."""
        check(noise.kind == self.likelihood, "model.likelihood",
              f"{self.likelihood!r} does not match noise.kind={noise.kind!r} (set model.likelihood)")
        if self.likelihood == "poisson":
            check(float(noise.peak) == float(self.peak), "model.peak",
                  f"{self.peak} does not match noise.peak={noise.peak}")
        if self.likelihood == "binomial":
            check(int(noise.trials) == self.trials, "model.trials",
                  f"{self.trials} does not match noise.trials={noise.trials}")


@dataclass(frozen=True, kw_only=True)
class DCEAUCConfig(DCEAConfig):
    """DCEA-UC: untied H, W_e, W_d (otherwise as :class:`DCEAConfig`)."""

    tied: ClassVar[bool] = False

    name: str = "dcea_uc"


def initial_atoms(config: DCEAConfig) -> Tensor:
    """H (K, C, k, k): unit-norm random normal atoms seeded by ``config.init_seed``, divided by √L,
    L = κ·‖H‖²₂ (the step 1/L absorbed)."""
    K, C, k = config.filters, config.channels, config.kernel_size
    w = torch.randn(K, C, k, k, generator=torch.Generator().manual_seed(config.init_seed))
    w = w / w.flatten(1).norm(dim=1).view(K, 1, 1, 1)  # unit-norm atoms (official F.normalize)
    kappa = lk.curvature(config.likelihood, peak=config.peak, trials=config.trials)
    return w / (kappa * power_method(w, config.stride, size=max(128, 4 * k))) ** 0.5


class DCEA(nn.Module):
    """DCEA-C / DCEA-UC (``config.tied``): unrolled proximal gradient on an exponential-family NLL."""

    checkpoint_unfoldings = False  # True: each unfolding is recomputed in backward (models/unfolding.py)

    def __init__(self, config: DCEAConfig, init: bool = True) -> None:
        """``init=False``: the atoms allocated but not drawn, for a state dict to fill; the power method
        still runs with ``normalize_atoms`` (its 1/√L is not in the state dict)."""
        super().__init__()
        self.config = config
        K, C, k = config.filters, config.channels, config.kernel_size
        drawn = init or config.normalize_atoms
        w = initial_atoms(config) if drawn else torch.empty(K, C, k, k)
        self.atom_norm = float(w[0].norm()) if drawn else math.nan  # 1/√L, the same for every atom
        self.H = nn.Parameter(w.clone())
        if not config.tied:
            self.W_e = nn.Parameter(w.clone())
            self.W_d = nn.Parameter(w.clone())
        b = torch.full((K,), config.threshold_init)
        if config.learn_threshold:
            self.threshold = nn.Parameter(b)
        else:
            self.register_buffer("threshold", b)
        self.depth = config.depth

    def _atoms(self, w: Tensor) -> Tensor:
        """w, or w with every atom rescaled to the initial norm 1/√L (``normalize_atoms``)."""
        if not self.config.normalize_atoms:
            return w
        return w * (self.atom_norm / w.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)

    @property
    def synthesis(self) -> Tensor:
        return self._atoms(self.H)

    @property
    def encoder(self) -> Tensor:
        return self.synthesis if self.config.tied else self._atoms(self.W_e)

    @property
    def decoder(self) -> Tensor:
        return self.synthesis if self.config.tied else self._atoms(self.W_d)

    @property
    def tiling(self) -> Tiling:
        """2T strided convolutions (W_e, T−1 × (H, W_e), W_d), each pair reaching k−1 pixels: halo T·(k−1).
        μ comes from the image mean, which is global: tiles get the whole image's (``forward``'s ``mean``)."""
        return Tiling(self.depth * (self.config.kernel_size - 1), self.config.stride)

    def set_depth(self, depth: int) -> None:
        """Run ``depth`` unfoldings from now on (weights are tied across t: nothing to warm-start)."""
        if not 1 <= depth <= self.config.depth:
            raise ValueError(f"depth must be in [1, {self.config.depth}], got {depth}")
        self.depth = depth

    # ------------------------------------------------------------------ the unfolded iteration
    def offset(self, y: Tensor, mean: Tensor | None = None) -> Tensor:
        """μ (B, C, 1, 1): fixed ``config.mu``, or the natural parameter of each image's mean intensity
        (``mean`` (B, C, 1, 1) when given, else y's)."""
        cfg = self.config
        if cfg.mu is not None:
            return y.new_full((y.shape[0], y.shape[1], 1, 1), cfg.mu)
        mean = y.mean(dim=(2, 3), keepdim=True) if mean is None else mean
        return lk.natural_from_observation(cfg.likelihood, mean, peak=cfg.peak, trials=cfg.trials)

    def sparse_code(self, cs: Tensor, mu: Tensor, depth: int | None = None,
                    keep_all: bool = True) -> list[Tensor]:
        """Codes x_1..x_T of the padded count stack cs (N, C, Ph, Pw) with offsets mu (N, C, 1, 1);
        each (N, K, h, w). ``keep_all=False`` returns only [x_T]."""
        T = self.depth if depth is None else depth
        codes: list[Tensor] = []
        x = None  # x_0 = 0
        for _ in range(T):
            x = unfolding(self, self.step, x, cs, mu)  # Eqs. (1)-(2)
            codes = [*codes, x] if keep_all else [x]
        return codes

    def step(self, x: Tensor | None, cs: Tensor, mu: Tensor) -> Tensor:
        """One unfolding, Eqs. (1)-(2): x_t (N, K, h, w) or None (x_0 = 0) -> x_{t+1} (N, K, h, w)."""
        cfg = self.config
        s, b = cfg.stride, self.threshold.view(1, -1, 1, 1)  # b: (1, K, 1, 1)
        eta = mu if x is None else conv_synthesis(x, self.synthesis, s, cs.shape[-2:]) + mu  # H x_t + μ
        r = cs - lk.inverse_link(cfg.likelihood, eta, trials=cfg.trials)  # Eq. (1)
        if cfg.residual_elu and cfg.likelihood == "poisson":
            r = F.elu(r, alpha=cfg.peak)  # Eq. (1')
        v = conv_analysis(r, self.encoder, s, add=x)  # x_t + W_e r_t: (N, K, h, w)
        if not cfg.twosided:
            return F.relu(v - b)  # Eq. (2)
        return soft_threshold(v, b) if cfg.negative_threshold == "clamp" else torch.sign(v) * F.relu(v.abs() - b)

    def _stack(self, y: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Counts of the s² shifted copies (B·s², C, Ph, Pw), their offsets (B·s², C, 1, 1), μ (B, C, 1, 1)."""
        cfg = self.config
        mu = self.offset(y, mean)
        c = lk.counts(cfg.likelihood, y, peak=cfg.peak, trials=cfg.trials)  # (B, C, H, W)
        cs = shift_stack(c, cfg.kernel_size, cfg.stride)
        return cs, mu.repeat_interleave(cfg.stride ** 2, dim=0), mu

    def _decode(self, x: Tensor, mu: Tensor, hw: tuple[int, ...], pad_hw: tuple[int, ...]) -> Tensor:
        """Eq. (3) with shift-averaging: codes (B·s², K, h, w) -> η̂ (B, C, H, W)."""
        cfg, (h, w) = self.config, hw
        z = conv_synthesis(x, self.decoder, cfg.stride, pad_hw)  # W_d x: (B·s², C, Ph, Pw)
        return shift_average(z, h, w, cfg.kernel_size, cfg.stride) + mu

    def natural(self, y: Tensor, sigma: Tensor | None = None, mean: Tensor | None = None) -> Tensor:
        """y (B, C, H, W) normalized observation -> η̂ (B, C, H, W), natural parameter of the counts."""
        cs, mus, mu = self._stack(y, mean)
        x = self.sparse_code(cs, mus, keep_all=False)[-1]
        return self._decode(x, mu, y.shape[-2:], cs.shape[-2:])

    def forward(self, y: Tensor, sigma: Tensor | None = None, mean: Tensor | None = None) -> Tensor:
        """y (B, C, H, W) -> x̂ = mean(η̂) in image units; ``sigma`` is ignored (the likelihood is fixed).
        ``mean`` (B, C, 1, 1): the image mean μ is taken from instead of y's (a tile gets the whole image's)."""
        cfg = self.config
        return lk.mean(cfg.likelihood, self.natural(y, mean=mean), peak=cfg.peak, trials=cfg.trials)

    def reconstructions(self, y: Tensor, sigma: Tensor | None = None) -> list[Tensor]:
        """x̂ after each unfolding (decoded with W_d), last = ``forward``."""
        cfg = self.config
        cs, mus, mu = self._stack(y)
        return [lk.mean(cfg.likelihood, self._decode(x, mu, y.shape[-2:], cs.shape[-2:]), peak=cfg.peak,
                        trials=cfg.trials) for x in self.sparse_code(cs, mus)]

    # ------------------------------------------------------------------ monitoring
    def dictionary(self) -> Tensor:
        """The decoder atoms W_d (= H when tied), (K, C, k, k)."""
        return self.decoder.detach()

    @torch.no_grad()
    def code_sparsity(self, y: Tensor) -> list[float]:
        """Fraction of non-zero codes after each unfolding, for a batch y."""
        cs, mus, _ = self._stack(y)
        return [float((x != 0).float().mean()) for x in self.sparse_code(cs, mus)]

r"""CSCNet: convolutional LISTA with strided dictionaries and shift-averaging (Simon & Elad, NeurIPS 2019).

Problem (convolutional sparse coding of the noisy image y, then x̂ = D γ̂):

    γ̂ = argmin_γ ½‖y − A γ‖²₂ + ‖θ ⊙ γ‖₁,      A = Σ_k d_k ⊛_s (·)   (K filters k×k, stride s)

Classical iteration (ISTA, step 1/L with L = ‖A‖²₂ from the power method):

    γ_{t+1} = S_{θ/L}( γ_t − (1/L) Aᵀ(A γ_t − y) )

Learned iteration (T unfoldings, weights tied across t, three separate filter banks A, B, C; the step
1/L is absorbed into the weights, all three initialized to the same random bank divided by √L):

    γ_0     = S_θ(B y)                                   (Eq. 1)
    γ_{t+1} = S_θ(γ_t − B(A γ_t − y)),  t = 0..T−2       (Eq. 2)
    x̂      = C γ_{T−1}                                   (Eq. 3)

Strided filters see 1/s² of the pixel grid, so the network runs on the s² shifted copies of the
reflect-padded input and averages the aligned outputs (the paper's "MMSE approximation", Eq. 4).
Here the shifts are windows of one padded image stacked into the batch dimension, and A/B are a GEMM
plus col2im/im2col, which keeps A the exact adjoint of B (see ``convops.py``).

Symbol → attribute:

    ==========  =============================  ===================================
    symbol      attribute                      shape
    ==========  =============================  ===================================
    A           ``self.A`` (synthesis)         (K, C, k, k)
    B           ``self.B`` (analysis)          (K, C, k, k)
    C           ``self.C`` (final decoder)     (K, C, k, k)
    θ           ``self.threshold``             (K,)  one per filter, shared by all t
    T           ``self.depth``                 soft-threshold applications (``config.depth`` until ``set_depth``)
    K, k, s     ``filters, kernel_size, stride``
    ==========  =============================  ===================================

Paper configuration: T=12, K=175, k=11, s=8 → 3·175·121 + 175 = 63,700 parameters.

Options beyond the paper: ``noise_adaptive`` replaces θ by CDLNet's θ(σ) = θ₀ + θ₁·σ/255 per filter
(``self.threshold``, ``self.threshold_sigma``; +K parameters), so one model serves a σ range, with σ
estimated from the image (``estimate_sigma``) when unknown; ``set_depth`` changes the number of
unfoldings used (weights are tied, so a deeper model warm-starts from the shorter one exactly);
``reconstructions`` gives x̂_t = C γ_t after every unfolding (multi-layer loss).

A learned θ can go negative. ``negative_threshold="clamp"`` (default) shrinks by max(θ, 0): a negative θ
means no shrinkage. ``"official"`` reproduces the authors' code (``prox.soft_threshold_masks``: for θ < 0
codes in (θ, −θ) double, the others move away from zero by |θ|); imported releases use it
(``sparsefold import cscnet``), since some of their filters have θ < 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models.convops import conv_analysis, conv_synthesis, power_method, shift_average, shift_stack
from sparsefold.models.noise_level import estimate_sigma, noise_adaptive_threshold
from sparsefold.models.prox import soft_threshold, soft_threshold_masks
from sparsefold.models.tiling import Tiling
from sparsefold.models.unfolding import unfolding


@dataclass(frozen=True, kw_only=True)
class CSCNetConfig:
    """Hyperparameters of :class:`CSCNet` (defaults: the paper's σ=25 configuration)."""

    name: str = "cscnet"
    depth: int = 12
    filters: int = 175
    kernel_size: int = 11
    stride: int = 8
    channels: int = 1
    threshold_init: float = 0.01
    noise_adaptive: bool = False
    negative_threshold: str = field(default="clamp", metadata={"run_name": "if_set"})  # added in 0.1: see storage
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.filters >= 1, "filters", f"must be >= 1, got {self.filters}")
        check(self.kernel_size >= 1, "kernel_size", f"must be >= 1, got {self.kernel_size}")
        check(1 <= self.stride <= self.kernel_size, "stride",
              f"must be in [1, kernel_size={self.kernel_size}], got {self.stride}")
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        check(self.threshold_init >= 0, "threshold_init", f"must be >= 0, got {self.threshold_init}")
        check(self.negative_threshold in ("clamp", "official"), "negative_threshold",
              f"must be 'clamp' or 'official', got {self.negative_threshold!r}")


def initial_filters(config: CSCNetConfig) -> Tensor:
    """The random bank (K, C, k, k) seeded by ``config.init_seed``, divided by √L: ‖A‖₂ = 1, i.e. the
    step 1/L absorbed into the weights."""
    K, C, k = config.filters, config.channels, config.kernel_size
    w = torch.randn(K, C, k, k, generator=torch.Generator().manual_seed(config.init_seed))
    return w / power_method(w, config.stride, size=max(128, 4 * k)) ** 0.5


class CSCNet(nn.Module):
    """Tied convolutional LISTA with separate A, B, C and shift-averaging. See the module docstring."""

    checkpoint_unfoldings = False  # True: each unfolding is recomputed in backward (models/unfolding.py)

    def __init__(self, config: CSCNetConfig, init: bool = True) -> None:
        """``init=False``: A, B, C allocated but not drawn (no power method), for a state dict to fill."""
        super().__init__()
        self.config = config
        K, C, k = config.filters, config.channels, config.kernel_size
        w = initial_filters(config) if init else torch.empty(K, C, k, k)
        self.A = nn.Parameter(w.clone())  # synthesis inside the loop
        self.B = nn.Parameter(w.clone())  # analysis
        self.C = nn.Parameter(w.clone())  # final decoder
        if config.noise_adaptive:  # θ(σ) = θ₀ + θ₁·σ/255, equal to threshold_init at σ = 25
            self.threshold = nn.Parameter(torch.zeros(K))
            self.threshold_sigma = nn.Parameter(torch.full((K,), config.threshold_init * 255.0 / 25.0))
        else:
            self.threshold = nn.Parameter(torch.full((K,), config.threshold_init))
        self.depth = config.depth  # active depth, see set_depth

    def set_depth(self, depth: int) -> None:
        """Run ``depth`` unfoldings from now on (tied weights: nothing to copy)."""
        if not 1 <= depth:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth

    @property
    def tiling(self) -> Tiling:
        """2T strided convolutions (B, T−1 × (A, B), C), each pair reaching k−1 pixels: halo T·(k−1);
        shift-averaging adds nothing (every shift's output at a pixel comes from the same window)."""
        return Tiling(self.depth * (self.config.kernel_size - 1), self.config.stride)

    def theta(self, sigma: Tensor | None, y: Tensor) -> Tensor:
        """Thresholds for the s²-shift batch of y: (1, K, 1, 1), or (B·s², K, 1, 1) when noise-adaptive."""
        if not self.config.noise_adaptive:
            return self.threshold.view(1, -1, 1, 1)
        sigma = estimate_sigma(y) if sigma is None else sigma.reshape(-1).to(y.device)
        th = noise_adaptive_threshold(self.threshold, self.threshold_sigma, sigma)  # (B, K, 1, 1)
        return th.repeat_interleave(self.config.stride ** 2, dim=0)

    # ------------------------------------------------------------------ the unfolded iteration
    def sparse_code(self, ys: Tensor, theta: Tensor | None = None, depth: int | None = None,
                    keep_all: bool = True) -> list[Tensor]:
        """Codes γ_0..γ_{T−1} of padded inputs ys (N, C, Ph, Pw) with thresholds θ (see ``theta``; default
        the learned θ, not noise-adaptive); each (N, K, h, w). ``keep_all=False`` returns only [γ_{T−1}]
        and frees the earlier codes (inference)."""
        s = self.config.stride
        if theta is None:
            theta = self.threshold.view(1, -1, 1, 1)  # (1, K, 1, 1)
        T = self.depth if depth is None else depth
        if T < 1:
            raise ValueError(f"depth must be >= 1, got {T}")
        gammas = [self.shrink(conv_analysis(ys, self.B, s), theta)]  # Eq. (1): (N, K, h, w)
        for _ in range(T - 1):
            gammas.append(unfolding(self, self.step, gammas[-1], ys, theta))  # Eq. (2)
            if not keep_all:
                del gammas[0]
        return gammas

    def step(self, g: Tensor, ys: Tensor, theta: Tensor) -> Tensor:
        """One unfolding, Eq. (2): γ_{t+1} = S_θ(γ_t − B(A γ_t − y)); g = γ_t (N, K, h, w), ys (N, C, Ph, Pw).

        The residual A γ_t − y is taken in image space, as the authors' code does: one pass over an image
        per unfolding instead of two over the K-channel code maps that γ_t + B y − B A γ_t would take
        (forward, and again in backward), measured 13 % of a paper-configuration training step."""
        r = conv_synthesis(g, self.A, self.config.stride, ys.shape[-2:]) - ys  # A γ_t − y: (N, C, Ph, Pw)
        v = conv_analysis(r, self.B, self.config.stride, add=g, alpha=-1.0)  # γ_t − B r, fused in the GEMM
        return self.shrink(v, theta)

    def shrink(self, v: Tensor, theta: Tensor) -> Tensor:
        """S_θ(v), by ``config.negative_threshold`` (see the module docstring)."""
        return (soft_threshold if self.config.negative_threshold == "clamp" else soft_threshold_masks)(v, theta)

    def forward(self, y: Tensor, sigma: Tensor | None = None) -> Tensor:
        """y (B, C, H, W) noisy, sigma (B,) in 0..255 (used when noise-adaptive) -> x̂ (B, C, H, W)."""
        cfg = self.config
        h, w = y.shape[-2:]
        ys = shift_stack(y, cfg.kernel_size, cfg.stride)  # (B·s², C, Ph, Pw)
        gamma = self.sparse_code(ys, self.theta(sigma, y), keep_all=False)[-1]  # (B·s², K, h', w')
        xs = conv_synthesis(gamma, self.C, cfg.stride, ys.shape[-2:])  # Eq. (3): (B·s², C, Ph, Pw)
        return shift_average(xs, h, w, cfg.kernel_size, cfg.stride)  # Eq. (4): (B, C, H, W)

    def reconstructions(self, y: Tensor, sigma: Tensor | None = None) -> list[Tensor]:
        """x̂_t = shift_average(C γ_t) for t = 0..T−1, each (B, C, H, W); the last equals ``forward``."""
        cfg = self.config
        h, w = y.shape[-2:]
        ys = shift_stack(y, cfg.kernel_size, cfg.stride)
        return [shift_average(conv_synthesis(g, self.C, cfg.stride, ys.shape[-2:]), h, w, cfg.kernel_size, cfg.stride)
                for g in self.sparse_code(ys, self.theta(sigma, y))]

    # ------------------------------------------------------------------ monitoring
    def dictionary(self) -> Tensor:
        """The learned decoder atoms C, (K, C, k, k), for visualization."""
        return self.C.detach()

    @torch.no_grad()
    def code_sparsity(self, y: Tensor) -> list[float]:
        """Fraction of non-zero codes after each unfolding, for a batch y."""
        ys = shift_stack(y, self.config.kernel_size, self.config.stride)
        return [float((g != 0).float().mean()) for g in self.sparse_code(ys, self.theta(None, y))]

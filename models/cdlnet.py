r"""CDLNet: convolutional LISTA, untied, with noise-adaptive thresholds (Janjušević, Khalilian-Gourtani &
Wang, IEEE OJSP 2022, arXiv 2112.00913; official code nikopj/CDLNet-OJSP, model/net.py).

Problem (convolutional sparse coding of the mean-subtracted noisy image y, then x̂ = D ẑ + mean(y)):

    ẑ = argmin_z ½‖y − D z‖²₂ + λ‖z‖₁,     D z = Σ_m d_m ⊛_s z_m   (M filters P×P, stride s)

with the official "same" convolutions: y is zero-padded by (P−1)//2 for the analysis and D's output is
cropped back (:func:`analysis` / :func:`synthesis`, exact adjoints of each other).

Classical iteration (ISTA, step 1/L with L = ‖D‖²₂ from the power method; :func:`conv_ista`, FISTA too):

    z_{k+1} = S_{λ/L}( z_k − (1/L) Dᵀ(D z_k − y) ),   z_0 = 0

Learned iteration (K layers; untied: analysis A⁽ᵏ⁾ C→M, synthesis B⁽ᵏ⁾ M→C; equation labels are ours):

    z⁽⁰⁾ = S_τ⁽⁰⁾( A⁽⁰⁾ y )                                             (Eq. 1)
    z⁽ᵏ⁾ = S_τ⁽ᵏ⁾( z⁽ᵏ⁻¹⁾ − A⁽ᵏ⁾(B⁽ᵏ⁾ z⁽ᵏ⁻¹⁾ − y) ),   k = 1..K−1       (Eq. 2)
    x̂   = D z⁽ᴷ⁻¹⁾ + mean(y),   D := B⁽⁰⁾                              (Eq. 3)
    τ⁽ᵏ⁾ = τ₀⁽ᵏ⁾ + τ₁⁽ᵏ⁾·σ/255   per layer and subband                   (Eq. 4)

D is aliased to B⁽⁰⁾, which Eq. 2 never uses (z⁽⁻¹⁾ = 0). The input is reflect-padded to a multiple of s
(no shift-averaging, as in the paper). σ is the ``sigma`` argument (0..255 units), or the MAD estimate of
``estimate_sigma`` when None (the official code drops the σ term then). ``noise_adaptive=False`` is
"CDLNet-B": τ⁽ᵏ⁾ = τ₀⁽ᵏ⁾ and no τ₁ parameters. ``tied=True`` shares one A, B, τ by all layers: tied conv
LISTA, and conv ISTA with step 1 on the normalized dictionary at init (τ = λ/L), as the tests check.

Init: every A⁽ᵏ⁾ and B⁽ᵏ⁾ is the same random W/√L (power method, 128² grid, ``POWER_ITERS`` iterations;
the official code runs 500: 4× slower to build for an L within 0.5 %), τ₀ = τ₁ = ``threshold_init``.
Constraints: the training loop calls :meth:`CDLNet.project_` after every ``opt.step()`` when the model has
it: τ₀, τ₁ ≥ 0 and every filter (each (m, c) slice, as uball_project) in the unit ℓ2 ball.

Symbol → attribute (n = K untied, 1 tied):

    ========  ======================  ==============================================
    A⁽ᵏ⁾      ``self.A[k]``           (n, M, C, P, P) analysis, Conv2d-like
    B⁽ᵏ⁾      ``self.B[k]``           (n, M, C, P, P) synthesis, ConvTranspose2d-like
    D         ``self.B[0]``           the dictionary (:meth:`dictionary`)
    τ₀, τ₁    ``self.tau0, tau1``     (n, M); tau1 is None unless noise_adaptive
    K         ``config.depth``        maximum; :meth:`set_depth` runs fewer
    M, P, s   ``filters, kernel_size, stride``
    ========  ======================  ==============================================

Paper's small model (repo args.json): K=20, M=32, P=7, s=1, C=1, adaptive → 2·K·M·C·P² + 2·K·M =
62,720 + 1,280 = 64,000 parameters (large: K=30, M=169, s=2 → 507,000).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models.convops import conv_analysis, conv_synthesis, power_method
from sparsefold.models.noise_level import estimate_sigma, noise_adaptive_threshold
from sparsefold.models.prox import soft_threshold
from sparsefold.models.tiling import Tiling
from sparsefold.models.unfolding import unfolding

POWER_SIZE, POWER_ITERS = 128, 100  # L = ‖D‖²₂ for the init and for conv_ista (same settings)


def _pads(kernel: int, stride: int) -> tuple[int, int]:
    """Zero padding (lead, trail) of the 'same' conv: padded size s·(h−1)+P for an s·h image."""
    lead = (kernel - 1) // 2
    return lead, kernel - stride - lead


def analysis(x: Tensor, weight: Tensor, stride: int, add: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``add + alpha·A x``, A = Dᵀ: x (N, C, s·h, s·w) -> (N, M, h, w); weight (M, C, P, P)."""
    lead, trail = _pads(weight.shape[-1], stride)
    return conv_analysis(F.pad(x, (lead, trail, lead, trail)), weight, stride, add=add, alpha=alpha)


def synthesis(z: Tensor, weight: Tensor, stride: int) -> Tensor:
    """D z: codes (N, M, h, w) -> image (N, C, s·h, s·w), the exact adjoint of :func:`analysis`."""
    k, (h, w) = weight.shape[-1], z.shape[-2:]
    lead = _pads(k, stride)[0]
    full = conv_synthesis(z, weight, stride, (stride * (h - 1) + k, stride * (w - 1) + k))
    return full[..., lead : lead + stride * h, lead : lead + stride * w]  # crop = adjoint of the zero pad


@torch.no_grad()
def conv_ista(y: Tensor, W: Tensor, lam: Tensor | float, iters: int, stride: int = 1,
              fista: bool = False) -> Tensor:
    """ISTA (or FISTA, Beck & Teboulle 2009) for min ½‖y − D z‖² + λ‖z‖₁, D = :func:`synthesis` with W,
    step 1/L, L from the power method; z_0 = 0. y (N, C, H, W) with H, W multiples of s -> z (N, M, H/s, W/s)."""
    L = power_method(W, stride, size=max(POWER_SIZE, 4 * W.shape[-1]), iters=POWER_ITERS)
    h, w = y.shape[-2] // stride, y.shape[-1] // stride
    z = y.new_zeros(y.shape[0], W.shape[0], h, w)
    v, t = z, 1.0
    for _ in range(iters):
        z_new = soft_threshold(analysis(synthesis(v, W, stride) - y, W, stride, add=v, alpha=-1.0 / L), lam / L)
        if fista:
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            v, t = z_new + (t - 1) / t_new * (z_new - z), t_new
        else:
            v = z_new
        z = z_new
    return z


@dataclass(frozen=True, kw_only=True)
class CDLNetConfig:
    """Hyperparameters of :class:`CDLNet` (defaults: the paper's small noise-adaptive model)."""

    name: str = "cdlnet"
    depth: int = 20
    filters: int = 32
    kernel_size: int = 7
    stride: int = 1
    channels: int = 1
    tied: bool = False
    noise_adaptive: bool = True
    threshold_init: float = 1e-2
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.filters >= 1, "filters", f"must be >= 1, got {self.filters}")
        check(self.kernel_size >= 1, "kernel_size", f"must be >= 1, got {self.kernel_size}")
        top = self.kernel_size - (self.kernel_size - 1) // 2  # larger strides leave border pixels uncovered
        check(1 <= self.stride <= top, "stride", f"must be in [1, {top}] for kernel_size={self.kernel_size}, "
              f"got {self.stride}")
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        check(self.threshold_init >= 0, "threshold_init", f"must be >= 0, got {self.threshold_init}")


def initial_dictionary(config: CDLNetConfig) -> Tensor:
    """D (M, C, P, P): random normal atoms seeded by ``config.init_seed``, divided by √L (‖D‖₂ = 1)."""
    M, C, P = config.filters, config.channels, config.kernel_size
    w = torch.randn(M, C, P, P, generator=torch.Generator().manual_seed(config.init_seed))
    return w / power_method(w, config.stride, size=max(POWER_SIZE, 4 * P), iters=POWER_ITERS) ** 0.5


class CDLNet(nn.Module):
    """Untied (or tied) convolutional LISTA with noise-adaptive thresholds. See the module docstring."""

    checkpoint_unfoldings = False  # True: each layer is recomputed in backward (models/unfolding.py)

    def __init__(self, config: CDLNetConfig, init: bool = True) -> None:
        """``init=False``: A, B allocated but not drawn (no power method), for a state dict to fill."""
        super().__init__()
        self.config = config
        K, M, C, P = config.depth, config.filters, config.channels, config.kernel_size
        w = initial_dictionary(config) if init else torch.empty(M, C, P, P)
        n = 1 if config.tied else K
        self.A = nn.Parameter(w.expand(n, -1, -1, -1, -1).clone())  # A⁽ᵏ⁾ analysis
        self.B = nn.Parameter(w.expand(n, -1, -1, -1, -1).clone())  # B⁽ᵏ⁾ synthesis, B⁽⁰⁾ = D
        self.tau0 = nn.Parameter(torch.full((n, M), config.threshold_init))
        self.tau1: nn.Parameter | None
        if config.noise_adaptive:
            self.tau1 = nn.Parameter(torch.full((n, M), config.threshold_init))
        else:
            self.register_parameter("tau1", None)
        self.depth = K  # active layers (set_depth)

    @property
    def tiling(self) -> Tiling:
        """2·depth 'same' convolutions (A, depth−1 × (B, A), D), each pair reaching P−1 pixels: halo
        depth·(P−1). The image mean is global: tiles get the whole image's (``forward``'s ``mean``)."""
        return Tiling(self.depth * (self.config.kernel_size - 1), self.config.stride)

    def _layer(self, k: int) -> int:
        return 0 if self.config.tied else k

    def thresholds(self, k: int, sigma: Tensor | None) -> Tensor:
        """τ⁽ᵏ⁾ (Eq. 4): (B, M, 1, 1) for σ (B,), or (1, M, 1, 1) without the σ term."""
        j = self._layer(k)
        if self.tau1 is None:
            return self.tau0[j].view(1, -1, 1, 1)
        if sigma is None:
            raise ValueError("sigma is required: the model is noise-adaptive (see noise_level)")
        return noise_adaptive_threshold(self.tau0[j], self.tau1[j], sigma)

    def noise_level(self, y: Tensor, sigma: Tensor | float | None) -> Tensor | None:
        """σ per image (B,) in 0..255 units: given, estimated from y (MAD) when None, unused when not adaptive."""
        if self.tau1 is None:
            return None
        if sigma is None:
            return estimate_sigma(y.detach()).to(y)
        return torch.as_tensor(sigma, dtype=y.dtype, device=y.device).reshape(-1).expand(y.shape[0])

    # ------------------------------------------------------------------ the unfolded iteration
    def sparse_code(self, yp: Tensor, sigma: Tensor | None, keep_all: bool = True) -> list[Tensor]:
        """Codes z⁽⁰⁾..z⁽ᵀ⁻¹⁾ of a prepared input yp (N, C, s·h, s·w), each (N, M, h, w), T = self.depth;
        σ (N,) from :meth:`noise_level` (required when noise-adaptive). ``keep_all=False`` keeps the last only."""
        s = self.config.stride
        z = soft_threshold(analysis(yp, self.A[0], s), self.thresholds(0, sigma))  # Eq. (1)
        codes = [z]
        for k in range(1, self.depth):
            z = unfolding(self, self.step, k, z, yp, sigma)  # Eq. (2)
            if not keep_all:
                codes.clear()
            codes.append(z)
        return codes

    def step(self, k: int, z: Tensor, yp: Tensor, sigma: Tensor | None) -> Tensor:
        """Layer k, Eq. (2): z⁽ᵏ⁾ = S_τ⁽ᵏ⁾(z − A⁽ᵏ⁾(B⁽ᵏ⁾z − y)); z (N, M, h, w), yp (N, C, s·h, s·w)."""
        j, s = self._layer(k), self.config.stride
        r = synthesis(z, self.B[j], s) - yp  # B⁽ᵏ⁾z − y: (N, C, s·h, s·w)
        v = analysis(r, self.A[j], s, add=z, alpha=-1.0)  # z − A⁽ᵏ⁾(B⁽ᵏ⁾z − y), fused in the GEMM
        return soft_threshold(v, self.thresholds(k, sigma))

    def _prepare(self, y: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor, tuple[int, int, int, int]]:
        """Subtract the image mean (given, or y's) and reflect-pad to a multiple of s (official pre_process)."""
        s, (h, w) = self.config.stride, y.shape[-2:]
        mean = y.mean(dim=(-2, -1), keepdim=True) if mean is None else mean  # (B, C, 1, 1)
        dh, dw = -h % s, -w % s
        pads = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)  # (left, right, top, bottom)
        yp = F.pad(y - mean, pads, mode="reflect") if dh or dw else y - mean
        return yp, mean, pads

    def _decode(self, z: Tensor, mean: Tensor, pads: tuple[int, int, int, int], h: int, w: int) -> Tensor:
        xp = synthesis(z, self.B[0], self.config.stride)  # Eq. (3): D z, (B, C, Hp, Wp)
        return xp[..., pads[2] : pads[2] + h, pads[0] : pads[0] + w] + mean

    def forward(self, y: Tensor, sigma: Tensor | float | None = None, mean: Tensor | None = None) -> Tensor:
        """y (B, C, H, W) noisy, σ (B,) 0..255 or None -> x̂ (B, C, H, W). ``mean`` (B, C, 1, 1): the mean
        to centre on instead of y's (a tile of a larger image is given the whole image's)."""
        yp, mean, pads = self._prepare(y, mean)
        z = self.sparse_code(yp, self.noise_level(y, sigma), keep_all=False)[-1]
        return self._decode(z, mean, pads, *y.shape[-2:])

    def reconstructions(self, y: Tensor, sigma: Tensor | float | None = None) -> list[Tensor]:
        """x̂ = D z⁽ᵏ⁾ + mean(y) after every layer k (multi-layer loss); the last equals forward."""
        yp, mean, pads = self._prepare(y)
        codes = self.sparse_code(yp, self.noise_level(y, sigma))
        return [self._decode(z, mean, pads, *y.shape[-2:]) for z in codes]

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def set_depth(self, T: int) -> None:
        """Run T layers from now on; untied layers beyond the current depth start as copies of the last one."""
        if not 1 <= T <= self.config.depth:
            raise ValueError(f"depth must be in [1, {self.config.depth}], got {T}")
        if not self.config.tied and T > self.depth:
            for p in (self.A, self.B, self.tau0, self.tau1):
                if p is not None:
                    p[self.depth : T] = p[self.depth - 1]
        self.depth = T

    @torch.no_grad()
    def project_(self) -> None:
        """The paper's constraints, after every optimizer step: τ ≥ 0, each filter in the unit ℓ2 ball."""
        for t in (self.tau0, self.tau1):
            if t is not None:
                t.clamp_(min=0.0)
        for w in (self.A, self.B):
            w.div_(w.norm(dim=(-2, -1), keepdim=True).clamp(min=1.0))  # W·min(1, 1/‖W‖)

    # ------------------------------------------------------------------ monitoring
    def dictionary(self) -> Tensor:
        """The dictionary D = B⁽⁰⁾, (M, C, P, P) atoms."""
        return self.B[0].detach()

    @torch.no_grad()
    def code_sparsity(self, y: Tensor, sigma: Tensor | float | None = None) -> list[float]:
        """Fraction of non-zero codes after each layer, for a batch y."""
        yp, _, _ = self._prepare(y)
        return [float((z != 0).float().mean()) for z in self.sparse_code(yp, self.noise_level(y, sigma))]

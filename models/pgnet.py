r"""PGNet: an unfolded proximal-gradient network with a learned convolutional sparse prior, for restoration
with a known linear operator A (:mod:`.operators`: denoising, inpainting, deblurring, super-resolution, MRI).

Problem (convolutional sparse coding of the image behind the measurement y = A x + n, then x̂ = D ẑ):

    ẑ = argmin_z ½‖A D z − y‖²₂ + λ‖z‖₁,     D z = Σ_k d_k ∗ z_k   (K filters k×k, C channels, stride 1)

D is the "same" convolution with zero padding k//2 (:func:`synthesis`, ``F.conv_transpose2d``) and Dᵀ its
exact adjoint (:func:`analysis`, ``F.conv2d``); k is odd, so both keep the H×W grid.

Classical iteration (ISTA on z, step 1/L, L = ‖A D‖²₂ ≤ ‖A‖²₂‖D‖²₂):

    z_{t+1} = S_{λ/L}( z_t − (1/L) Dᵀ Aᵀ(A D z_t − y) )

Learned iteration (T = ``depth`` steps after z_0; untied, or one B, D, θ, α shared by all t when ``tied``):

    z_0     = S_{θ_0}( η_0 B_0ᵀ Aᵀy )                                              (Eq. 1)
    z_{t+1} = S_{θ_{t+1}}( z_t − η_{t+1} B_{t+1}ᵀ (AᵀA D_t z_t − Aᵀy) ),  t = 0..T−1   (Eq. 2)
    x̂       = D_T z_T                                                              (Eq. 3)
    η_t     = α_t / ‖A‖²₂                                                          (Eq. 4)

Eq. 1 is Eq. 2 from z_{−1} = 0. The index of B, θ, α is that of the code they make, the index of D that
of the code it decodes (D_T is the output decoder).

Init: every B_t and D_t is the same random bank W/√L_W (seeded normal atoms, L_W = ‖W‖²₂ by the power
method on a 128² grid, as CDLNet), so ‖D‖₂ = 1 and L = ‖A‖²₂: α_t = 1 gives η_t = 1/L, and
θ_t = ``threshold_init`` is λ/L for λ = θ·‖A‖²₂. The tied network at init is then ISTA, z_T being T + 1
ISTA steps from z = 0 (the tests check it for every operator kind). ‖D‖₂ = 1 up to the power method, which
stops ~1 % below: η may exceed 1/‖A D‖²₂ by as much, and ISTA descends for any step < 2/L.

Symbol → attribute (n = T + 1 untied, 1 tied):

    ==========  =============================  ===========================================
    B_t         ``self.B`` (analysis)          (n, K, C, k, k)
    D_t         ``self.D`` (synthesis)         (n, K, C, k, k); D_T = ``self.D[-1]``
    θ_t         ``self.threshold``             (n, K)  one per filter, ≥ 0 (:meth:`project_`)
    α_t         ``self.alpha``                 (n,)    the step in units of 1/‖A‖²₂
    A           ``op`` argument of forward     an :class:`~.operators.Operator` (None: A = I)
    T           ``config.depth``               steps after z_0 (T + 1 soft thresholds)
    K, C, k     ``filters, channels, kernel_size``
    ==========  =============================  ===========================================

Parameters: n·(2·K·C·k² + K + 1); default T=10, K=32, C=1, k=7 → 11·3,169 = 34,859.

Differences from the classical iteration, and from CDLNet:

* The step is learned relative to 1/‖A‖²₂ (Eq. 4; ‖A‖²₂ from ``op.norm`` at every call, the max over the
  batch), so one set of weights serves operators of different norms (a box Downsample has ‖A‖²₂ = 1/f²).
  ``op.norm`` is analytic for every operator but the reflect Blur, where it is a power method.
* Aᵀy is computed once and the residual taken in image space, AᵀA D z − Aᵀy: real even for MRI's complex
  y. The image shape is Aᵀy's (larger than y for super-resolution).
* No mean subtraction (under A ≠ I the mean of y is not that of x); σ is accepted and unused.
* ``depth`` counts the steps after z_0 (CDLNet's counts soft thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models.cdlnet import POWER_ITERS, POWER_SIZE
from sparsefold.models.convops import power_method
from sparsefold.models.operators import Identity, Operator
from sparsefold.models.prox import soft_threshold
from sparsefold.models.unfolding import unfolding


@dataclass(frozen=True, kw_only=True)
class PGNetConfig:
    """Hyperparameters of :class:`PGNet`."""

    name: str = "pgnet"
    channels: int = 1
    filters: int = 32
    kernel_size: int = 7
    depth: int = 10
    tied: bool = False
    threshold_init: float = 1e-2
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        check(self.filters >= 1, "filters", f"must be >= 1, got {self.filters}")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size",
              f"must be odd and >= 1 (a 'same' convolution), got {self.kernel_size}")
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.threshold_init >= 0, "threshold_init", f"must be >= 0, got {self.threshold_init}")


def analysis(x: Tensor, weight: Tensor) -> Tensor:
    """Dᵀ x: image (N, C, H, W) -> codes (N, K, H, W); weight (K, C, k, k), zero padding k//2."""
    return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


def synthesis(z: Tensor, weight: Tensor) -> Tensor:
    """D z: codes (N, K, H, W) -> image (N, C, H, W), the exact adjoint of :func:`analysis`."""
    return F.conv_transpose2d(z, weight, padding=weight.shape[-1] // 2)


def initial_dictionary(config: PGNetConfig) -> Tensor:
    """D (K, C, k, k): random normal atoms seeded by ``config.init_seed``, divided by √L_W (‖D‖₂ = 1)."""
    K, C, k = config.filters, config.channels, config.kernel_size
    w = torch.randn(K, C, k, k, generator=torch.Generator().manual_seed(config.init_seed))
    return w / power_method(w, 1, size=max(POWER_SIZE, 4 * k), iters=POWER_ITERS) ** 0.5


class PGNet(nn.Module):
    """Unfolded proximal gradient (ISTA) with learned conv analysis/synthesis. See the module docstring."""

    takes_operator = True  # the Restorer contract (models/contract.py): forward(y, sigma, op)
    checkpoint_unfoldings = False  # True: each step is recomputed in backward (models/unfolding.py)

    def __init__(self, config: PGNetConfig, init: bool = True) -> None:
        """``init=False``: B, D allocated but not drawn (no power method), for a state dict to fill."""
        super().__init__()
        self.config = config
        K, C, k = config.filters, config.channels, config.kernel_size
        n = 1 if config.tied else config.depth + 1
        w = initial_dictionary(config) if init else torch.empty(K, C, k, k)
        self.B = nn.Parameter(w.expand(n, -1, -1, -1, -1).clone())  # B_t analysis
        self.D = nn.Parameter(w.expand(n, -1, -1, -1, -1).clone())  # D_t synthesis, D_T decoder
        self.threshold = nn.Parameter(torch.full((n, K), config.threshold_init))  # θ_t
        self.alpha = nn.Parameter(torch.ones(n))  # α_t: η_t = α_t/‖A‖²₂

    def _stage(self, t: int) -> int:
        return 0 if self.config.tied else t

    # ------------------------------------------------------------------ the unfolded iteration
    def sparse_code(self, aty: Tensor, op: Operator, inv_norm: float, keep_all: bool = True) -> list[Tensor]:
        """Codes z_0..z_T of Aᵀy (N, C, H, W), each (N, K, H, W); ``inv_norm`` = 1/‖A‖²₂.
        ``keep_all=False`` keeps the last only."""
        z = self.step(0, aty.new_zeros(()), aty, op, inv_norm)  # Eq. (1): Eq. (2) from z_{−1} = 0
        codes = [z]
        for t in range(1, self.config.depth + 1):
            z = unfolding(self, self.step, t, z, aty, op, inv_norm)  # Eq. (2)
            if not keep_all:
                codes.clear()
            codes.append(z)
        return codes

    def step(self, t: int, z: Tensor, aty: Tensor, op: Operator, inv_norm: float) -> Tensor:
        """z_t = S_{θ_t}(z_{t−1} − η_t B_tᵀ(AᵀA D_{t−1} z_{t−1} − Aᵀy)), Eq. (2); t = 0 with z a zero scalar is
        Eq. (1). z (N, K, H, W) or (), aty (N, C, H, W) -> (N, K, H, W)."""
        j = self._stage(t)
        if t == 0:
            r = -aty  # AᵀA D 0 − Aᵀy
        else:
            r = op.AtA(synthesis(z, self.D[self._stage(t - 1)])) - aty  # AᵀA D_{t−1} z − Aᵀy: (N, C, H, W)
        eta = self.alpha[j] * inv_norm  # Eq. (4)
        v = z - eta * analysis(r, self.B[j])  # gradient step on the codes: (N, K, H, W)
        return soft_threshold(v, self.threshold[j].view(1, -1, 1, 1))

    def forward(self, y: Tensor, sigma: Tensor | None = None, op: Operator | None = None) -> Tensor:
        """y of ``op``'s measurement shape (complex for MRI), σ unused, op None = Identity -> x̂ (B, C, H, W)."""
        op = Identity() if op is None else op
        aty = op.A_adjoint(y)  # Aᵀy: (B, C, H, W), real
        check(aty.dim() == 4 and aty.shape[1] == self.config.channels, "y",
              f"Aᵀy must be (B, {self.config.channels}, H, W), got shape {tuple(aty.shape)}")
        inv_norm = 1.0 / max(op.norm(tuple(aty.shape)), 1e-12)  # ‖A‖²₂ = 0: Aᵀy = 0, no step to take
        z = self.sparse_code(aty, op, inv_norm, keep_all=False)[-1]  # z_T: (B, K, H, W)
        return synthesis(z, self.D[-1])  # Eq. (3)

    # ------------------------------------------------------------------ training hooks, monitoring
    @torch.no_grad()
    def project_(self) -> None:
        """θ_t ≥ 0 after every optimizer step."""
        self.threshold.clamp_(min=0.0)

    def dictionary(self) -> Tensor:
        """The output decoder D_T, (K, C, k, k) atoms."""
        return self.D[-1].detach()

r"""Deep K-SVD denoising (Scetbon, Elad & Milanfar, IEEE TIP 2021, arXiv 1909.13164; "LKSVD").

K-SVD denoising with its OMP step replaced by ISTA on every overlapping p×p patch, λ predicted per patch:

    z_k = argmin_z ½‖y_k − D z‖²₂ + λ_k‖z‖₁,     λ_k = MLP(y_k),     x̂ = Σ_k R_kᵀ(w ⊙ x̂_k) / Σ_k R_kᵀ w

Classical iteration (ISTA with step 1/c, c = L = ‖D‖²₂ at initialization):

    z_{t+1} = S_{λ/c}( z_t − (1/c) Dᵀ(D z_t − y) )

Learned iteration (official ``Deep_KSVD.py::DenoisingNet_MLP``; D, c, MLP and w shared by all t):

    λ_k     = W₄ ρ(W₃ ρ(W₂ ρ(W₁ y_k + b₁) + b₂) + b₃) + b₄,   ρ = ReLU       (Eq. 1)
    z_0     = S_{λ_k/c}(Dᵀ y_k)                                              (Eq. 2)
    z_{t+1} = S_{λ_k/c}( (I − DᵀD/c) z_t + Dᵀ y_k / c ),   t = 0..T−1         (Eq. 3)
    x̂_k    = clamp(D z_T, −1, 1)                                            (Eq. 4)
    x̂      = Σ_k R_kᵀ(w ⊙ x̂_k) / Σ_k R_kᵀ w                                (Eq. 5)

Eq. (2) is the official start (Dᵀy without the 1/c), so T = ``depth`` counts the ISTA steps after it and
there are T+1 codes z_0..z_T; from z_0 on, Eq. (3) is exactly ISTA (checked in tests/test_lista_ksvd.py).

Symbol → attribute (m = p², K atoms):

    ==========  ========================  ==============================================
    D           ``self.D``                (m, K), overcomplete 2-D DCT at init
    c           ``self.c``                (1,), ‖D₀‖²₂ at init
    W₁..W₄      ``self.mlp``              m → 128 → 64 → 32 → 1, biases, ReLU between
    w           ``self.w``                (m,) the p×p averaging mask, N(1, 0.1²) at init
    T           ``config.depth``          ISTA steps after z_0
    ==========  ========================  ==============================================

Default = the official training script: p=8, K=256, T=5 (``load_model.py`` uses 7) →
16,384 (D) + 18,689 (MLP) + 1 (c) + 64 (w) = 35,138 parameters.

Differences from the official code: images here are in [0, 1]; ``forward`` maps them to the official
[−1, 1] (y' = 2y − 1, x̂ = (x̂' + 1)/2), so σ=25 on [0, 1] is the official σ=25 on 0..255 and the clamp of
Eq. (4) is the [0, 1] range. A negative λ_k/c means no shrinkage (θ⁺ = max(θ, 0), ``prox.soft_threshold``)
where the official ``sign(x)·max(|x| − θ, 0)`` would grow the codes. Grayscale only, as the paper.
``lambda_init=λ₀`` (not in the paper) sets W₄ = 0, b₄ = λ₀, so the untrained model is fixed-λ ISTA on the DCT
(λ₀ = 0.7: 27.7 dB on 4 Set12 images at σ=25, against 18.9 under the official init, which barely shrinks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models._patches import aggregate_patches, extract_patches, overcomplete_dct
from sparsefold.models.prox import soft_threshold
from sparsefold.models.tiling import Tiling
from sparsefold.models.unfolding import unfolding

HIDDEN = (128, 64, 32)  # the official MLP widths


@dataclass(frozen=True, kw_only=True)
class DeepKSVDConfig:
    """Hyperparameters of :class:`DeepKSVD` (defaults: the official σ=25 training script)."""

    name: str = "deep_ksvd"
    patch_size: int = 8
    atoms: int = 256
    depth: int = 5
    init_seed: int = 0
    lambda_init: float | None = None  # None: official nn.Linear init; a value: λ_k ≡ lambda_init at init

    def __post_init__(self) -> None:
        check(self.patch_size >= 2, "patch_size", f"must be >= 2, got {self.patch_size}")
        q = math.isqrt(self.atoms)
        check(q * q == self.atoms and q >= self.patch_size, "atoms",
              f"must be a square q² with q >= patch_size={self.patch_size} (2-D DCT init), got {self.atoms}")
        check(self.depth >= 0, "depth", f"must be >= 0, got {self.depth}")
        check(self.lambda_init is None or self.lambda_init > 0, "lambda_init",
              f"must be None or > 0, got {self.lambda_init}")


class DeepKSVD(nn.Module):
    """Deep K-SVD: per-patch λ from an MLP, tied ISTA, learned averaging mask. See the module docstring."""

    checkpoint_unfoldings = False  # True: each unfolding is recomputed in backward (models/unfolding.py)

    def __init__(self, config: DeepKSVDConfig, init: bool = True) -> None:
        """``init=False``: the parameters allocated but not initialized, for a state dict to fill."""
        super().__init__()
        self.config = config
        p, K = config.patch_size, config.atoms
        m = p * p
        self.D = nn.Parameter(torch.empty(m, K))
        self.c = nn.Parameter(torch.empty(1))
        widths = (m, *HIDDEN, 1)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()] if i < len(HIDDEN) else [nn.Linear(n_in, n_out)]
        self.mlp = nn.Sequential(*layers)
        self.w = nn.Parameter(torch.empty(m))
        self.depth = config.depth  # active depth, see set_depth
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """D = the overcomplete DCT, c = ‖D‖²₂, the MLP at nn.Linear's default init and w = 1 + 0.1·N(0, 1),
        all seeded by ``config.init_seed``."""
        p, K = self.config.patch_size, self.config.atoms
        g = torch.Generator().manual_seed(self.config.init_seed)
        self.D.copy_(overcomplete_dct(p, math.isqrt(K)))  # (m, K)
        self.c.fill_(float(torch.linalg.matrix_norm(self.D.double(), ord=2)) ** 2)
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]  # mlp[::2]
        for lin in linears:
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)  # nn.Linear's default, seeded
            bound = 1 / math.sqrt(lin.in_features)
            nn.init.uniform_(lin.bias, -bound, bound, generator=g)
        if self.config.lambda_init is not None:  # start as fixed-λ ISTA on the DCT: W₄ = 0, b₄ = λ₀
            nn.init.zeros_(linears[-1].weight)
            nn.init.constant_(linears[-1].bias, self.config.lambda_init)
        self.w.copy_(1 + 0.1 * torch.randn(p * p, generator=g))

    @property
    def tiling(self) -> Tiling:
        """A pixel's estimate averages the patches covering it, each coded from its own pixels: halo p−1."""
        return Tiling(self.config.patch_size - 1, 1)

    # ------------------------------------------------------------------ the unfolded iteration
    def sparse_code(self, P: Tensor, keep_all: bool = True) -> tuple[list[Tensor], Tensor]:
        """Codes z_0..z_T and λ of patch vectors P (N, m) on the [−1, 1] scale: ([(N, K)], (N, 1))."""
        lam = self.mlp(P)  # Eq. (1): (N, 1)
        theta = lam / self.c  # λ_k / c
        Dty = P @ self.D  # Dᵀy: (N, K)
        S = torch.eye(self.D.shape[1], dtype=P.dtype, device=P.device) - self.D.T @ self.D / self.c  # (K, K)
        codes = [soft_threshold(Dty, theta)]  # Eq. (2)
        b = Dty / self.c
        for _ in range(self.depth):
            codes.append(unfolding(self, self.step, codes[-1], b, S, theta))  # Eq. (3)
            if not keep_all:
                del codes[0]
        return codes, lam

    @staticmethod
    def step(z: Tensor, b: Tensor, S: Tensor, theta: Tensor) -> Tensor:
        """One ISTA step, Eq. (3): S_θ(S z + Dᵀy/c) for z (N, K), S (K, K) symmetric, θ = λ/c (N, 1)."""
        return soft_threshold(torch.addmm(b, z, S), theta)

    def _decode(self, z: Tensor, shape: torch.Size) -> Tensor:
        """Eqs. (4)-(5) and the map back to [0, 1]: codes (B·L, K) -> x̂ (B, 1, H, W)."""
        xk = torch.clamp(z @ self.D.T, -1.0, 1.0)  # Eq. (4): (B·L, m)
        x = aggregate_patches(xk.view(shape[0], -1, xk.shape[1]), self.w, shape[-2:])  # Eq. (5)
        return (x + 1) / 2

    def _patches(self, y: Tensor) -> Tensor:
        """y (B, 1, H, W) in [0, 1] -> patch vectors (B·L, m) on the official [−1, 1] scale."""
        return extract_patches(2 * y - 1, self.config.patch_size).reshape(-1, self.config.patch_size ** 2)

    def reconstructions(self, y: Tensor, sigma: Tensor | None = None) -> list[Tensor]:
        """x̂ decoded from z_0..z_T (T+1 images; σ is not used)."""
        return [self._decode(z, y.shape) for z in self.sparse_code(self._patches(y))[0]]

    def forward(self, y: Tensor, sigma: Tensor | None = None) -> Tensor:
        """y (B, 1, H, W) noisy in [0, 1], H, W >= patch_size -> x̂ (B, 1, H, W). σ is not used."""
        return self._decode(self.sparse_code(self._patches(y), keep_all=False)[0][-1], y.shape)

    # ------------------------------------------------------------------ incremental depth, monitoring
    def set_depth(self, depth: int) -> None:
        """Run ``depth`` ISTA steps after z_0 from now on (0..config.depth; tied, nothing to copy)."""
        if not 0 <= depth <= self.config.depth:
            raise ValueError(f"depth must be in [0, {self.config.depth}], got {depth}")
        self.depth = depth

    def dictionary(self) -> Tensor:
        """Atoms D as (K, 1, p, p)."""
        p = self.config.patch_size
        return self.D.detach().T.reshape(-1, 1, p, p)

    @torch.no_grad()
    def code_sparsity(self, y: Tensor) -> list[float]:
        """Fraction of non-zero codes in z_0..z_T, for a batch y."""
        return [float((z != 0).float().mean()) for z in self.sparse_code(self._patches(y))[0]]

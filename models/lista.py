r"""LISTA on image patches (Gregor & LeCun, ICML 2010), with the ISTA / FISTA reference solvers.

Problem (sparse coding of every overlapping p×p patch y_k of the noisy image, DC removed):

    z_k = argmin_z ½‖(y_k − μ_k) − D z‖²₂ + λ‖z‖₁,     x̂_k = D z_k + μ_k,     x̂ = Σ_k R_kᵀ x̂_k / Σ_k R_kᵀ 1

with μ_k the mean of patch k (per channel) and R_k the patch extraction (``_patches.py``).

Classical iteration (ISTA, step 1/L with L = ‖D‖²₂ exact; FISTA: Beck & Teboulle 2009):

    z_{t+1} = S_{λ/L}( z_t + (1/L) Dᵀ(y − D z_t) ),   z_0 = 0                               (ISTA)
    z_{t+1} = S_{λ/L}( v_t + (1/L) Dᵀ(y − D v_t) ),   v_{t+1} = z_{t+1} + (s_t−1)/s_{t+1}·(z_{t+1} − z_t),
    s_{t+1} = (1 + √(1 + 4 s_t²))/2                                                          (FISTA)

Learned iteration (T layers; z_0 = 0 so layer 1 needs no S):

    z_1     = S_{θ_0}(W_e,0 y)                                         (Eq. 1)
    z_{t+1} = S_{θ_t}(W_e,t y + S_t z_t),   t = 1..T−1                 (Eq. 2)
    x̂_k    = D z_T + μ_k, then patch averaging                        (Eq. 3)

Tied: one W_e, S, θ shared by all layers; untied: one set per layer. Initialization from a dictionary
D₀ (overcomplete DCT or random unit-norm atoms): W_e = D₀ᵀ/L, S = I − D₀ᵀD₀/L, θ = λ/L, D = D₀, so at
initialization T layers are exactly T ISTA iterations on the patch LASSO (tests/test_lista_ksvd.py).

Symbol → attribute (m = C·p²):

    ====  ==================  ================================================
    W_e   ``self.W_e``        (K, m) tied, (T, K, m) untied
    S     ``self.S``          (K, K) tied, (T−1, K, K) untied (S_t at [t−1])
    θ     ``self.threshold``  (K,) tied, (T, K) untied: per atom (per layer)
    D     ``self.D``          (m, K) decoder
    T     ``config.depth``    maximum depth; ``set_depth`` runs fewer
    ====  ==================  ================================================

Default: p=8, K=256 (DCT 16×16), T=5, tied → 256·64 + 256² + 256 + 64·256 = 98,560 parameters
(untied T=5: 5·16,384 + 4·65,536 + 5·256 + 16,384 = 361,728).
λ = 0.1 (θ = λ/L, L = 14.0 for that DCT): the best initial PSNR of λ ∈ {0.02, 0.05, 0.1, 0.2, 0.4} for
T=5 at σ=25 on a Set12 crop (24.7 dB from 20.2 dB noisy). The random dictionary draws from ``init_seed``.
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


def lasso_objective(D: Tensor, y: Tensor, z: Tensor, lam: Tensor | float) -> Tensor:
    """½‖y − D z‖² + λ‖z‖₁ per signal: D (m, K), y (N, m), z (N, K), λ scalar or (N, 1) -> (N,)."""
    return 0.5 * (y - z @ D.T).pow(2).sum(-1) + (lam * z.abs()).sum(-1)


@torch.no_grad()
def ista(D: Tensor, y: Tensor, lam: Tensor | float, iters: int, fista: bool = False,
         z0: Tensor | None = None) -> Tensor:
    """Reference ISTA / FISTA for ``lasso_objective``, step 1/L with L = ‖D‖²₂ (exact spectral norm).

    D (m, K), y (N, m), λ scalar or (N, 1); starts from ``z0`` (N, K) or 0; returns z (N, K)."""
    L = float(torch.linalg.matrix_norm(D.double(), ord=2)) ** 2
    z = y.new_zeros(y.shape[0], D.shape[1]) if z0 is None else z0.clone()
    v, s = z, 1.0
    Dty = y @ D / L  # (N, K)
    G = D.T @ D / L  # (K, K)
    for _ in range(iters):
        z_new = soft_threshold(v - v @ G + Dty, lam / L)  # z + (1/L)Dᵀ(y − D z), then the prox
        if fista:
            s_new = (1 + math.sqrt(1 + 4 * s * s)) / 2
            v = z_new + (s - 1) / s_new * (z_new - z)
            s = s_new
        else:
            v = z_new
        z = z_new
    return z


def initial_dictionary(kind: str, m: int, atoms: int, channels: int, seed: int) -> Tensor:
    """D₀ (m, K): block-diagonal over channels of the p×p overcomplete DCT (K = C·q²), or N(0,1) atoms
    normalized to unit norm."""
    if kind == "dct":
        p, q = math.isqrt(m // channels), math.isqrt(atoms // channels)
        return torch.kron(torch.eye(channels), overcomplete_dct(p, q))
    d = torch.randn(m, atoms, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=0, keepdim=True)


@dataclass(frozen=True, kw_only=True)
class LISTAConfig:
    """Hyperparameters of :class:`LISTA` (λ in the units of [0, 1] images)."""

    name: str = "lista"
    patch_size: int = 8
    atoms: int = 256
    depth: int = 5
    tied: bool = True
    dictionary_init: str = "dct"
    lam: float = 0.1
    channels: int = 1
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.patch_size >= 2, "patch_size", f"must be >= 2, got {self.patch_size}")
        check(self.atoms >= 1, "atoms", f"must be >= 1, got {self.atoms}")
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.dictionary_init in ("dct", "random"), "dictionary_init",
              f"must be 'dct' or 'random', got {self.dictionary_init!r}")
        check(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        q = math.isqrt(self.atoms // self.channels)
        check(self.dictionary_init != "dct" or (q * q * self.channels == self.atoms and q >= self.patch_size),
              "atoms", f"dct init needs atoms = channels·q² with q >= patch_size={self.patch_size}, got {self.atoms}")


def ista_weights(config: LISTAConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(D₀, W_e, S, θ) at the ISTA values W_e = D₀ᵀ/L, S = I − D₀ᵀD₀/L, θ = λ/L (computed in float64,
    rounded once to fp32), one copy per layer when untied."""
    T, K, m = config.depth, config.atoms, config.channels * config.patch_size ** 2
    D0 = initial_dictionary(config.dictionary_init, m, K, config.channels, config.init_seed).double()  # (m, K)
    L = float(torch.linalg.matrix_norm(D0, ord=2)) ** 2
    W_e, S = D0.T / L, torch.eye(K, dtype=D0.dtype) - D0.T @ D0 / L
    theta = torch.full((K,), config.lam / L)
    D0, W_e, S = D0.float(), W_e.float(), S.float()
    if not config.tied:
        W_e, S, theta = W_e.repeat(T, 1, 1), S.repeat(T - 1, 1, 1), theta.repeat(T, 1)
    return D0, W_e, S, theta


class LISTA(nn.Module):
    """LISTA denoiser on overlapping patches, tied or untied. See the module docstring."""

    checkpoint_unfoldings = False  # True: each unfolding is recomputed in backward (models/unfolding.py)

    def __init__(self, config: LISTAConfig, init: bool = True) -> None:
        """``init=False``: the weights allocated but not computed, for a state dict to fill."""
        super().__init__()
        self.config = config
        T, K, m = config.depth, config.atoms, config.channels * config.patch_size ** 2
        if init:
            D0, W_e, S, theta = ista_weights(config)
        else:
            lead, lead_s = ((), ()) if config.tied else ((T,), (T - 1,))
            D0, W_e, S, theta = (torch.empty(m, K), torch.empty(*lead, K, m), torch.empty(*lead_s, K, K),
                                 torch.empty(*lead, K))
        self.W_e = nn.Parameter(W_e.contiguous())
        self.S = nn.Parameter(S.contiguous())
        self.threshold = nn.Parameter(theta.contiguous())
        self.D = nn.Parameter(D0.clone())
        self.depth = T  # active depth, see set_depth

    @property
    def tiling(self) -> Tiling:
        """A pixel's estimate averages the patches covering it, each coded from its own pixels: halo p−1."""
        return Tiling(self.config.patch_size - 1, 1)

    def _layer(self, t: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """(W_e,t, S_t, θ_t) of layer t = 0..T−1 (S_0 is None: z_0 = 0)."""
        if self.config.tied:
            return self.W_e, self.S if t > 0 else None, self.threshold
        return self.W_e[t], self.S[t - 1] if t > 0 else None, self.threshold[t]

    # ------------------------------------------------------------------ the unfolded iteration
    def sparse_code(self, yc: Tensor, keep_all: bool = True) -> list[Tensor]:
        """Codes z_1..z_T of centered patch vectors yc (N, m); each (N, K)."""
        if self.config.tied:
            Wy = yc @ self.W_e.T  # W_e y: (N, K), computed once
        else:
            Wy = (yc @ self.W_e[: self.depth].reshape(-1, yc.shape[1]).T).view(yc.shape[0], self.depth, -1)
        codes: list[Tensor] = []
        for t in range(self.depth):
            b = Wy if self.config.tied else Wy[:, t]  # W_e,t y: (N, K)
            codes.append(unfolding(self, self.step, t, b, codes[-1] if codes else None))  # Eq. (1) / (2)
            if not keep_all and len(codes) > 1:
                del codes[0]
        return codes

    def step(self, t: int, b: Tensor, z: Tensor | None) -> Tensor:
        """Layer t: z_{t+1} = S_θ_t(W_e,t y + S_t z_t), b = W_e,t y (N, K), z = z_t (None at t = 0)."""
        _, S, theta = self._layer(t)
        v = b if S is None or z is None else torch.addmm(b, z, S.T)  # W_e y + S z_t: (N, K)
        return soft_threshold(v, theta)

    def _centered_patches(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """y (B, C, H, W) -> centered patch vectors (B·L, m) and their per-channel means (B·L, C, 1)."""
        c, p = self.config.channels, self.config.patch_size
        P = extract_patches(y, p)  # (B, L, m)
        P = P.reshape(-1, c, p * p)  # (B·L, C, p²)
        mu = P.mean(dim=-1, keepdim=True)  # DC per patch and channel
        return (P - mu).reshape(-1, c * p * p), mu

    def _decode(self, z: Tensor, mu: Tensor, shape: torch.Size) -> Tensor:
        """Eq. (3): x̂_k = D z + μ_k, then patch averaging -> (B, C, H, W)."""
        c = self.config.channels
        xk = (z @ self.D.T).view(z.shape[0], c, -1) + mu  # (B·L, C, p²)
        return aggregate_patches(xk.view(shape[0], -1, xk.shape[1] * xk.shape[2]), None, shape[-2:])

    def reconstructions(self, y: Tensor, sigma: Tensor | None = None) -> list[Tensor]:
        """x̂ decoded from z_1..z_T (σ is not used)."""
        yc, mu = self._centered_patches(y)
        return [self._decode(z, mu, y.shape) for z in self.sparse_code(yc)]

    def forward(self, y: Tensor, sigma: Tensor | None = None) -> Tensor:
        """y (B, C, H, W) noisy, H, W >= patch_size -> x̂ (B, C, H, W). σ is not used."""
        yc, mu = self._centered_patches(y)
        return self._decode(self.sparse_code(yc, keep_all=False)[-1], mu, y.shape)

    # ------------------------------------------------------------------ incremental depth, monitoring
    @torch.no_grad()
    def set_depth(self, depth: int) -> None:
        """Run ``depth`` layers from now on (1..config.depth). Untied: layers beyond the active depth are
        overwritten with the last active layer (W_e, θ, and S when that layer has one)."""
        if not 1 <= depth <= self.config.depth:
            raise ValueError(f"depth must be in [1, {self.config.depth}], got {depth}")
        last = self.depth - 1
        if not self.config.tied and depth > self.depth:
            self.W_e[last + 1 : depth] = self.W_e[last]
            self.threshold[last + 1 : depth] = self.threshold[last]
            if last >= 1:  # the first layer has no S: new ones keep their ISTA initialization
                self.S[last:depth - 1] = self.S[last - 1]
        self.depth = depth

    def dictionary(self) -> Tensor:
        """Decoder atoms D as (K, C, p, p)."""
        p, c = self.config.patch_size, self.config.channels
        return self.D.detach().T.reshape(-1, c, p, p)

    @torch.no_grad()
    def code_sparsity(self, y: Tensor) -> list[float]:
        """Fraction of non-zero codes after each layer, for a batch y."""
        yc, _ = self._centered_patches(y)
        return [float((z != 0).float().mean()) for z in self.sparse_code(yc)]

r"""ADMM-Net: ADMM unfolded for compressive-sensing MRI, with learned filters, penalties and piecewise-linear
shrinkages (Yang, Sun, Li & Xu, "Deep ADMM-Net for Compressive Sensing MRI", NIPS 2016: the Generic-ADMM-Net).

Problem (y = A x + n; A an :class:`~.operators.MRI` M ⊙ F x, or the identity; H_l circular filters):

    x̂ = argmin_x ½‖A x − y‖²₂ + Σ_l λ_l ‖H_l x‖₁        (l = 1..L; the paper's g is general, ‖·‖₁ here)

Classical iteration (scaled ADMM on z_l = H_l x, penalties ρ_l, multipliers β_l, from z⁽⁰⁾ = β⁽⁰⁾ = 0):

    x⁽ⁿ⁾ = (AᵀA + Σ_l ρ_l H_lᵀH_l)⁻¹ (Aᵀy + Σ_l ρ_l H_lᵀ(z_l⁽ⁿ⁻¹⁾ − β_l⁽ⁿ⁻¹⁾))
    z_l⁽ⁿ⁾ = S_{λ_l/ρ_l}(H_l x⁽ⁿ⁾ + β_l⁽ⁿ⁻¹⁾),     β_l⁽ⁿ⁾ = β_l⁽ⁿ⁻¹⁾ + H_l x⁽ⁿ⁾ − z_l⁽ⁿ⁾

Learned iteration (stages n = 1..N_s, every weight untied; x̂ = x⁽ᴺˢ⁺¹⁾, a last reconstruction layer):

    X  x⁽ⁿ⁾   = F⁻¹[(F Aᵀy + Σ_l ρ_l⁽ⁿ⁾ ĥ_l⁽ⁿ⁾·F(z_l⁽ⁿ⁻¹⁾ − β_l⁽ⁿ⁻¹⁾)) / (Ĝ + Σ_l ρ_l⁽ⁿ⁾ |ĥ_l⁽ⁿ⁾|²)]     (Eq. 1)
    C  c_l⁽ⁿ⁾ = D_l⁽ⁿ⁾ x⁽ⁿ⁾                                                                   (Eq. 2)
    Z  z_l⁽ⁿ⁾ = S_PLF(c_l⁽ⁿ⁾ + β_l⁽ⁿ⁻¹⁾; q_l⁽ⁿ⁾)                                                (Eq. 3)
    M  β_l⁽ⁿ⁾ = β_l⁽ⁿ⁻¹⁾ + η_l⁽ⁿ⁾ (c_l⁽ⁿ⁾ − z_l⁽ⁿ⁾)                                              (Eq. 4)

    S_PLF(v; q) = q_k + (v − p_k)(q_{k+1} − q_k)/δ on [p_1, p_N], v − p_1 + q_1 below, v − p_N + q_N above (Eq. 5)
    H_l = Σ_m γ_{l,m} B_m,   D_l = Σ_m ω_{l,m} B_m,   B_m the k×k 2-D DCT basis without its DC atom      (Eq. 6)

Filters are circular correlations, (H x)[i, j] = Σ_{u,v} h[u, v]·x[i + u − k//2, j + v − k//2] (indices
mod H, W: ``F.conv2d`` on a circularly padded x), so F(H x) = conj(ĥ)·F x with ĥ the FFT of h rolled onto
(0, 0), and HᵀH = F⁻¹|ĥ|²F. AᵀA is diagonal in the same basis: Ĝ = 1 for the identity, Ĝ = M_s = (M + M̃)/2
for MRI on real images (:class:`~.operators.MRI`), so Eq. 1 solves the X-layer's system exactly. Where the
denominator vanishes (the DC of an image whose DC was not sampled: the filters have zero mean) Eq. 1
takes the minimum-norm solution (0 there), as a pseudo-inverse with relative tolerance ``PINV_RTOL``.
p_1..p_N are N = ``control_points`` equispaced points on [−r, r], δ their spacing. Eq. 5's slope is 1
outside the grid, so the init q_i = S_θ(p_i) makes S_PLF the soft threshold S_θ exactly wherever ±θ are
grid points, and its linear interpolant on the grid elsewhere. At init (γ = ω, η = 1, θ on the grid) a
stage is therefore one ADMM iteration with λ_l = θ ρ_l (the tests check it).

Symbol → attribute (n = 1..N_s; X has N_s + 1 layers):

    ==========  ==========================  ============================================
    γ⁽ⁿ⁾        ``self.H``                  (N_s + 1, L, k² − 1): filters of X layers
    ρ⁽ⁿ⁾        ``self.rho``                (N_s + 1, L), ≥ 0 (:meth:`project_`)
    ω⁽ⁿ⁾        ``self.D``                  (N_s, L, k² − 1): filters of C layers
    q⁽ⁿ⁾        ``self.q``                  (N_s, L, N): PLF values at p_1..p_N
    η⁽ⁿ⁾        ``self.eta``                (N_s, L)
    B_m         ``self.basis``              (k² − 1, k, k), a constant (not saved)
    N_s, L, k   ``depth, filters, kernel_size``;  N, r: ``control_points, control_range``
    ==========  ==========================  ============================================

Default (the paper's Generic-ADMM-Net, official code InitNet.m / config.m): N_s = 15 stages, L = 8 filters
3×3, N = 101 points on [−1, 1]; init γ = ω = the identity (H_l, D_l the DCT atoms), ρ = 0.2, η = 1.6,
q = S_0.05 (off the 0.02 grid: its interpolant). Parameters: (N_s + 1)·L·(k² − 1 + 1) + N_s·L·(k² − 1 + N + 1)
= 16·72 + 15·880 = 14,352. ``filter_init="tv"`` (ours) starts instead from ADMM on anisotropic TV: H_1 = D_1 = ∂_h,
H_2 = D_2 = ∂_v (forward differences, in the atoms' span), ρ_l = 0 for l > 2 (those atoms inert until ρ_l grows).

Differences from the paper and its official (MATLAB, L-BFGS) code:

* Ĝ = (M + M̃)/2, the exact AᵀA on real images; the official code divides by M (equal for symmetric masks)
  and then keeps the real part. Its 0-denominators become 1e-6; here the minimum-norm solution.
* Correlation instead of the official ``imfilter(..., 'conv')``: the same filters rotated by 180° (the
  rotated DCT basis is the basis up to signs).
* ρ is kept ≥ 0 (official: unconstrained, ρ entering the denominator through √ρ). One channel only.
* Only the identity and MRI operators: Eq. 1 needs AᵀA diagonal in the Fourier basis. σ is unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models.operators import MRI, Identity, Operator

PINV_RTOL = 1e-6  # Eq. 1: a denominator ≤ PINV_RTOL·max is a 0 eigenvalue (pseudo-inverse)
FILTER_INITS = ("dct", "tv")


@dataclass(frozen=True, kw_only=True)
class ADMMNetConfig:
    """Hyperparameters of :class:`ADMMNet` (defaults: the paper's Generic-ADMM-Net)."""

    name: str = "admmnet"
    channels: int = 1
    depth: int = 15
    filters: int = 8
    kernel_size: int = 3
    control_points: int = 101
    control_range: float = 1.0
    threshold_init: float = 0.05
    rho_init: float = 0.2
    eta_init: float = 1.6
    filter_init: str = "dct"  # "dct": the official init; "tv": anisotropic-TV ADMM (reset_parameters)

    def __post_init__(self) -> None:
        check(self.channels == 1, "channels", f"ADMM-Net reconstructs one channel (MRI), got {self.channels}")
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.filters >= 1, "filters", f"must be >= 1, got {self.filters}")
        check(self.kernel_size >= 3 and self.kernel_size % 2 == 1, "kernel_size",
              f"must be odd and >= 3 (a centred filter, a DCT basis without DC), got {self.kernel_size}")
        check(self.control_points >= 2, "control_points", f"must be >= 2, got {self.control_points}")
        check(self.control_range > 0, "control_range", f"must be > 0, got {self.control_range}")
        check(self.threshold_init >= 0, "threshold_init", f"must be >= 0, got {self.threshold_init}")
        check(self.rho_init >= 0, "rho_init", f"must be >= 0, got {self.rho_init}")
        check(self.filter_init in FILTER_INITS, "filter_init", f"must be one of {FILTER_INITS}, got "
              f"{self.filter_init!r}")
        check(self.filter_init != "tv" or self.filters >= 2, "filters",
              f"filter_init='tv' needs >= 2 filters (∂_h, ∂_v), got {self.filters}")


def dct_basis(k: int) -> Tensor:
    """B (k² − 1, k, k): the orthonormal 2-D DCT-II atoms but the constant one, in the official code's order
    (row i = (a, b) of kron(C, C), C = dctmtx(k), atom[r, c] = C[a, c]·C[b, r]), float64."""
    j = torch.arange(k, dtype=torch.float64)
    C = torch.cos(math.pi * (2 * j[None, :] + 1) * j[:, None] / (2 * k)) * math.sqrt(2 / k)
    C[0] /= math.sqrt(2)
    atoms = torch.einsum("ac,br->abrc", C, C).reshape(k * k, k, k)
    return atoms[1:]


def plf(v: Tensor, q: Tensor, r: float) -> Tensor:
    """S_PLF(v; q), Eq. 5: v (B, L, H, W), q (L, N) the values at N equispaced points on [−r, r]."""
    n = q.shape[-1]
    step = 2 * r / (n - 1)
    s = (v + r) / step  # v in grid units from p_1
    k = s.detach().floor().clamp(0, n - 2).long()  # the segment [p_k, p_{k+1}] (0-based)
    flat = (torch.arange(q.shape[0], device=v.device) * n).view(1, -1, 1, 1) + k  # into q.reshape(-1)
    qk, qk1 = q.reshape(-1)[flat], q.reshape(-1)[flat + 1]
    inside = qk + (s - k) * (qk1 - qk)
    below, above = v + r + q[:, 0].view(1, -1, 1, 1), v - r + q[:, -1].view(1, -1, 1, 1)  # slope 1 outside
    return torch.where(v < -r, below, torch.where(v > r, above, inside))


class ADMMNet(nn.Module):
    """Generic-ADMM-Net: N_s stages of (X, C, Z, M) layers and a last X layer. See the module docstring."""

    takes_operator = True  # the Restorer contract (models/contract.py): forward(y, sigma, op)
    task_kinds = ("denoise", "csmri")  # Eq. 1 needs AᵀA diagonal in the Fourier basis

    def __init__(self, config: ADMMNetConfig, init: bool = True) -> None:
        """``init=False``: the parameters allocated, not filled, for a state dict to fill."""
        super().__init__()
        self.config = config
        S, L, k, N = config.depth, config.filters, config.kernel_size, config.control_points
        m = k * k - 1
        # B_m (Eq. 6), float64 (cast on use): a float32 copy's atoms would not sum to 0 in a float64 model
        self.register_buffer("basis", dct_basis(k), persistent=False)
        self.H = nn.Parameter(torch.empty(S + 1, L, m))  # γ⁽ⁿ⁾: filters of the X layers
        self.rho = nn.Parameter(torch.empty(S + 1, L))  # ρ⁽ⁿ⁾
        self.D = nn.Parameter(torch.empty(S, L, m))  # ω⁽ⁿ⁾: filters of the C layers
        self.q = nn.Parameter(torch.empty(S, L, N))  # q⁽ⁿ⁾: PLF values
        self.eta = nn.Parameter(torch.empty(S, L))  # η⁽ⁿ⁾
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official init (``filter_init="dct"``): H_l = D_l = the l-th DCT atom (γ = ω = eye(k² − 1, L)),
        ρ, η constant, q_i = S_θ(p_i). ``"tv"`` (ours): H_1 = D_1 = ∂_h, H_2 = D_2 = ∂_v (forward differences,
        zero-mean: in the basis' span), ρ_l = 0 for l > 2 (their atoms kept, inert until ρ_l grows), so with
        η = 1 a stage is one ADMM iteration on anisotropic TV, λ = θρ."""
        cfg, (S, L, m) = self.config, self.D.shape
        k = cfg.kernel_size
        coef = torch.eye(m, L).T  # (L, m); filters beyond k² − 1 are 0, as the official eye(s − 1, fN)
        if cfg.filter_init == "tv":
            diff = torch.zeros(2, k, k, dtype=torch.float64)
            diff[:, k // 2, k // 2] = -1.0
            diff[0, k // 2, k // 2 + 1] = diff[1, k // 2 + 1, k // 2] = 1.0  # x[i, j+1] − x[i, j], x[i+1, j] − x[i, j]
            coef[:2] = torch.einsum("mij,lij->lm", self.basis, diff)  # B orthonormal: the exact coefficients
        self.H.copy_(coef.expand(S + 1, L, m))
        self.D.copy_(coef.expand(S, L, m))
        self.rho.fill_(cfg.rho_init)
        if cfg.filter_init == "tv":
            self.rho[:, 2:] = 0.0
        self.eta.fill_(cfg.eta_init)
        p = torch.linspace(-cfg.control_range, cfg.control_range, cfg.control_points, dtype=torch.float64)
        self.q.copy_((p - p.clamp(-cfg.threshold_init, cfg.threshold_init)).expand_as(self.q))

    # ------------------------------------------------------------------ the layers
    def filters(self, coef: Tensor) -> Tensor:
        """Σ_m γ_{l,m} B_m (Eq. 6): coefficients (L, k² − 1) -> filters (L, k, k)."""
        return torch.einsum("lm,mij->lij", coef, self.basis.to(coef.dtype))

    def spectrum(self, coef: Tensor, h: int, w: int) -> Tensor:
        """ĥ (1, L, h, w//2 + 1): the filters zero-padded to h×w, tap k//2 rolled onto (0, 0), rfft2."""
        f, c = self.filters(coef), self.config.kernel_size // 2
        padded = nn.functional.pad(f, (0, w - f.shape[-1], 0, h - f.shape[-2])).roll((-c, -c), (-2, -1))
        return torch.fft.rfft2(padded).unsqueeze(0)

    def gram(self, op: Operator, aty: Tensor) -> Tensor:
        """Ĝ (B or 1, 1, H, W//2 + 1), the spectrum of AᵀA: 1, or (M + M̃)/2 for MRI (M̃(k) = M(−k))."""
        if isinstance(op, MRI):
            mask = op.mask.to(aty)
            mirrored = mask.flip(-2, -1).roll((1, 1), (-2, -1))  # M̃[i, j] = M[−i mod H, −j mod W]
            return ((mask + mirrored) / 2)[..., : aty.shape[-1] // 2 + 1]
        return aty.new_ones(1, 1, aty.shape[-2], aty.shape[-1] // 2 + 1)

    def x_layer(self, n: int, aty_hat: Tensor, gram: Tensor, v: Tensor | None, size: tuple[int, int]) -> Tensor:
        """x⁽ⁿ⁺¹⁾ (Eq. 1, 0-based n) from F Aᵀy (B, 1, H, W//2 + 1), Ĝ and v = z − β (B, L, H, W), None for
        z = β = 0 -> (B, 1, H, W); size = (H, W)."""
        h, w = size
        hh, rho = self.spectrum(self.H[n], h, w), self.rho[n].view(1, -1, 1, 1)  # ĥ_l, ρ_l
        den = gram + (rho * hh.abs().square()).sum(1, keepdim=True)  # Ĝ + Σ ρ|ĥ|²: (B or 1, 1, H, W')
        num = aty_hat if v is None else aty_hat + (rho * hh * torch.fft.rfft2(v)).sum(1, keepdim=True)
        tol = PINV_RTOL * den.detach().amax((-2, -1), keepdim=True)
        return torch.fft.irfft2(num / torch.where(den > tol, den, torch.inf), s=(h, w))

    def stage(self, n: int, x: Tensor, beta: Tensor | None) -> tuple[Tensor, Tensor]:
        """C, Z and M layers of stage n + 1 (Eqs. 2-4): x⁽ⁿ⁺¹⁾ (B, 1, H, W), β⁽ⁿ⁾ (B, L, H, W) or None (0)
        -> z⁽ⁿ⁺¹⁾, β⁽ⁿ⁺¹⁾, each (B, L, H, W)."""
        h, w = x.shape[-2:]
        c = torch.fft.irfft2(self.spectrum(self.D[n], h, w).conj() * torch.fft.rfft2(x), s=(h, w))  # Eq. 2
        v = c if beta is None else c + beta
        z = plf(v, self.q[n], self.config.control_range)  # Eq. 3
        beta = self.eta[n].view(1, -1, 1, 1) * (c - z) + (0 if beta is None else beta)  # Eq. 4
        return z, beta

    def forward(self, y: Tensor, sigma: Tensor | None = None, op: Operator | None = None) -> Tensor:
        """y of ``op``'s measurement shape (complex (B, 1, H, W) for MRI), σ unused, op None = Identity
        -> x̂ (B, 1, H, W)."""
        op = Identity() if op is None else op
        check(isinstance(op, (Identity, MRI)), "op", f"admmnet solves its reconstruction layer in the Fourier "
              f"domain: it supports the identity (denoise) and MRI (csmri) operators, not {op.name}")
        aty = op.A_adjoint(y)  # Aᵀy: (B, 1, H, W), real
        k = self.config.kernel_size
        check(aty.dim() == 4 and aty.shape[1] == 1 and min(aty.shape[-2:]) >= k, "y",
              f"Aᵀy must be (B, 1, H, W) with H, W >= {k}, got shape {tuple(aty.shape)}")
        size = (aty.shape[-2], aty.shape[-1])
        aty_hat, gram = torch.fft.rfft2(aty), self.gram(op, aty)
        x, beta = self.x_layer(0, aty_hat, gram, None, size), None  # Eq. 1 from z⁽⁰⁾ = β⁽⁰⁾ = 0
        for n in range(self.config.depth):
            z, beta = self.stage(n, x, beta)  # Eqs. 2-4
            x = self.x_layer(n + 1, aty_hat, gram, z - beta, size)  # Eq. 1
        return x

    # ------------------------------------------------------------------ training hooks, monitoring
    @torch.no_grad()
    def project_(self) -> None:
        """ρ ≥ 0 after every optimizer step (Eq. 1's system stays positive semi-definite)."""
        self.rho.clamp_(min=0.0)

    def dictionary(self) -> Tensor:
        """The last X layer's filters H_l⁽ᴺˢ⁺¹⁾, (L, 1, k, k)."""
        return self.filters(self.H[-1].detach()).unsqueeze(1)

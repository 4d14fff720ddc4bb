r"""Natural exponential-family likelihoods of the noise models (DCEA; Tolooshams et al., ICML 2020).

The data module (``datasets/noise.py``) hands models a *normalized* observation y in image units; the
likelihood lives on the **count** c = y·scale, with scale = 1 (Gaussian), peak (Poisson), trials n (Binomial):

    ==========  ===================  ====================  ==============================  ==================
    kind        c                    E[c] = f⁻¹(η)         −log p(c | η)  (constants dropped)   image mean
    ==========  ===================  ====================  ==============================  ==================
    gaussian    y                    η                     ½ (c − η)²                      η
    poisson     y·peak               exp(η)                exp(η) − c·η                    exp(η) / peak
    binomial    y·n                  n·sigmoid(η)          n·softplus(η) − c·η             sigmoid(η)
    ==========  ===================  ====================  ==============================  ==================

Each NLL is convex in η with ∂/∂η = f⁻¹(η) − c (the mean-domain residual the DCEA encoder uses) and
second derivative (curvature) 1, exp(η) and n·σ(η)(1 − σ(η)) ≤ n/4. Being linear in c, the expected NLL
E_c[nll(η, c)] = nll(η, E[c]) is minimized at the η whose mean is the true mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("gaussian", "poisson", "binomial")


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"likelihood: unknown kind {kind!r} (valid: {', '.join(KINDS)})")
    return kind


def scale(kind: str, *, peak: float = 1.0, trials: int = 1) -> float:
    """Counts per image unit: c = scale·y (1, peak or trials)."""
    return {"gaussian": 1.0, "poisson": float(peak), "binomial": float(trials)}[_kind(kind)]


def counts(kind: str, y: Tensor, *, peak: float = 1.0, trials: int = 1) -> Tensor:
    """The count-domain observation c = scale·y that the likelihood (and DCEA's encoder) sees."""
    s = scale(kind, peak=peak, trials=trials)
    return y if s == 1.0 else y * s


def inverse_link(kind: str, eta: Tensor, *, trials: int = 1) -> Tensor:
    """E[c] = f⁻¹(η) in count units: η, exp(η) or n·sigmoid(η)."""
    kind = _kind(kind)
    if kind == "gaussian":
        return eta
    if kind == "poisson":
        return torch.exp(eta)
    return torch.sigmoid(eta) if trials == 1 else trials * torch.sigmoid(eta)


def mean(kind: str, eta: Tensor, *, peak: float = 1.0, trials: int = 1) -> Tensor:
    """The denoised image E[y] in [0, 1] units: η, exp(η)/peak or sigmoid(η)."""
    kind = _kind(kind)
    if kind == "gaussian":
        return eta
    if kind == "poisson":
        return torch.exp(eta) / peak
    return torch.sigmoid(eta)


def curvature(kind: str, *, peak: float = 1.0, trials: int = 1) -> float:
    """Bound on ∂²nll/∂η² for means in [0, 1] image units (1, peak, n/4): the link's Lipschitz factor."""
    return {"gaussian": 1.0, "poisson": float(peak), "binomial": trials / 4.0}[_kind(kind)]


def natural_from_observation(kind: str, y: Tensor, *, peak: float = 1.0, trials: int = 1,
                             eps: float = 1e-3) -> Tensor:
    """η whose mean is y (the saturated fit), with y clamped to [eps, 1 − eps] where the link needs it:
    y, log(peak·y) or logit(y). Used for DCEA's offset μ (natural parameter of the mean intensity)."""
    kind = _kind(kind)
    if kind == "gaussian":
        return y
    if kind == "poisson":
        return torch.log(y.clamp_min(eps) * peak)
    return torch.logit(y.clamp(eps, 1.0 - eps))


def nll(kind: str, eta: Tensor, y: Tensor, *, peak: float = 1.0, trials: int = 1) -> Tensor:
    """Negative log-likelihood of the normalized observation y under natural parameter η of the counts,
    mean over pixels (a scalar), constants in y dropped; numerically stable forms (table above)."""
    kind = _kind(kind)
    if kind == "gaussian":
        return 0.5 * torch.mean((y - eta) ** 2)
    c = counts(kind, y, peak=peak, trials=trials)
    if kind == "poisson":
        return torch.mean(torch.exp(eta) - c * eta)
    return torch.mean(trials * F.softplus(eta) - c * eta)

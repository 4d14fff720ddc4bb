"""Training objectives (``loss.kind``), one function the loop calls. See :class:`sparsefold.config.LossConfig`.

Supervised losses compare the reconstruction x̂ with the clean patch x; ``nll`` is unsupervised: it only
sees the noisy observation y and scores the model's natural parameter η = model.natural(y) under the
noise model's likelihood (:mod:`sparsefold.models.likelihoods`), as in DCEA's dictionary-learning mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsefold.config import LossConfig, NoiseConfig
from sparsefold.errors import ConfigError
from sparsefold.models.contract import Likelihood, Multilayer
from sparsefold.models.operators import Operator


def ssim_map_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """1 − SSIM (Gaussian window 11, σ 1.5, data range 1), differentiable, mean over the batch."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0)
    assert isinstance(ssim, Tensor)  # a tuple only with return_full_image / return_contrast_sensitivity
    return 1.0 - ssim


def multilayer_weights(n: int, decay: float) -> list[float]:
    """w_t = decay^(n−1−t), t = 0..n−1, normalized to sum 1 (the last layer weighs most)."""
    w = [decay ** (n - 1 - t) for t in range(n)]
    return [v / sum(w) for v in w]


class Objective(nn.Module):
    """model + loss as one module, so that DDP wraps (and syncs) whatever the loss calls: the forward,
    the intermediate ``reconstructions`` or the likelihood's ``natural``. ``forward`` returns the scalar
    loss of one batch: noisy, clean (B, C, H, W), sigma (B,) in 0..255 units; for a restoration task the
    operator too (``op``: y = A x + n, ``noisy`` is y, in the measurement's shape)."""

    def __init__(self, model: nn.Module, loss: LossConfig, noise: NoiseConfig) -> None:
        super().__init__()
        self.model, self.loss, self.noise = model, loss, noise

    def forward(self, noisy: Tensor, clean: Tensor, sigma: Tensor | None = None, op: Operator | None = None) -> Tensor:
        kind, m = self.loss.kind, self.model
        if kind == "multilayer":
            if not isinstance(m, Multilayer):  # RunConfig's check refuses this first
                raise ConfigError(f"loss.kind: multilayer needs {type(m).__name__}.reconstructions; it has none")
            outs = m.reconstructions(noisy, sigma)
            ws = multilayer_weights(len(outs), self.loss.layer_decay)
            return sum((w * torch.mean((o.float() - clean) ** 2) for w, o in zip(ws, outs)), clean.new_zeros(()))
        if kind == "nll":
            from sparsefold.models.likelihoods import nll

            if not isinstance(m, Likelihood):  # RunConfig's check refuses this first
                raise ConfigError(f"loss.kind: nll needs a likelihood model ({type(m).__name__}.natural); it has none")
            n = self.noise
            return nll(n.kind, m.natural(noisy, sigma).float(), noisy, peak=n.peak, trials=n.trials)
        x_hat = (m(noisy, sigma) if op is None else m(noisy, sigma, op=op)).float()
        if kind == "mse":
            return torch.mean((x_hat - clean) ** 2)
        if kind == "log_mse":  # clamped: a perfect batch would give −inf
            return torch.log10(torch.mean((x_hat - clean) ** 2).clamp_min(1e-12))
        if kind == "l1":
            return F.l1_loss(x_hat, clean)
        if kind == "ssim_mixed":
            a = self.loss.ssim_weight
            return a * ssim_map_loss(x_hat, clean) + (1 - a) * F.l1_loss(x_hat, clean)
        raise ValueError(f"loss.kind: unknown loss {kind!r}")

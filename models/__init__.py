"""The model zoo: a plain dict registry, no import side effects.

``MODELS[name]`` is a :class:`ModelEntry` holding the model's frozen config dataclass, its ``nn.Module``
class, a one-line summary and the documented parameter count of the default config (checked by a test);
:func:`build_model` turns a config into a module.

The model contract (what the trainer, evaluation and W&B panels rely on; models know nothing of Ray,
DDP, W&B or WebDataset):

* ``Model(config)``: weights depend on the config only (seed from ``config.init_seed``).
* ``forward(y, sigma=None) -> x̂``: ``y`` (B, C, H, W) noisy, any H, W; ``sigma`` (B,) the Gaussian noise
  std in 0..255 units (0 for Poisson/Binomial data) or None (unknown). Models that do not use σ ignore it;
  noise-adaptive models estimate it from ``y`` when it is None.
Optional (the trainer checks with ``hasattr``):

* ``reconstructions(y, sigma=None) -> list[Tensor]``: x̂ after each unfolding, last = ``forward``
  (multi-layer loss, ``loss.kind=multilayer``).
* ``set_depth(T)``: run T unfoldings from now on; untied models warm-start new layers from the last
  trained one (incremental depth, ``trainer.depth_stages``); the attribute ``depth`` is the depth in use,
  ``config.depth`` the maximum.
* ``natural(y, sigma=None) -> η``: natural parameter of the noise model's likelihood, for the
  unsupervised loss (``loss.kind=nll``, see :mod:`.likelihoods`).
* ``dictionary() -> (K, C, k, k)`` atoms for the W&B grid; ``code_sparsity(y) -> list[float]`` fraction of
  non-zero codes per unfolding.
* config method ``check_noise(noise)``: raise ``ConfigError`` when the model cannot serve that noise.
* ``tiling`` property -> ``tiling.Tiling(halo, align)``: exact receptive-field radius and grid period, for
  tiled inference of large images (``trainers/tiling.py``; without it an image always runs whole). Models
  that centre on the image mean take ``forward(y, sigma=None, mean=None)``: a tile gets the whole image's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from sparsefold.models.cdlnet import CDLNet, CDLNetConfig
from sparsefold.models.cscnet import CSCNet, CSCNetConfig
from sparsefold.models.dcea import DCEA, DCEAConfig, DCEAUCConfig
from sparsefold.models.deep_ksvd import DeepKSVD, DeepKSVDConfig
from sparsefold.models.dncnn import DnCNN, DnCNNConfig
from sparsefold.models.lidia import LIDIA, LIDIAConfig
from sparsefold.models.lista import LISTA, LISTAConfig


class ModelEntry(NamedTuple):
    config: type
    module: type[nn.Module]
    summary: str
    params: int  # trainable parameters of the default config (the documented/paper count)


MODELS: dict[str, ModelEntry] = {
    "cscnet": ModelEntry(CSCNetConfig, CSCNet, "convolutional LISTA, strided, shift-averaged (Simon & Elad 2019)",
                         63_700),
    "dncnn": ModelEntry(DnCNNConfig, DnCNN, "17-layer residual CNN baseline (Zhang et al. 2017)", 556_096),
    "cdlnet": ModelEntry(CDLNetConfig, CDLNet,
                         "untied conv. LISTA, noise-adaptive thresholds (Janjušević et al. 2022)", 64_000),
    "dcea_c": ModelEntry(DCEAConfig, DCEA,
                         "exp.-family conv. dictionary auto-encoder, tied (Tolooshams 2020)", 20_618),
    "dcea_uc": ModelEntry(DCEAUCConfig, DCEA,
                          "exp.-family conv. dictionary auto-encoder, untied (Tolooshams 2020)", 61_516),
    "lista": ModelEntry(LISTAConfig, LISTA, "LISTA on overlapping 8×8 patches, tied or untied (Gregor & LeCun 2010)",
                        98_560),
    "deep_ksvd": ModelEntry(DeepKSVDConfig, DeepKSVD,
                            "patch ISTA with MLP-predicted λ, learned averaging (Scetbon et al. 2021)", 35_138),
    "lidia": ModelEntry(LIDIAConfig, LIDIA,
                        "non-local 2-scale separable patch denoiser, LIDIA-lite (Vaksman et al. 2020)", 61_589),
}


def build_model(config: Any) -> nn.Module:
    """Instantiate the registered model whose config dataclass is ``config`` (``config.name`` picks it)."""
    if config.name not in MODELS:
        raise KeyError(f"unknown model {config.name!r} (registered: {', '.join(sorted(MODELS))})")
    return MODELS[config.name].module(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "ModelEntry", "build_model", "count_parameters", "CDLNet", "CDLNetConfig", "CSCNet",
           "CSCNetConfig", "DCEA", "DCEAConfig", "DCEAUCConfig", "DeepKSVD", "DeepKSVDConfig", "DnCNN", "DnCNNConfig",
           "LIDIA", "LIDIAConfig",
           "LISTA", "LISTAConfig"]

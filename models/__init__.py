"""The model zoo: a plain dict registry that imports nothing heavy.

``MODELS[name]`` is a :class:`ModelEntry`: plain data (where the model lives, a one-line summary, the
documented parameter count of the default config, checked by a test) from which ``.config`` (the frozen
config dataclass) and ``.module`` (the ``nn.Module`` class) are resolved on first use. Reading the
registry therefore costs no torch import (``sparsefold models``, config validation of everything but the
``model`` section); touching ``.config`` or ``.module`` imports that model's file, and torch with it.
:func:`build_model` turns a config into a module. The model classes are importable from here too
(``from sparsefold.models import CSCNet``), resolved the same lazy way.

The model contract (what the trainer, evaluation and W&B panels rely on) is written down as
``typing.Protocol`` classes in :mod:`.contract`; models know nothing of Ray, DDP, W&B or WebDataset.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: the file (``sparsefold.models.<file>``) and the names of its module
    and config classes, resolved by :attr:`module` / :attr:`config` when first used."""

    file: str
    class_name: str
    config_name: str
    summary: str
    params: int  # trainable parameters of the default config (the documented/paper count)

    def _resolve(self, attr: str) -> Any:
        return getattr(importlib.import_module(f"{__name__}.{self.file}"), attr)

    @property
    def config(self) -> type:
        """The model's frozen config dataclass (imports the model's file)."""
        return self._resolve(self.config_name)

    @property
    def module(self) -> type[nn.Module]:
        """The model's ``nn.Module`` class (imports the model's file)."""
        return self._resolve(self.class_name)


MODELS: dict[str, ModelEntry] = {
    "cscnet": ModelEntry("cscnet", "CSCNet", "CSCNetConfig",
                         "convolutional LISTA, strided, shift-averaged (Simon & Elad 2019)", 63_700),
    "dncnn": ModelEntry("dncnn", "DnCNN", "DnCNNConfig", "17-layer residual CNN baseline (Zhang et al. 2017)",
                        556_096),
    "cdlnet": ModelEntry("cdlnet", "CDLNet", "CDLNetConfig",
                         "untied conv. LISTA, noise-adaptive thresholds (Janjušević et al. 2022)", 64_000),
    "dcea_c": ModelEntry("dcea", "DCEA", "DCEAConfig",
                         "exp.-family conv. dictionary auto-encoder, tied (Tolooshams 2020)", 20_618),
    "dcea_uc": ModelEntry("dcea", "DCEA", "DCEAUCConfig",
                          "exp.-family conv. dictionary auto-encoder, untied (Tolooshams 2020)", 61_516),
    "lista": ModelEntry("lista", "LISTA", "LISTAConfig",
                        "LISTA on overlapping 8×8 patches, tied or untied (Gregor & LeCun 2010)", 98_560),
    "deep_ksvd": ModelEntry("deep_ksvd", "DeepKSVD", "DeepKSVDConfig",
                            "patch ISTA with MLP-predicted λ, learned averaging (Scetbon et al. 2021)", 35_138),
    "lidia": ModelEntry("lidia", "LIDIA", "LIDIAConfig",
                        "non-local 2-scale separable patch denoiser, LIDIA (Vaksman et al. 2020)", 61_589),
    "pgnet": ModelEntry("pgnet", "PGNet", "PGNetConfig",
                        "unfolded proximal gradient, conv. sparse prior, any operator A (restoration tasks)", 34_859),
    "admmnet": ModelEntry("admmnet", "ADMMNet", "ADMMNetConfig",
                          "ADMM unfolded, learned filters and piecewise-linear shrinkage, CS-MRI (Yang et al. 2016)",
                          14_352),
    "vdsr": ModelEntry("vdsr", "VDSR", "VDSRConfig",
                       "20-layer residual CNN on the bicubic-upsampled image, SR baseline (Kim et al. 2016)", 665_921),
}

# ``from sparsefold.models import CSCNet``: every registered class name -> the file that defines it.
_EXPORTS: dict[str, str] = {n: e.file for e in MODELS.values() for n in (e.class_name, e.config_name)}


def __getattr__(name: str) -> Any:
    """Resolve a model or config class on first access (PEP 562), so importing the package stays light."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(config: Any, init: bool = True) -> nn.Module:
    """Instantiate the registered model whose config dataclass is ``config`` (``config.name`` picks it).

    ``init=False`` allocates the parameters without computing their initial values (power method, random
    or DCT dictionaries...), for a caller that overwrites every one of them from a state dict right away
    (checkpoint loading, resuming); what the state dict does not hold is still computed."""
    if config.name not in MODELS:
        raise KeyError(f"unknown model {config.name!r} (registered: {', '.join(sorted(MODELS))})")
    return MODELS[config.name].module(config, init=init)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "ModelEntry", "build_model", "count_parameters", *sorted(_EXPORTS)]

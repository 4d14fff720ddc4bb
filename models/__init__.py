"""The model zoo: a plain dict registry, no import side effects.

``MODELS[name]`` is a :class:`ModelEntry` holding the model's frozen config dataclass and its
``nn.Module`` class; :func:`build_model` turns a config into a module.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from sparsefold.models.cscnet import CSCNet, CSCNetConfig
from sparsefold.models.dncnn import DnCNN, DnCNNConfig


class ModelEntry(NamedTuple):
    config: type
    module: type[nn.Module]
    summary: str


MODELS: dict[str, ModelEntry] = {
    "cscnet": ModelEntry(CSCNetConfig, CSCNet, "convolutional LISTA, strided, shift-averaged (Simon & Elad 2019)"),
    "dncnn": ModelEntry(DnCNNConfig, DnCNN, "17-layer residual CNN baseline (Zhang et al. 2017)"),
}


def build_model(config: Any) -> nn.Module:
    """Instantiate the registered model whose config dataclass is ``config`` (``config.name`` picks it)."""
    if config.name not in MODELS:
        raise KeyError(f"unknown model {config.name!r} (registered: {', '.join(sorted(MODELS))})")
    return MODELS[config.name].module(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "ModelEntry", "build_model", "count_parameters", "CSCNet", "CSCNetConfig", "DnCNN", "DnCNNConfig"]

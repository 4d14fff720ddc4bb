"""Activation checkpointing of one unfolding (``trainer.activation_checkpointing``).

An unfolded model stores, for the backward pass, every intermediate of every unfolding: memory grows
linearly with the depth T. With ``model.checkpoint_unfoldings = True`` (the :class:`~.contract.Checkpointed`
contract; the training loop sets it once at the start) each unfolding keeps only its inputs and is run again
during the backward pass: about one more forward pass of compute for the memory of T code maps instead of
T × (the maps one unfolding makes). The gradients are the same (the recomputation repeats the same
operations on the same inputs).

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

R = TypeVar("R")


def unfolding(model: nn.Module, step: Callable[..., R], *args: Any) -> R:
    """``step(*args)``, checkpointed (non-reentrant) when the model asks for it and autograd records."""
    if getattr(model, "checkpoint_unfoldings", False) and torch.is_grad_enabled():
        return checkpoint(step, *args, use_reentrant=False)
    return step(*args)

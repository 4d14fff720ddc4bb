"""Activation checkpointing per unfolding (``trainer.activation_checkpointing``, models/unfolding.py): the
same loss and gradients with and without, for every unfolded model; the loop turns it on; a model without
unfoldings is refused by config validation, naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sparsefold.config import ConfigError, load_config
from sparsefold.models import MODELS, build_model
from sparsefold.models.contract import Checkpointed
from sparsefold.trainers import loop

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SMALL: dict[str, dict[str, Any]] = {  # each with >= 3 unfoldings, some untied and noise-adaptive
    "cscnet": dict(depth=4, filters=16, kernel_size=7, stride=4, noise_adaptive=True),
    "cdlnet": dict(depth=4, filters=8, kernel_size=5),
    "dcea_c": dict(depth=4, filters=16, kernel_size=7, stride=4),
    "dcea_uc": dict(depth=4, filters=16, kernel_size=7, stride=4),
    "lista": dict(patch_size=4, atoms=16, depth=4, tied=False),
    "deep_ksvd": dict(patch_size=4, atoms=16, depth=3),
    "pgnet": dict(depth=4, filters=8, kernel_size=5),
}
UNFOLDED = sorted(SMALL)


def test_exactly_the_unfolded_models_are_checkpointed() -> None:
    # a Protocol with a data member supports isinstance, not issubclass: config validation uses hasattr too
    assert sorted(n for n, e in MODELS.items() if hasattr(e.module, "checkpoint_unfoldings")) == UNFOLDED


def loss_and_grads(model: torch.nn.Module, on: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.checkpoint_unfoldings = on
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 24, 28, generator=g)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=g)).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    loss = ((model(noisy, torch.tensor([20.0, 30.0])) - clean) ** 2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()] + [noisy.grad.clone()]


@pytest.mark.parametrize("name", UNFOLDED)
def test_same_gradients_with_and_without(name: str) -> None:
    model = build_model(MODELS[name].config(**SMALL[name]))
    assert isinstance(model, Checkpointed) and not model.checkpoint_unfoldings
    loss0, grads0 = loss_and_grads(model, on=False)
    loss1, grads1 = loss_and_grads(model, on=True)
    assert loss1 == loss0
    for a, b in zip(grads0, grads1):  # the recomputation repeats the same operations: equal to rounding
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert model.checkpoint_unfoldings


def test_checkpointing_is_really_used(monkeypatch) -> None:
    """Each unfolding goes through torch.utils.checkpoint when on (and only with autograd recording)."""
    import sparsefold.models.unfolding as unfolding

    calls = []
    real = unfolding.checkpoint
    monkeypatch.setattr(unfolding, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model = build_model(MODELS["cscnet"].config(**SMALL["cscnet"]))
    loss_and_grads(model, on=True)
    assert calls == [{"use_reentrant": False}] * (SMALL["cscnet"]["depth"] - 1)
    with torch.no_grad():
        model(torch.rand(1, 1, 24, 24))
    assert len(calls) == SMALL["cscnet"]["depth"] - 1


def test_refused_for_a_model_without_unfoldings() -> None:
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing.*dncnn"):
        load_config(None, ["model.name=dncnn", "trainer.activation_checkpointing=true"])


def test_loop_turns_it_on(tiny_overrides, monkeypatch) -> None:
    seen = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda net, model, *a, **kw: seen.append(model.checkpoint_unfoldings)
                        or real(net, model, *a, **kw))
    cfg = load_config(None, tiny_overrides + ["trainer.activation_checkpointing=true", "trainer.max_steps=3",
                                              "trainer.val_every=3", "trainer.run_name=ckpt"])
    out = loop.train(cfg)
    assert seen == [True] * 3 and out["steps"] == 3

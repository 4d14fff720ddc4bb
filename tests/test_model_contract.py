"""Every registered model satisfies the contract of ``sparsefold.models.contract``: it is a ``Denoiser``,
has exactly the optional capabilities it claims (the trainer, tiling and W&B code check them with
``isinstance``), and they behave; ``Model(config, init=False)`` + a checkpoint gives back the saved model
exactly without running any init (power method, random or DCT dictionaries)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from sparsefold.config import load_config, run_config_from_dict, to_dict
from sparsefold.models import MODELS, build_model, cdlnet, cscnet, dcea, deep_ksvd, dncnn, lista
from sparsefold.models.contract import (
    CodeSparsity,
    Deepening,
    Denoiser,
    HasDictionary,
    Likelihood,
    Multilayer,
    NoiseChecked,
    Projected,
    Restorer,
    Tiled,
)
from sparsefold.models.tiling import Tiling
from sparsefold.trainers import loop
from sparsefold.trainers.checkpoint import load_model, save_checkpoint

from model_sizes import SMALL  # tests/model_sizes.py

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


UNFOLDED = {Multilayer, Deepening, HasDictionary, CodeSparsity, Tiled}
CLAIMS: dict[str, set[type]] = {
    "cscnet": UNFOLDED,
    "cdlnet": UNFOLDED | {Projected},
    "dcea_c": UNFOLDED | {Likelihood},
    "dcea_uc": UNFOLDED | {Likelihood},
    "lista": UNFOLDED,
    "deep_ksvd": UNFOLDED,
    "lidia": {HasDictionary, CodeSparsity, Tiled},
    "dncnn": {HasDictionary, Tiled},
    "pgnet": {HasDictionary, Projected, Restorer},
    "admmnet": {HasDictionary, Projected, Restorer},
    "vdsr": {HasDictionary, Tiled, Restorer},
}
OPTIONAL = (Multilayer, Deepening, Likelihood, HasDictionary, CodeSparsity, Tiled, Projected, Restorer)
NAMES = sorted(MODELS)


def small(name: str, **kw: Any) -> Any:
    return MODELS[name].config(**{**SMALL[name], **kw})


def test_every_registered_model_has_its_claims() -> None:
    assert set(CLAIMS) == set(MODELS) == set(SMALL), "a new model: state what it implements here"


@pytest.mark.parametrize("name", NAMES)
def test_model_satisfies_exactly_the_protocols_it_claims(name: str) -> None:
    model = build_model(small(name))
    assert isinstance(model, Denoiser) and model.config.name == name
    assert {p for p in OPTIONAL if isinstance(model, p)} == CLAIMS[name]
    assert isinstance(model.config, NoiseChecked) == name.startswith("dcea")


@pytest.mark.parametrize("name", NAMES)
def test_claimed_capabilities_behave(name: str) -> None:
    model = build_model(small(name)).eval()
    y = torch.rand(2, getattr(model.config, "channels", 1), 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model(y, torch.full((2,), 25.0))
        assert x.shape == y.shape
        if isinstance(model, Multilayer):
            torch.testing.assert_close(model.reconstructions(y, torch.full((2,), 25.0))[-1], x)
        if isinstance(model, Likelihood):
            assert model.natural(y).shape == y.shape
        if isinstance(model, HasDictionary):
            atoms = model.dictionary()
            assert atoms.dim() == 4 and atoms.shape[1] == y.shape[1]
        if isinstance(model, CodeSparsity):
            sp = model.code_sparsity(y)
            assert sp and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in sp)
        if isinstance(model, Tiled):
            assert isinstance(model.tiling, Tiling) and model.tiling.halo >= 1
        if isinstance(model, Projected):
            model.project_()
    if isinstance(model, Deepening):
        model.set_depth(1)
        assert model.depth == 1 and model(y).shape == y.shape


# ------------------------------------------------------------------ init=False and loading


def no_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every init path raises: seeded generators, the power method, the ISTA/DCT and orthogonal inits."""
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("an init ran while loading a checkpoint")

    monkeypatch.setattr(torch, "Generator", boom)
    for module in (cscnet, cdlnet, dcea):
        monkeypatch.setattr(module, "power_method", boom)
    monkeypatch.setattr(lista, "ista_weights", boom)
    monkeypatch.setattr(deep_ksvd.DeepKSVD, "reset_parameters", boom)
    monkeypatch.setattr(dncnn.DnCNN, "reset_parameters", boom)


def saved(name: str, tmp_path: Any, **kw: Any) -> tuple[torch.nn.Module, Any]:
    """A small model whose every float tensor (weights, BN statistics) moved away from its init, saved."""
    cfg = small(name, **kw)
    model = build_model(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.mul_(1 + 0.1 * torch.rand(t.shape, generator=g))
    noise = {"kind": cfg.likelihood, "peak": cfg.peak, "trials": cfg.trials} if hasattr(cfg, "likelihood") else {}
    run = run_config_from_dict({"model": to_dict(cfg), "noise": noise})
    return model.eval(), save_checkpoint(tmp_path / "step_0000001", model, run, {"step": 1})


@pytest.mark.parametrize("name", NAMES)
def test_init_false_allocates_what_init_fills(name: str) -> None:
    fresh, empty = build_model(small(name)), build_model(small(name), init=False)
    assert {k: (v.shape, v.dtype) for k, v in fresh.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()}
    for (k, a), (_, b) in zip(fresh.named_buffers(), empty.named_buffers()):
        if k not in fresh.state_dict():  # non-persistent: computed, not loaded
            assert torch.equal(a, b), k


@pytest.mark.parametrize("name", NAMES)
def test_loading_runs_no_init_and_gives_the_saved_model(name: str, tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model, ckpt = saved(name, tmp_path)
    y = torch.rand(1, getattr(model.config, "channels", 1), 26, 30)
    no_init(monkeypatch)
    loaded, meta = load_model(ckpt)
    assert meta["model"]["name"] == name
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(y), model(y))


def test_normalized_dcea_recomputes_its_atom_norm_on_load(tmp_path: Any) -> None:
    """``atom_norm`` (1/√L) is not in the state dict: a loaded ``normalize_atoms`` model computes it."""
    model, ckpt = saved("dcea_c", tmp_path, normalize_atoms=True, learn_threshold=False)
    loaded = load_model(ckpt)[0].eval()
    assert loaded.atom_norm == model.atom_norm
    y = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(loaded(y), model(y))
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)


def test_resuming_builds_the_model_without_init(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training resume path (``loop.start`` with a checkpoint to resume) skips the init too; a fresh
    start runs it."""
    cfg = load_config(None, ["model.name=dncnn", "model.depth=3", "model.features=8", "wandb.mode=disabled",
                             f"trainer.output_dir={tmp_path / 'runs'}"])
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt = save_checkpoint(tmp_path / "step_0000003", model, cfg, {"step": 3},
                           torch.optim.Adam(model.parameters()))
    monkeypatch.setattr(dncnn.DnCNN, "reset_parameters", lambda self: pytest.fail("init ran on resume"))
    run = loop.start(cfg, loop.Dist(report=lambda *a: None, resume_from=ckpt))
    assert run.state.step == 3
    want, got = model.state_dict(), run.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(pytest.fail.Exception, match="init ran"):
        loop.start(cfg, loop.Dist(report=lambda *a: None))  # fresh: the init runs

"""The parts of the training loop on their own, with a tiny model and hand-made tensors (no data pipeline):
one step (:func:`train_step`), the rollback (:func:`roll_back`), validation + checkpoint with its health
gate (:func:`checkpoint`), the state that ``state.json`` holds (:class:`TrainState`), and the depth contract
the loop relies on (every model with ``set_depth`` exposes the depth in use as ``depth``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sparsefold.config import load_config
from sparsefold.models import MODELS, build_model
from sparsefold.runtime import select_runtime
from sparsefold.trainers.checkpoint import load_training_state
from sparsefold.trainers.loop import Dist, Run, TrainState, checkpoint, roll_back, snapshot, train_step
from sparsefold.trainers.losses import Objective

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.name=dncnn", "model.depth=3", "model.features=8", "wandb.mode=disabled"]


def setup(tmp_path: Path, *over: str):
    """A tiny DnCNN, its Adam, the loss module around it, and a batch (noisy, clean, sigma) of 2 × 12×12."""
    cfg = load_config(None, [*TINY, f"trainer.output_dir={tmp_path / 'runs'}", "trainer.run_name=unit", *over])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 1, 12, 12, generator=g)
    noisy = clean + 0.1 * torch.randn(2, 1, 12, 12, generator=g)
    return cfg, model, opt, Objective(model, cfg.loss, cfg.noise), (noisy, clean, torch.full((2,), 25.0))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ one step
def test_a_finite_step_updates_at_the_given_lr(tmp_path):
    _, model, opt, net, batch = setup(tmp_path)
    before = weights(model)
    res = train_step(net, model, opt, batch, lr=3e-3)
    assert res.finite and res.grad_norm is not None and res.grad_norm > 0 and torch.isfinite(res.loss)
    assert opt.param_groups[0]["lr"] == 3e-3 and not same(before, weights(model))
    # clipping: the reported norm is the one before clipping, the gradients after it have norm <= grad_clip
    res = train_step(net, model, opt, batch, lr=3e-3, grad_clip=1e-3)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert res.grad_norm > 1e-3 and float(total) <= 1e-3 * (1 + 1e-4)


def test_a_nan_loss_is_skipped_and_leaves_weights_and_optimizer_untouched(tmp_path):
    _, model, opt, net, (noisy, clean, sigma) = setup(tmp_path)
    train_step(net, model, opt, (noisy, clean, sigma), lr=1e-3)  # optimizer state to keep
    w, o = params(model), {k: v["exp_avg"].clone() for k, v in enumerate(opt.state.values())}
    noisy = noisy.clone()
    noisy[0, 0, 0, 0] = float("nan")
    res = train_step(net, model, opt, (noisy, clean, sigma), lr=1e-3)
    assert (res.finite, res.grad_norm) == (False, None) and not torch.isfinite(res.loss)
    assert same(w, params(model))  # (BatchNorm's running stats did see the NaN: unhealthy() catches that)
    assert all(torch.equal(v["exp_avg"], o[k]) for k, v in enumerate(opt.state.values()))
    assert all(p.grad is None for p in model.parameters())  # no gradient left over for a later step


def test_non_finite_gradients_skip_the_update(tmp_path):
    _, model, opt, net, batch = setup(tmp_path)
    w = params(model)
    hook = next(model.parameters()).register_hook(lambda g: g * float("inf"))
    res = train_step(net, model, opt, batch, lr=1e-3)
    hook.remove()
    assert not res.finite and res.grad_norm is not None and not torch.isfinite(torch.tensor(res.grad_norm))
    assert torch.isfinite(res.loss) and same(w, params(model)) and not opt.state


def test_project_runs_after_a_step_only(tmp_path):
    _, model, opt, net, (noisy, clean, sigma) = setup(tmp_path)
    calls = []
    model.project_ = lambda: calls.append(1)
    train_step(net, model, opt, (noisy, clean, sigma), lr=1e-3)
    train_step(net, model, opt, (noisy * float("nan"), clean, sigma), lr=1e-3)
    assert calls == [1]


# ------------------------------------------------------------------ rollback
def test_roll_back_restores_the_snapshot_and_keeps_the_run_counters(tmp_path):
    _, model, opt, net, batch = setup(tmp_path)
    train_step(net, model, opt, batch, lr=1e-3)
    state = TrainState(step=4, epoch=1, batch_in_epoch=2, samples=8, rollbacks=1, lr_scale=0.5, nonfinite_steps=1)
    good, w, o = snapshot(model, opt, state), weights(model), json.dumps(str(opt.state_dict()))
    for _ in range(3):  # the run goes on: weights, optimizer and state move away from the snapshot
        train_step(net, model, opt, batch, lr=1e-3)
        state.advance(1, state.batch_in_epoch, 2, 0, finite=False)
    state.metrics = {"val/psnr": 30.0}
    assert not same(w, weights(model)) and good.state.step == 4  # the snapshot is a copy
    back = roll_back(model, opt, good, state, lr_factor=0.25)
    assert same(w, weights(model)) and json.dumps(str(opt.state_dict())) == o
    assert (back.step, back.epoch, back.batch_in_epoch, back.samples) == (4, 1, 2, 8)  # the snapshot's position
    assert (back.nonfinite_steps, back.rollbacks, back.lr_scale) == (4, 2, 0.125)  # counted, one more, scaled
    assert back.metrics == {"val/psnr": 30.0}  # the latest validation stays the latest
    train_step(net, model, opt, batch, lr=1e-3)  # the optimizer got a copy: the snapshot still holds
    assert roll_back(model, opt, good, back, 1.0).step == 4 and same(w, weights(model))


# ------------------------------------------------------------------ validation + checkpoint
def make_run(tmp_path: Path, dist: Dist | None = None) -> tuple[Run, tuple[torch.Tensor, ...]]:
    cfg, model, opt, _, batch = setup(tmp_path)
    state = TrainState(step=4, epoch=0, batch_in_epoch=4, samples=8)
    run = Run(cfg, dist or Dist(), select_runtime(False, "fp32"), tmp_path / "runs" / "unit", model, opt, state,
              snapshot(model, opt, TrainState()))
    return run, batch


def test_checkpoint_is_written_only_for_a_healthy_state(tmp_path, capsys):
    run, batch = make_run(tmp_path)
    ckpts = run.run_dir  # <run>/step_<n>, the layout of both paths
    checkpoint(run, batch)
    assert run.last_ckpt == ckpts / "step_0000004" and run.good.state.step == 4
    stored = json.loads((ckpts / "step_0000004" / "state.json").read_text())
    assert stored == run.state.to_dict() and stored["batch_in_epoch"] == 4
    run.state.advance(0, 4, 2, 0, finite=False)
    run.streak = 1  # a non-finite step still open: not checkpointed
    checkpoint(run, batch)
    run.streak, run.state.step = 0, 6
    with torch.no_grad():
        next(run.model.parameters())[0] = float("nan")  # non-finite weights: not checkpointed
    checkpoint(run, batch)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000004"] and run.good.state.step == 4
    err = capsys.readouterr().err
    assert "step 5: not checkpointed (1 non-finite step in a row); the rollback target stays step 4" in err
    assert "step 6: not checkpointed (non-finite weights); the rollback target stays step 4" in err
    assert same(run.good.weights, load_and_weights(run, ckpts / "step_0000004"))


def load_and_weights(run: Run, path: Path) -> dict[str, torch.Tensor]:
    model = build_model(run.cfg.model)
    load_training_state(path, model, torch.optim.Adam(model.parameters()))
    return weights(model)


def test_ray_reports_every_time_with_the_checkpoint_only_when_healthy(tmp_path):
    reports = []
    run, batch = make_run(tmp_path, Dist(report=lambda m, p: reports.append((m, p is not None and p.is_dir()))))
    run.state.metrics = {"val/psnr": 21.5}
    checkpoint(run, batch)
    run.streak = 2
    checkpoint(run, batch)
    metrics = {"step": 4, "val/psnr": 21.5, "val_psnr": 21.5}
    assert reports == [(metrics, True), (metrics, False)]  # a barrier: reported either way
    assert not run.run_dir.exists()  # Ray's storage keeps them: nothing written into the run directory


# ------------------------------------------------------------------ state.json
def test_train_state_is_state_json_and_reads_older_ones():
    s = TrainState(step=3, lr_scale=0.5, metrics={"val/psnr": 28.0})
    assert TrainState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert list(s.to_dict()) == ["step", "epoch", "batch_in_epoch", "samples", "skipped", "seconds",
                                 "nonfinite_steps", "rollbacks", "lr_scale", "cpu_seconds", "metrics"]
    old = {"step": 7, "epoch": 1, "batch_in_epoch": 3, "lr_scale": 0.5, "rollbacks": 1, "some_future_key": 1}
    assert TrainState.from_dict(old) == TrainState(step=7, epoch=1, batch_in_epoch=3, lr_scale=0.5, rollbacks=1)


# ------------------------------------------------------------------ depth: one attribute for every model
SMALL_DEPTH = {"cscnet": dict(filters=8, kernel_size=5, stride=2), "lista": dict(patch_size=4, atoms=16, tied=False),
               "deep_ksvd": dict(patch_size=4, atoms=16), "cdlnet": dict(filters=8, kernel_size=5),
               "dcea_c": dict(filters=8, kernel_size=5, stride=2), "dcea_uc": dict(filters=8, kernel_size=5, stride=2)}


@pytest.mark.parametrize("name", sorted(n for n, e in MODELS.items() if hasattr(e.module, "set_depth")))
def test_every_model_with_set_depth_exposes_the_depth_in_use_as_depth(name):
    cfg = MODELS[name].config(**SMALL_DEPTH.get(name, {}), depth=3)
    model = build_model(cfg)
    assert model.depth == 3
    model.set_depth(2)
    assert model.depth == 2 and dataclasses.asdict(model.config)["depth"] == 3  # the maximum stays

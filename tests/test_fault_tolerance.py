"""Fault tolerance: which checkpoint a restart picks, atomic/verified checkpoints, rollback after
non-finite steps, a killed driver started again (plain path), a SIGKILLed DDP worker (Ray path).

Processes are stopped at known points from the test side, the package has no hook for it: the killed
driver runs the CLI with the loop's ``save_checkpoint`` wrapped to wait after the step-8 checkpoint
(:data:`HOLD_AFTER_STEP_8`); the Ray workers get a ``fit(instrument=...)`` (:func:`hold_after`) that writes
each rank's pid and holds its report of a known checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sparsefold.trainers.loop as loop
from sparsefold.config import load_config, load_run_config
from sparsefold.trainers.checkpoint import load_training_state, save_checkpoint
from sparsefold.trainers.loop import train
from sparsefold.trainers.storage import CheckpointError, latest_checkpoint, verify_checkpoint
from sparsefold.trainers.tracking import NullTracker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_val(tmp_path) -> Path:
    """Two 64×64 validation images: validation stays cheap."""
    d = tmp_path / "val"
    d.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        img = np.clip(rng.normal(128, 40, (8, 8)).repeat(8, 0).repeat(8, 1), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"v{i}.png")
    return d


TINY = ["model.name=dncnn", "model.depth=3", "model.features=8"]  # builds in ms (CSCNet runs a power method)


@pytest.fixture
def fast(tiny_overrides, small_val) -> list[str]:
    return tiny_overrides + TINY + [f"data.val={small_val}", "wandb.mode=disabled", "runtime.threads=1",
                             "trainer.val_every=1000", "trainer.ckpt_every=4", "trainer.keep_checkpoints=0"]


def tiny_model_and_cfg():
    from sparsefold.models import build_model

    cfg = load_config(None, TINY)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(1, 1, 12, 12)).mean().backward()
    opt.step()  # optimizer state to save
    return model, opt, cfg


# ------------------------------------------------------------------ which checkpoint, atomic, verified
def test_latest_is_the_highest_valid_step_and_half_written_ones_are_skipped(tmp_path, capsys):
    model, opt, cfg = tiny_model_and_cfg()
    d = tmp_path / "run"
    for step in (4, 8, 12, 16):
        save_checkpoint(d / f"step_{step:07d}", model, cfg, {"step": step}, opt)
    # Ray's default names (checkpoint_<timestamp>) rank by the step inside, not by name or age
    save_checkpoint(d / "checkpoint_2099-01-01_00-00-00.000000", model, cfg, {"step": 2}, opt)
    assert latest_checkpoint(d).name == "step_0000016"
    # half-written or damaged, newest first: each is skipped with a reason, the next older one wins
    shutil.copytree(d / "step_0000016", d / "step_0000099.tmp-4242")  # a temp dir left by a crash
    (d / "step_0000016" / "model.safetensors").unlink()  # missing file
    raw = (d / "step_0000012" / "model.safetensors").read_bytes()
    (d / "step_0000012" / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    (d / "step_0000008" / "manifest.json").unlink()  # no manifest: not resumable
    assert latest_checkpoint(d).name == "step_0000004"
    err = capsys.readouterr().err
    assert "step_0000016: incomplete" in err and "step_0000012/model.safetensors: SHA-256" in err
    assert "step_0000008: no manifest.json" in err and "step_0000099" not in err
    for bad in ("step_0000016", "step_0000012", "step_0000008", "step_0000099.tmp-4242"):
        with pytest.raises(CheckpointError):
            load_training_state(d / bad, model, opt)
    state = load_training_state(d / "step_0000004", model, opt)
    assert state["step"] == 4


def test_latest_in_remote_storage_downloads_and_verifies(tmp_path):
    """The Ray path reads storage through pyarrow (S3/GCS in production; fsspec's memory fs here)."""
    import fsspec
    import pyarrow.fs as pafs

    model, opt, cfg = tiny_model_and_cfg()
    mem = fsspec.filesystem("memory")
    for step in (3, 6, 9):
        local = save_checkpoint(tmp_path / f"step_{step:07d}", model, cfg, {"step": step}, opt)
        for f in local.iterdir():
            mem.pipe(f"/bucket/run/{local.name}/{f.name}", f.read_bytes())
    mem.pipe("/bucket/run/step_0000009/state.json", b'{"step": 9, "tampered": true}')  # newest: tampered
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(mem))
    got = latest_checkpoint("/bucket/run", fs, download_to=tmp_path / "dl")
    assert got == tmp_path / "dl" / "step_0000006" and json.loads((got / "state.json").read_text())["step"] == 6
    verify_checkpoint(got)
    mem.rm("/bucket", recursive=True)


def test_driver_side_resume_is_announced_or_refused(tmp_path, capsys):
    from sparsefold.trainers.loop import resume_point

    model, opt, cfg = tiny_model_and_cfg()
    assert resume_point(cfg, str(tmp_path / "fresh")) is None and capsys.readouterr().err == ""
    save_checkpoint(tmp_path / "old" / "step_0000007", model, cfg, {"step": 7}, opt)
    assert resume_point(cfg, str(tmp_path / "old")).name == "step_0000007"
    assert "resuming run old from step 7" in capsys.readouterr().err
    no_resume = load_config(None, TINY + ["trainer.resume=false"])
    with pytest.raises(FileExistsError, match="trainer.resume=true"):
        resume_point(no_resume, str(tmp_path / "old"))


# ------------------------------------------------------------------ NaN/Inf: skip, then roll back
class Recorder(NullTracker):
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_images(self, images, step):
        pass

    def finish(self):
        pass

    def values(self, key):
        return [(s, m[key]) for s, m in self.rows if key in m]


def poison(monkeypatch, bad: dict[int, str]) -> dict:
    """Training forward call n (1-based) returns NaN ('nan'), or a finite output whose gradient is
    infinite ('grad'). Records each call's input and the weights it saw."""
    calls = {"n": 0, "inputs": [], "weights": []}
    real = loop.build_model

    def build(model_cfg, **kw):
        model = real(model_cfg, **kw)
        forward = model.forward

        def poisoned(y, sigma=None):
            out = forward(y, sigma)
            if not torch.is_grad_enabled():  # validation
                return out
            calls["n"] += 1
            calls["inputs"].append(y.detach().clone())
            calls["weights"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
            kind = bad.get(calls["n"])
            if kind == "nan":
                return out * float("nan")
            if kind == "grad":
                out.register_hook(lambda g: g * float("inf"))
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(loop, "build_model", build)
    return calls


def test_nonfinite_steps_skip_then_roll_back_with_lower_lr(fast, monkeypatch, capsys):
    rec = Recorder()
    monkeypatch.setattr(loop, "make_tracker", lambda *a, **k: rec)
    calls = poison(monkeypatch, {6: "nan", 7: "nan", 8: "grad"})  # steps 6, 7, 8: three bad in a row
    over = fast + ["trainer.run_name=nan", "trainer.log_every=1", "trainer.rollback_after=3",
                   "trainer.rollback_lr_factor=0.5"]
    out = train(load_config(None, over + ["trainer.max_steps=12"]))
    assert (out["steps"], out["nonfinite_steps"], out["rollbacks"], out["lr_scale"]) == (12, 3, 1, 0.5)
    # back to the step-4 checkpoint: its weights, its data position (step 5's batch again), half the lr
    assert calls["n"] == 5 + 3 + 8
    assert torch.equal(calls["inputs"][8], calls["inputs"][4])
    assert all(torch.equal(calls["weights"][8][k], v) for k, v in calls["weights"][4].items())
    assert "step 8: 3 consecutive non-finite steps; rolled back to step 4, lr scale 0.5" in capsys.readouterr().err
    assert (8, 1) in rec.values("train/rollbacks") and (8, 3) in rec.values("train/nonfinite_steps")
    lrs = rec.values("train/lr")
    assert lrs[:5] == [(s, 2e-3) for s in range(1, 6)] and lrs[-1] == (12, 1e-3)
    assert rec.values("train/lr_scale")[-1] == (12, 0.5)
    state = json.loads((Path(out["checkpoint"]) / "state.json").read_text())
    assert (state["lr_scale"], state["rollbacks"], state["nonfinite_steps"]) == (0.5, 1, 3)
    # a later resume keeps the lower learning rate
    rec.rows.clear()
    more = train(load_config(None, over + ["trainer.max_steps=14"]))
    assert more["resumed_from_step"] == 12 and more["lr_scale"] == 0.5 and more["rollbacks"] == 1
    assert "from step 12" in capsys.readouterr().err and rec.values("train/lr")[-1] == (14, 1e-3)


def test_resume_is_bit_identical_even_with_random_forward(fast, monkeypatch):
    """Randomness inside a training step (dropout-like) comes from the global RNG, reseeded from
    (seed, rank, step) every step, so a resumed run draws what the uninterrupted one drew."""
    real = loop.build_model

    def build(model_cfg, **kw):
        model = real(model_cfg, **kw)
        forward = model.forward
        model.forward = lambda y, sigma=None: forward(y, sigma) + (0.05 * torch.randn_like(y) if torch.is_grad_enabled()
                                                                    else 0.0)
        return model

    monkeypatch.setattr(loop, "build_model", build)
    full = train(load_config(None, fast + ["trainer.max_steps=8", "trainer.run_name=full"]))
    train(load_config(None, fast + ["trainer.max_steps=4", "trainer.run_name=split"]))
    resumed = train(load_config(None, fast + ["trainer.max_steps=8", "trainer.run_name=split"]))
    assert resumed["resumed_from_step"] == 4
    a = load_file(str(Path(full["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["checkpoint"]) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rollbacks_are_bounded(fast, monkeypatch):
    poison(monkeypatch, {n: "nan" for n in range(1, 100)})
    cfg = load_config(None, fast + ["trainer.run_name=diverged", "trainer.max_steps=20", "trainer.rollback_after=2",
                                    "trainer.max_rollbacks=1"])
    with pytest.raises(RuntimeError, match="training diverged: 2 consecutive non-finite steps .* after 1 rollbacks"):
        train(cfg)


# ------------------------------------------------------------------ kill the driver, start it again
# `sparsefold train ARGS` whose driver, once the step-8 checkpoint is written, waits there to be killed
HOLD_AFTER_STEP_8 = textwrap.dedent("""
    import sys, time
    import sparsefold.trainers.loop as loop
    from sparsefold.cli import main

    save = loop.save_checkpoint

    def save_then_hold(path, *args, **kwargs):
        out = save(path, *args, **kwargs)
        while path.name == "step_0000008":
            time.sleep(1)
        return out

    loop.save_checkpoint = save_then_hold
    sys.exit(main(sys.argv[1:]))
""")


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_driver_resumes_latest_checkpoint_when_started_again(fast, tmp_path, capfd):
    over = fast + ["trainer.max_steps=12", "trainer.progress=false"]
    ref = train(load_run_config(None, over + ["trainer.run_name=ref"]))  # uninterrupted, same config as the CLI

    env = {**os.environ, "WANDB_MODE": "offline"}
    args = ["train", *over, "trainer.run_name=crash"]
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_STEP_8, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = Path(ref["run_dir"]).parent / "crash"
    try:
        wait_for(lambda: (latest_checkpoint(ckpts, warn=False) or Path("x")).name == "step_0000008", 300,
                 "the step-8 checkpoint", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, held right after writing the step-8 checkpoint
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL

    again = subprocess.run([sys.executable, "-m", "sparsefold", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming run crash from step 8 ({ckpts / 'step_0000008'})" in again.stderr
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["steps"] == 12 and out["resumed_from_step"] == 8
    # resumed == uninterrupted, bit for bit on CPU (data position, RNG streams and optimizer restored)
    a = load_file(str(Path(ref["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(out["checkpoint"]) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert out["val_psnr"] == ref["val_psnr"]

    # a new run name starts fresh, and says nothing about resuming
    capfd.readouterr()
    fresh = train(load_run_config(None, over + ["trainer.run_name=fresh", "trainer.max_steps=2"]))
    assert fresh["resumed_from_step"] is None and fresh["steps"] == 2
    assert "resuming" not in capfd.readouterr().err


# ------------------------------------------------------------------ Ray: SIGKILL one DDP worker
def hold_after(fault: Path, step: int):
    """A ``fit(instrument=...)``: every Ray worker writes its pid to ``<fault>/rank<r>.pid`` when it starts
    and, after its report of the checkpoint of ``step`` (a barrier of all ranks; rank 0's copy is in
    storage when it returns), waits while ``<fault>/hold`` exists. Shipped to the workers by value."""

    def instrument(dist: loop.Dist) -> loop.Dist:
        tmp = fault / f"rank{dist.rank}.pid.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, fault / f"rank{dist.rank}.pid")
        report = dist.report

        def held(metrics: dict, path: Path | None) -> None:
            report(metrics, path)
            while int(metrics["step"]) == step and (fault / "hold").exists():
                time.sleep(0.05)

        return dataclasses.replace(dist, report=held)

    return instrument


@pytest.mark.ray
def test_sigkill_one_ddp_worker_resumes_latest_and_matches_uninterrupted(ddp_run, tmp_path):
    """conftest's uninterrupted ``ddp_run`` again under another name, rank 1 SIGKILLed while both ranks
    wait after the step-12 checkpoint (a checkpoint-only report; the last validation was at 8)."""
    import ray.cloudpickle

    from sparsefold.trainers.ray_train import fit

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    ref, fault = ddp_run.out, tmp_path / "fault"
    fault.mkdir()
    (fault / "hold").write_text("")
    run = Path(ref["run_dir"]).parent / "killed"
    killed: dict = {}

    def killer():
        try:
            wait_for(lambda: (latest_checkpoint(run, warn=False) or Path("x")).name == "step_0000012", 300,
                     "the step-12 checkpoint")
            pid = int((fault / "rank1.pid").read_text())
            killed["at"] = time.monotonic()
            os.kill(pid, signal.SIGKILL)  # rank 1's Ray worker process, while both ranks wait at step 12
            wait_for(lambda: int((fault / "rank1.pid").read_text()) != pid, 300, "the restarted worker group")
        except BaseException as e:  # noqa: BLE001
            killed["error"] = e
        finally:
            (fault / "hold").unlink(missing_ok=True)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = fit(load_config(None, ddp_run.overrides + ["trainer.run_name=killed"]), instrument=hold_after(fault, 12))
    thread.join(60)
    assert "error" not in killed and "at" in killed, killed
    assert out["steps"] == 16 and out["resumed_from_step"] == 12  # the latest checkpoint, not an older one
    a = load_file(str(Path(ref["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(out["checkpoint"]) / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"killed-worker run vs uninterrupted: PSNR {out['val_psnr']:.6f} vs {ref['val_psnr']:.6f} dB, "
          f"max |weight difference| {diff:.3g}")
    assert abs(out["val_psnr"] - ref["val_psnr"]) < 0.05
    assert diff == 0.0  # gloo all-reduce of 2 ranks is exact and deterministic: bit-identical on CPU

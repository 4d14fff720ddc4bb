"""Nothing lost while training (issue 13, items 2, 3 and 8's disk full): only healthy states are
checkpointed or rolled back to, one writer per run directory, a resume may not switch trajectories, and
a checkpoint that cannot be written leaves the earlier ones intact and ends the run with one line."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import sparsefold.trainers.checkpoint as checkpoint
import sparsefold.trainers.loop as loop
from sparsefold.cli import main
from sparsefold.config import load_config
from sparsefold.errors import InputError, RunError
from sparsefold.models import build_model
from sparsefold.trainers.checkpoint import config_changes, load_training_state
from sparsefold.trainers.loop import train
from sparsefold.trainers.runlock import run_lock
from sparsefold.trainers.storage import latest_checkpoint, prune_checkpoints, run_dir_of, verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fast(tiny_overrides, tmp_path) -> list[str]:
    """A 3-layer DnCNN (it has BatchNorm buffers) on 48-px patches, two 64-px validation images."""
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(val / f"v{i}.png")
    return tiny_overrides + ["model.name=dncnn", "model.depth=3", "model.features=8", f"data.val={val}",
                             "wandb.mode=disabled", "runtime.threads=1", "trainer.val_every=1000",
                             "trainer.ckpt_every=4", "trainer.keep_checkpoints=1", "trainer.run_name=r"]


def finite(ckpt: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in load_file(str(ckpt / "model.safetensors")).values())


def nan_inputs_from(monkeypatch, first: int) -> list[dict]:
    """Training forward call n >= ``first`` gets a NaN input: NaN loss, and BatchNorm's running stats
    turn NaN too (as after a real blow-up). Returns the weights each training call saw."""
    seen: list[dict] = []
    real = loop.build_model

    def build(model_cfg, **kw):
        model = real(model_cfg, **kw)
        forward = model.forward

        def poisoned(y, sigma=None):
            if torch.is_grad_enabled():
                seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                if len(seen) >= first:
                    y = y * float("nan")
            return forward(y, sigma)

        model.forward = poisoned
        return model

    monkeypatch.setattr(loop, "build_model", build)
    return seen


# ------------------------------------------------------------------ item 2: healthy checkpoints only
def test_divergence_keeps_the_last_healthy_checkpoint_and_rolls_back_to_it(fast, monkeypatch):
    """Steps 1-5 healthy (checkpoint at 4), then every step NaN: the step-8 checkpoint would hold NaN
    BatchNorm stats and (keep_checkpoints=1) prune step 4. Instead step 8 is not saved, the rollback
    restores step 4, and the final error names step 4 and what to change."""
    seen = nan_inputs_from(monkeypatch, first=6)
    cfg = load_config(None, fast + ["trainer.max_steps=40", "trainer.rollback_after=6", "trainer.max_rollbacks=1"])
    with pytest.raises(RunError) as err:
        train(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("training diverged: 6 consecutive non-finite steps at step 10 after 1")
    assert "last healthy state: step 4" in msg and "optim.lr" in msg and "optim.grad_clip" in msg
    # steps 1-11 (NaN from 6), rolled back at 11 to the weights that entered step 5, steps 5-10 again
    assert len(seen) == 11 + 6
    assert all(torch.equal(seen[11][k], v) for k, v in seen[4].items())
    ckpts = run_dir_of(cfg)
    assert [p.name for p in ckpts.glob("step_*")] == ["step_0000004"]
    assert latest_checkpoint(ckpts).name == "step_0000004" and finite(ckpts / "step_0000004")
    assert not (run_dir_of(cfg) / ".lock").exists()  # released by the exception


def test_weights_that_overflow_on_the_next_step_are_not_checkpointed(fast, capsys):
    """lr=1e30: step 1 has a finite loss (computed before its update) but leaves weights ~1e30 that
    overflow in every later forward. Its checkpoint would be finite yet useless as a rollback target."""
    cfg = load_config(None, fast + ["optim.lr=1e30", "trainer.ckpt_every=1", "trainer.max_steps=10",
                                    "trainer.rollback_after=2", "trainer.max_rollbacks=0"])
    with pytest.raises(RunError, match=r"step 3 after 0 rollbacks .* last healthy state: step 0; lower optim.lr"):
        train(cfg)
    assert "step 1: not checkpointed (its weights give a non-finite loss)" in capsys.readouterr().err
    assert latest_checkpoint(run_dir_of(cfg), warn=False) is None


# ------------------------------------------------------------------ item 3: one writer per run dir
LOCK_HOLDER = """
import sys, time
from sparsefold.trainers.runlock import run_lock
from sparsefold.trainers.storage import latest_checkpoint, prune_checkpoints, run_dir_of, verify_checkpoint
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_writer_is_refused_and_a_killed_holder_is_taken_over(fast, capsys):
    cfg = load_config(None, fast + ["trainer.max_steps=2"])
    run_dir = run_dir_of(cfg)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError) as err:
            train(cfg)
        msg = str(err.value)
        assert "\n" not in msg and f"run dir {run_dir} is in use by pid {holder.pid} on host {socket.gethostname()}" in msg
        assert "pick another trainer.run_name" in msg
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # refused before writing anything
    finally:
        holder.kill()
        holder.wait(30)
    out = train(cfg)  # its owner died (SIGKILL): the lock is taken over
    assert out["steps"] == 2 and "taking over the lock of pid" in capsys.readouterr().err
    assert not (run_dir / ".lock").exists()


def test_cli_refuses_a_locked_run_with_one_line_and_exit_2(fast, capsys):
    cfg = load_config(None, fast)
    with run_lock(run_dir_of(cfg)):
        assert main(["train", *fast]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is in use by pid {os.getpid()}" in err[0], err


def test_lock_is_released_on_errors_and_another_hosts_lock_is_kept(tmp_path):
    with pytest.raises(KeyError), run_lock(tmp_path / "run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        raise KeyError("boom")
    assert not lock.exists()
    # another host's holder cannot be proven dead from here (NFS): refused, with what to do
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "started": "yesterday"}))
    with pytest.raises(InputError, match=r"in use by pid 1 on host other-node \(started yesterday\).*delete .*\.lock"):
        with run_lock(tmp_path / "run"):
            pass
    # this host, a pid that is gone: taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}))
    with run_lock(tmp_path / "run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_prune_removes_only_this_process_temp_dirs(tmp_path):
    other = tmp_path / "step_0000008.tmp-999999999"  # another process's in-flight checkpoint
    mine = tmp_path / f"step_0000008.tmp-{os.getpid()}"
    for d in (other, mine):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    prune_checkpoints(tmp_path, keep=1)
    assert other.exists() and not mine.exists()


def test_resume_refuses_other_trajectory_settings_and_allows_the_rest(fast):
    train(load_config(None, fast + ["trainer.max_steps=4"]))
    changed = fast + ["trainer.max_steps=8", "runtime.precision=fp32", "loss.kind=l1"]
    with pytest.raises(InputError) as err:
        train(load_config(None, changed))
    msg = str(err.value)
    assert "\n" not in msg and "step_0000004" in msg and "pick another trainer.run_name" in msg
    assert "loss.kind: 'mse' -> 'l1'" in msg and "runtime.precision: 'auto' -> 'fp32'" in msg
    assert "max_steps" not in msg
    # how long, how often, where it reports: free to change
    more = train(load_config(None, fast + ["trainer.max_steps=8", "trainer.log_every=2", "trainer.ckpt_every=2",
                                           "trainer.keep_checkpoints=3", "wandb.mode=offline"]))
    assert more["resumed_from_step"] == 4 and more["steps"] == 8


def test_config_changes_lists_only_trajectory_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    a = load_config(None, ["data.train=shards"]).to_dict()
    b = load_config(None, [f"data.train={tmp_path / 'shards'}", "trainer.max_steps=5", "wandb.mode=disabled",
                           "trainer.depth_stages=[]", "data.batch_size=8"]).to_dict()
    assert config_changes(a, b) == ["data.batch_size: 4 -> 8"]
    assert config_changes(a, {**b, "trainer": {**b["trainer"], "depth_stages": [2, 4]}})[-1] == \
        "trainer.depth_stages: [] -> [2, 4]"


# ------------------------------------------------------------------ item 8: disk full while checkpointing
FULL = {  # what each writer raises on a full disk (measured on a 256 KiB tmpfs)
    "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "os": OSError(errno.ENOSPC, "No space left on device"),
}


def _fail_second_write(monkeypatch, how: str) -> None:
    """The second checkpoint's optimizer.pt (torch.save) or weights (save_file) hit a full disk mid-write."""
    target = (checkpoint.torch, "save") if how == "torch" else (checkpoint, "save_file")
    real, calls = getattr(*target), {"n": 0}

    def failing(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"\0" * 64)  # a partial file
            raise FULL[how]
        return real(obj, path, *a, **k)

    monkeypatch.setattr(*target, failing)


@pytest.mark.parametrize("how", list(FULL))
def test_disk_full_while_checkpointing_keeps_the_previous_one(fast, monkeypatch, how):
    _fail_second_write(monkeypatch, how)
    cfg = load_config(None, fast + ["trainer.max_steps=12", "trainer.keep_checkpoints=0"])
    ckpts = run_dir_of(cfg)
    with pytest.raises(RunError) as err:
        train(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"could not write checkpoint {ckpts / 'step_0000008'}: ")
    assert ("unexpected pos 64 vs 0 (disk full?)" if how == "torch" else "No space left on device") in msg
    assert f"free space or move trainer.output_dir; the previous checkpoint {ckpts / 'step_0000004'} is intact" in msg
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000004"]  # the temp dir is gone
    verify_checkpoint(ckpts / "step_0000004")
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    assert load_training_state(ckpts / "step_0000004", model, opt)["step"] == 4
    assert not (run_dir_of(cfg) / ".lock").exists()

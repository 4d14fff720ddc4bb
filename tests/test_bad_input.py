"""Bad input: a clear one-line error (exit code 2) before anything starts, or skipped and counted.

Config keys/types/values, `pipe:` refusal and the dataset-level skip counting are covered in
test_trainer.py, test_cli.py and test_datasets.py; this file covers the rest of the issue's list at the
level a user meets it (the CLI / a training run).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sparsefold.trainers.loop as loop
from sparsefold.cli import main
from sparsefold.config import load_config
from sparsefold.datasets import write_shards
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.loop import train
from sparsefold.trainers.storage import MANIFEST, OPTIM, CheckpointError, sha256_file
from sparsefold.trainers.tracking import NullTracker

TINY = ["model.name=dncnn", "model.depth=3", "model.features=8"]  # builds in ms


@pytest.fixture
def fast(tiny_overrides, tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setenv("SPARSEFOLD_NO_MALLOPT", "1")  # cli.main in this process: leave malloc alone
    val = make_images(tmp_path / "val", 2)
    return tiny_overrides + TINY + [f"data.val={val}", "wandb.mode=disabled", "runtime.threads=1",
                                    "trainer.val_every=1000", "trainer.progress=false"]


def make_images(folder: Path, n: int, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "config error:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ data: fail before Ray starts
@pytest.mark.parametrize("case, expected", [
    ("missing", "data.train: shard not found: "),
    ("empty_dir", "holds no index.json and no .tar shards; write shards into it first"),
    ("empty_list", "data.train: no shards in ','"),
    ("too_few", "data.train: 3 shards < ranks × workers (2 × 2); write more shards"),
])
def test_data_errors_fail_before_ray_starts(case, expected, fast, tmp_path, capsys, monkeypatch):
    import ray  # this test process may hold the session's cluster (tests/conftest.py): Ray as if it had none,
    inits = []  # and any start of one recorded
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(a or k))
    train_spec = {"missing": str(tmp_path / "nope"), "empty_dir": str(tmp_path / "empty"), "empty_list": ","}
    (tmp_path / "empty").mkdir()
    if case == "too_few":
        train_spec[case] = write_shards(make_images(tmp_path / "img", 6), tmp_path / "sh", shard_size=2)
    args = fast + [f"data.train={train_spec[case]}", "ray.enabled=true", "ray.workers=2",
                   "data.num_workers=2"]
    assert main(["train", *args]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert inits == []  # the driver never started a cluster


def test_missing_data_path_plain_run(fast, tmp_path, capsys):
    assert main(["train", *fast, f"data.train={tmp_path / 'nope'}"]) == 2
    assert f"data.train: shard not found: {tmp_path / 'nope'}" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------ corrupt data: skipped, counted
def test_corrupt_shard_and_undecodable_image_are_skipped_and_counted(fast, tmp_path, monkeypatch):
    good = write_shards(make_images(tmp_path / "img", 8), tmp_path / "sh", shard_size=2)
    shards = sorted((tmp_path / "sh").glob("*.tar"))
    raw = shards[0].read_bytes()
    (tmp_path / "truncated.tar").write_bytes(raw[: len(raw) // 2 + 100])  # cut inside a member
    with tarfile.open(tmp_path / "badimage.tar", "w") as tar:  # a valid tar whose png is garbage
        for name, payload in (("x0.png", (tmp_path / "img" / "im0.png").read_bytes()), ("x1.png", b"not a png" * 9)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    logged = []
    monkeypatch.setattr(loop, "make_tracker", lambda *a, **k: Recorder(logged))
    spec = ",".join([good.replace("{000000..000003}", f"{i:06d}") for i in range(4)]
                    + [str(tmp_path / "truncated.tar"), str(tmp_path / "badimage.tar")])
    out = train(load_config(None, fast + [f"data.train={spec}", "data.batch_size=2", "data.shuffle_buffer=0",
                                          "trainer.max_steps=12", "trainer.log_every=1", "trainer.run_name=corrupt"]))
    assert out["steps"] == 12  # the run went on
    assert out["skipped"] >= 2  # the truncated shard and the garbage png, at least once each
    assert max(m.get("data/skipped", 0) for m in logged) == out["skipped"]


class Recorder(NullTracker):
    def __init__(self, rows: list) -> None:
        self.rows = rows

    def log(self, metrics, step):
        self.rows.append(dict(metrics))

    def log_images(self, images, step):
        pass

    def finish(self):
        pass


# ------------------------------------------------------------------ checkpoints: no pickle, no foreign files
class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker with write access would do: make the manifest match the swapped files."""
    m = json.loads((ckpt / MANIFEST).read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    (ckpt / MANIFEST).write_text(json.dumps(m))


def test_tampered_or_malicious_checkpoint_is_refused(fast, tmp_path, capsys):
    import torch

    args = ["train", *fast, "trainer.max_steps=2", "trainer.ckpt_every=2", "trainer.run_name=victim"]
    assert main(args) == 0
    ckpt = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"])

    # 1. a swapped file, manifest untouched: refused by its SHA-256, and never chosen for resume
    good_optim = (ckpt / OPTIM).read_bytes()
    marker = tmp_path / "pwned"
    torch.save({"state": {0: Evil(marker)}, "param_groups": []}, ckpt / OPTIM)
    assert main([*args, "trainer.max_steps=4"]) == 0  # resume skips the bad checkpoint: starts from 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint: {ckpt / OPTIM}: SHA-256/size does not match" in err and "resuming" not in err
    assert not marker.exists()

    # 2. the manifest rewritten to match: the pickle still never runs (weights_only=True)
    ckpt = ckpt.parent / "step_0000004"  # the latest of the run that started over
    torch.save({"state": {0: Evil(marker)}, "param_groups": []}, ckpt / OPTIM)
    rewrite_manifest(ckpt)
    assert main([*args, "trainer.max_steps=6"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {ckpt / OPTIM}: refused (not a weights-only file: ") and not marker.exists()
    assert "GLOBAL posix.system" in line and line.endswith("it was not unpickled")

    # 3. a foreign weights file (another architecture), manifest rewritten: refused by name and shape
    (ckpt / OPTIM).write_bytes(good_optim)
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(3, 3)}, str(ckpt / "model.safetensors"))
    rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match="weights do not match dncnn"):
        load_model(ckpt)
    # 4. the same file swapped in without touching the manifest: refused before it is read
    (ckpt / MANIFEST).write_text((ckpt / MANIFEST).read_text().replace('"bytes": ', '"bytes": 1'))
    with pytest.raises(CheckpointError, match="SHA-256/size does not match"):
        load_model(ckpt)


# ------------------------------------------------------------------ the W&B key stays out of everything
def test_wandb_key_never_written(fast, tmp_path):
    key = "sfTESTKEY" + "0123456789abcdef0123456789abcde"  # 40 characters, like a real key
    env = {**os.environ, "WANDB_API_KEY": key, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "sparsefold", "train", *fast, "wandb.mode=offline", "trainer.max_steps=2",
           "trainer.ckpt_every=2", "trainer.run_name=secret"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    run_dir = Path(json.loads(p.stdout.strip().splitlines()[-1])["run_dir"])
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.suffix == ".wandb" for f in files) and any(f.name == MANIFEST for f in files)  # not vacuous
    assert run_dir.is_relative_to(tmp_path)
    for needle in (key, key[-12:]):
        assert needle not in p.stdout and needle not in p.stderr
        leaked = [str(f) for f in files if needle.encode() in f.read_bytes()]
        assert not leaked, leaked

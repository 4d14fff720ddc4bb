"""trainers/storage.py: where a run's files live. One layout for both training paths (``<run>/step_<N>``, old
plain runs' ``<run>/checkpoints/step_*`` still read), one scanner for the newest valid checkpoint (a local
directory, or any pyarrow filesystem: downloaded and verified), one resume decision (loop.py:resume_point),
run naming, Ray storage and upload, and no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsefold.cli import main
from sparsefold.config import is_url, load_config
from sparsefold.trainers.checkpoint import save_checkpoint
from sparsefold.trainers.loop import resume_point, train
from sparsefold.trainers.ray_train import newest_checkpoint
from sparsefold.trainers.storage import (
    absolute_paths,
    latest_checkpoint,
    resolve_checkpoint,
    run_dir_of,
    storage_of,
    upload_tree,
    verify_checkpoint,
)

TINY = ["model.name=dncnn", "model.depth=3", "model.features=8"]  # builds in ms


def tiny_model_and_cfg(extra: list[str] | None = None):
    from sparsefold.models import build_model

    cfg = load_config(None, TINY + (extra or []))
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(1, 1, 12, 12)).mean().backward()
    opt.step()  # optimizer state to save
    return model, opt, cfg


def write_run(run: Path, steps: tuple[int, ...], tampered: int | None = None) -> None:
    """Checkpoints ``run/step_<n>`` of ``steps``; ``tampered``'s state.json rewritten (manifest untouched)."""
    model, opt, cfg = tiny_model_and_cfg()
    for step in steps:
        save_checkpoint(run / f"step_{step:07d}", model, cfg, {"step": step}, opt)
    if tampered is not None:
        (run / f"step_{tampered:07d}" / "state.json").write_text(json.dumps({"step": tampered, "evil": True}))


@pytest.fixture
def fast(tiny_overrides, tmp_path) -> list[str]:
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(val / f"v{i}.png")
    return tiny_overrides + TINY + [f"data.val={val}", "runtime.threads=1", "trainer.val_every=1000",
                                    "trainer.ckpt_every=2", "trainer.keep_checkpoints=0", "trainer.run_name=r"]


# ------------------------------------------------------------------ one layout; the old one still read
def test_both_paths_write_step_dirs_in_the_run_dir_and_prune_there(fast):
    out = train(load_config(None, fast + ["trainer.max_steps=6", "trainer.keep_checkpoints=2"]))
    run = Path(out["run_dir"])
    assert Path(out["checkpoint"]) == run / "step_0000006"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000004", "step_0000006"]  # pruned in place
    assert not (run / "checkpoints").exists() and (run / "config.json").is_file()


def test_an_old_plain_run_still_resumes_evaluates_and_is_found(fast, capsys):
    """A run written before the unified layout (``<run>/checkpoints/step_*``): found by the scanner and by
    ``evaluate <run dir>``, resumed by training it again; new checkpoints go to ``<run>/step_*`` and the
    old folder is only read."""
    out = train(load_config(None, fast + ["trainer.max_steps=4"]))
    run = Path(out["run_dir"])
    (run / "checkpoints").mkdir()
    for d in run.glob("step_*"):  # the old layout
        d.rename(run / "checkpoints" / d.name)
    old = run / "checkpoints" / "step_0000004"
    assert latest_checkpoint(run) == old and resolve_checkpoint(run) == old
    assert main(["evaluate", str(run), str(run.parent.parent / "val"), "--sigma", "25"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"] == str(old)

    more = train(load_config(None, fast + ["trainer.max_steps=6"]))
    assert more["resumed_from_step"] == 4 and Path(more["checkpoint"]) == run / "step_0000006"
    assert f"resuming run r from step 4 ({old})" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]  # untouched
    assert latest_checkpoint(run) == run / "step_0000006"


# ------------------------------------------------------------------ one scanner
def test_scanner_local_dir_picks_the_newest_valid_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, (3, 6, 9), tampered=9)
    (run / "step_0000012.tmp-4242").mkdir()  # a half-written one
    assert latest_checkpoint(run) == run / "step_0000006"
    err = capsys.readouterr().err
    assert "step_0000009/state.json: SHA-256/size does not match" in err and "step_0000012" not in err
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("kind", ["subtree", "fsspec-memory"])
def test_scanner_remote_downloads_verifies_and_skips_a_tampered_one(tmp_path, capsys, kind):
    """A pyarrow filesystem that is not the local one (S3/GCS in production): ``step_*`` tried newest first,
    each downloaded and verified; the tampered newest is skipped, the next one returned as a local copy."""
    import pyarrow.fs as pafs

    store = tmp_path / "store"
    write_run(store / "bucket" / "run", (3, 6, 9), tampered=9)
    (store / "bucket" / "run" / "step_0000010").write_text("a file, not a checkpoint")
    if kind == "subtree":
        fs = pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem())
    else:
        import fsspec

        mem = fsspec.filesystem("memory")
        for f in (store / "bucket").rglob("*"):
            if f.is_file():
                mem.pipe(f"/bucket/{f.relative_to(store / 'bucket').as_posix()}", f.read_bytes())
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(mem))
    try:
        got = latest_checkpoint("/bucket/run", fs, download_to=tmp_path / "dl")
    finally:
        if kind != "subtree":
            mem.rm("/bucket", recursive=True)
    assert got == tmp_path / "dl" / "step_0000006" and json.loads((got / "state.json").read_text())["step"] == 6
    verify_checkpoint(got)
    assert not (tmp_path / "dl" / "step_0000009").exists()  # the rejected download is removed
    assert "step_0000009" in capsys.readouterr().err


def test_newest_checkpoint_of_a_url_run_is_its_url(tmp_path):
    """The Ray driver's final ``checkpoint`` for a URL output_dir (file:// here): the newest valid one."""
    root = tmp_path / "r"
    write_run(root, (2, 10, 11), tampered=11)
    (root / "step_0000012.tmp-7").mkdir()
    (root / "step_0000099").write_text("a file, not a checkpoint")
    assert newest_checkpoint(root.as_uri()) == f"{root.as_uri()}/step_0000010"
    assert newest_checkpoint(str(root)) == str(root / "step_0000010")
    assert newest_checkpoint((tmp_path / "none").as_uri()) is None


# ------------------------------------------------------------------ one resume decision
def test_resume_decision_announces_once_or_refuses(tmp_path, capsys):
    _, _, cfg = tiny_model_and_cfg()
    assert resume_point(cfg, tmp_path / "fresh") is None and capsys.readouterr().err == ""
    write_run(tmp_path / "old", (5, 7))
    assert resume_point(cfg, tmp_path / "old") == tmp_path / "old" / "step_0000007"
    err = capsys.readouterr().err.splitlines()
    assert err == [f"[sparsefold] resuming run old from step 7 ({tmp_path / 'old' / 'step_0000007'})"]
    assert resume_point(cfg, tmp_path / "old", announce=False) is not None and capsys.readouterr().err == ""
    _, _, no_resume = tiny_model_and_cfg(["trainer.resume=false"])
    with pytest.raises(FileExistsError, match=r"old already holds checkpoints; .*set trainer.resume=true"):
        resume_point(no_resume, tmp_path / "old")
    assert resume_point(no_resume, tmp_path / "fresh") is None  # nothing to refuse


def test_plain_training_announces_its_resume_once(fast, capsys):
    train(load_config(None, fast + ["trainer.max_steps=2"]))
    capsys.readouterr()
    train(load_config(None, fast + ["trainer.max_steps=4"]))
    assert capsys.readouterr().err.count("resuming run r from step 2") == 1


# ------------------------------------------------------------------ import cost
def test_storage_imports_neither_torch_nor_pyarrow():
    """``sparsefold models`` lists the bundled models through storage.py: no torch for that."""
    code = ("import sys, sparsefold.trainers.storage as s; s.bundled_models(); "
            "print(sorted(m for m in ('torch', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ naming, Ray storage, upload


def test_is_url():
    assert all(is_url(u) for u in ("s3://b/p", "gs://b", "file:///tmp/x", "memory://x"))
    assert not any(is_url(p) for p in ("runs", "/mnt/shared/runs", "~/runs", "C:/runs", "a:b"))


def test_run_dir_and_storage_of_paths_and_urls(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFOLD_CACHE", str(tmp_path / "cache"))
    local = load_config(None, [f"trainer.output_dir={tmp_path}/runs", "trainer.run_name=r"])
    assert run_dir_of(local) == tmp_path / "runs" / "r"
    assert storage_of(local) == (str(tmp_path / "runs"), "r", str(tmp_path / "runs" / "r"))
    monkeypatch.chdir(tmp_path)
    rel = load_config(None, ["trainer.output_dir=out", "trainer.run_name=r", "ray.enabled=true"])
    assert storage_of(rel)[0] == str(tmp_path / "out")  # absolute on the driver: workers run elsewhere
    url = load_config(None, ["trainer.output_dir=s3://bucket/runs/", "trainer.run_name=r", "ray.enabled=true"])
    assert run_dir_of(url) == tmp_path / "cache" / "runs" / "r"  # node-local staging, uploaded at the end
    assert storage_of(url) == ("s3://bucket/runs", "r", "s3://bucket/runs/r")


def test_upload_tree_merges_into_a_url(tmp_path):
    src = tmp_path / "run"
    (src / "wandb" / "offline-run-1" / "files").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "wandb" / "offline-run-1" / "files" / "output.log").write_text("log")
    (src / "wandb" / "latest-run").symlink_to(src / "wandb" / "offline-run-1")
    dest = tmp_path / "store" / "r"
    (dest / "step_0000002").mkdir(parents=True)
    (dest / "step_0000002" / "model.safetensors").write_bytes(b"x")  # Ray's checkpoint: must stay
    n = upload_tree(src, dest.as_uri())
    assert n >= 2
    assert (dest / "config.json").read_text() == "{}"
    assert (dest / "wandb" / "offline-run-1" / "files" / "output.log").read_text() == "log"
    assert (dest / "step_0000002" / "model.safetensors").read_bytes() == b"x"
    with pytest.raises(ValueError, match="not a URL"):
        upload_tree(src, str(dest))


def test_data_paths_are_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    """Ray workers run in another directory: fit() hands them absolute local data paths."""
    monkeypatch.chdir(tmp_path)
    assert absolute_paths("data/set12|builtin:skimage") == f"{tmp_path}/data/set12|builtin:skimage"
    assert absolute_paths("shards/train-{000000..000009}.tar") == f"{tmp_path}/shards/train-{{000000..000009}}.tar"
    for unchanged in ("s3://bucket/train-{0..3}.tar", "builtin:skimage", "", "/abs/dir", "pipe:cat x.tar"):
        assert absolute_paths(unchanged) == unchanged

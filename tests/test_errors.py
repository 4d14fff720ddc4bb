"""Errors users can act on (issue 13, items 8 and 9): one stderr line with the right exit code, a traceback
only with --debug, checks that need no model or data before any heavy import, and no silent wrong number
(negative --images, NaN/inf in JSON, duplicate YAML keys, non-finite or unverifiable checkpoint weights)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sparsefold.cli as cli
from sparsefold.cli import main
from sparsefold.errors import RunError

BUNDLED_CSCNET = Path(cli.__file__).parent / "bundled" / "cscnet"


def strict_json(line: str) -> dict:
    """json.loads that refuses NaN / Infinity (what a strict JSON parser, e.g. JavaScript's, does)."""
    def refuse(c: str) -> None:
        raise ValueError(f"not JSON: {c}")
    return json.loads(line, parse_constant=refuse)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(d / f"{i}.png")
    return d


# ------------------------------------------------------------------------------------------------
# 8. fail fast: config, data paths and output_dir are checked before torch (or Ray, W&B, data) is imported


def test_checks_without_model_or_data_run_before_any_heavy_import(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    tagged, dup = tmp_path / "tagged.yaml", tmp_path / "dup.yaml"
    tagged.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    dup.write_text("trainer:\n  max_steps: 5\n  val_every: 1\n  max_steps: 7\n")
    cases = [["data.train=/nope/shards"], ["trainer.nme=1"], ["data.val=/nope|/nope2"],
             [f"trainer.output_dir={afile}/runs"], [str(tagged)], [str(dup)], ["optim.lr=.inf"]]
    code = textwrap.dedent("""
        import contextlib, io, json, resource, sys
        from sparsefold.cli import main
        out = []
        for args in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(["train", *args])
            out.append([rc, err.getvalue()])
        heavy = sorted(m for m in ("torch", "ray", "wandb", "webdataset") if m in sys.modules)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"runs": out, "heavy": heavy, "cpu": cpu.ru_utime + cpu.ru_stime}))
    """)
    res = json.loads(subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True,
                                    text=True, check=True, cwd=tmp_path).stdout)
    lines = []
    for (rc, err), args in zip(res["runs"], cases):
        assert rc == 2, (args, err)
        lines.append(one_line(err))
    assert res["heavy"] == [], res  # was: torch (4 CPU-s here) before the first check, 12 CPU-s to data.train's
    assert res["cpu"] < 2.0, res  # 7 failures, one interpreter; measured ~0.3 CPU-s
    assert lines[0].startswith("config error: data.train: shard not found: /nope/shards (no such file or folder)")
    assert lines[1].startswith("config error: trainer.nme: unknown key")
    assert lines[2].startswith("config error: data.val:")
    assert lines[3] == (f"config error: trainer.output_dir: cannot write '{afile}/runs': {afile} is not a folder; "
                        "choose a folder you can write to")
    assert "no !! tags" in lines[4] and str(tagged) in lines[4]
    assert lines[5] == f"config error: trainer.max_steps: given twice in {dup} (line 4); keep one"
    assert lines[6] == "config error: optim.lr: must be a finite number, got inf"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused_first(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert main(["train", f"trainer.output_dir={ro}/runs"]) == 2
    assert "is not writable" in one_line(capsys.readouterr().err)


def test_too_large_batch_is_one_config_error():
    from sparsefold.config import ConfigError, DataConfig
    from sparsefold.trainers.loop import batches

    class Stream:  # the PatchStream surface batches() uses
        data = DataConfig(batch_size=5000)

        def set_epoch(self, epoch: int) -> None:
            pass

    with pytest.raises(ConfigError, match=r"data.batch_size: 5000 is more than data.train yields .* lower data"):
        next(batches(Stream(), [], 0, 0))  # a loader with drop_last yields nothing when the batch is too large


# ------------------------------------------------------------------------------------------------
# 8. exit codes, one line, --debug


def _raise(exc: BaseException):
    def cmd(a) -> int:
        raise exc
    return cmd


def _oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")


@pytest.mark.parametrize("make, code, start", [
    (lambda: RunError("training diverged at step 40: 10 non-finite losses in a row; lower optim.lr"), 1,
     "error: training diverged at step 40"),
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/runs/x"), 1, "error: [Errno 28] No space left"),
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/x"), 2, "error: [Errno 13] Permission denied"),
    (lambda: MemoryError(), 1, "error: out of memory (MemoryError); use smaller inputs"),
    (_oom, 1, "error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); use smaller inputs"),
    (lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 4 GB"),
     1, "error: out of memory ("),
    (lambda: KeyError("oops"), 1, "internal error: KeyError: 'oops' (a bug: run again with --debug"),
])
def test_every_failure_is_one_line_with_its_exit_code(make, code, start, monkeypatch, capsys):
    monkeypatch.delenv("SPARSEFOLD_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_models", _raise(make()))
    assert main(["models"]) == code
    assert one_line(capsys.readouterr().err).startswith(start)


def test_out_of_memory_in_train_names_the_batch_settings(monkeypatch, capsys, tmp_path):
    import sparsefold.trainers.loop as loop

    monkeypatch.setattr(loop, "train", _raise(MemoryError()))
    assert main(["train", f"trainer.output_dir={tmp_path}"]) == 1
    assert "lower data.batch_size or data.patch_size" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("how", ["flag", "after", "env"])
def test_debug_adds_the_traceback(how, monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_models", _raise(KeyError("oops")))
    if how == "env":
        monkeypatch.setenv("SPARSEFOLD_DEBUG", "1")
    assert main({"flag": ["--debug", "models"], "after": ["models", "--debug"], "env": ["models"]}[how]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'oops'" in err
    assert err.strip().splitlines()[-1].startswith("internal error: KeyError")


def test_unreadable_image_in_evaluate_is_one_line(images, capsys):
    bad = images / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    assert main(["evaluate", "cscnet", str(images), "--sigma", "25"]) == 2
    assert str(bad) in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------
# 9. silent wrong numbers


def test_negative_images_is_refused(images, capsys):
    assert main(["evaluate", "cscnet", str(images), "--images", "-1"]) == 2  # was: all but the last, rc 0
    assert one_line(capsys.readouterr().err).startswith("error: --images: must be >= 0")


@pytest.mark.parametrize("sigma", ["300", "-5", "nan"])
def test_evaluate_refuses_sigma_outside_0_255_like_denoise(images, capsys, sigma):
    """Was: ``evaluate --sigma 300`` (and NaN) scored with rc 0 while ``denoise`` refused it."""
    assert main(["evaluate", "cscnet", str(images), "--sigma", sigma]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: --sigma: must be in 0..255")


def test_json_output_is_strict_json(images, capsys):
    assert main(["evaluate", "cscnet", str(images), "--sigma", "0", "--images", "1"]) == 0
    out = strict_json(capsys.readouterr().out.strip().splitlines()[-1])  # was: "input_psnr": Infinity
    assert out["input_psnr"] is None and out["images"] == 1 and np.isfinite(out["psnr"])
    cli._print_json({"a": [float("nan"), {"b": float("-inf")}], "c": np.float32("nan"), "d": (1.5, np.int64(2)),
                     "p": Path("/x")})
    assert strict_json(capsys.readouterr().out) == {"a": [None, {"b": None}], "c": None, "d": [1.5, 2], "p": "/x"}


def test_duplicate_yaml_keys_are_a_config_error(tmp_path, capsys):
    from sparsefold.config import ConfigError, load_config

    cfg = tmp_path / "dup.yaml"
    cfg.write_text("model:\n  name: cscnet\n  depth: 4\ndata: {batch_size: 2}\nmodel:\n  depth: 8\n")
    with pytest.raises(ConfigError, match=rf"^model: given twice in {cfg} \(line 5\); keep one$"):
        load_config(cfg)  # was: the second model section silently replaced the first
    nested = tmp_path / "nested.yaml"
    nested.write_text("data: {batch_size: 2, batch_size: 3}\n")
    with pytest.raises(ConfigError, match=r"^data.batch_size: given twice"):
        load_config(nested)
    merged = tmp_path / "merge.yaml"  # YAML merge keys are not duplicates
    merged.write_text("base: &b {batch_size: 2, patch_size: 32}\ndata:\n  <<: *b\n  batch_size: 3\n")
    from sparsefold.config import read_config_file

    assert read_config_file(merged)["data"] == {"batch_size": 3, "patch_size": 32}


def _copy_bundled(dest: Path) -> Path:
    shutil.copytree(BUNDLED_CSCNET, dest)
    return dest


def test_non_finite_weights_are_refused(tmp_path, images, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = _copy_bundled(tmp_path / "diverged")
    weights = load_file(ckpt / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone().fill_(float("nan"))
    save_file(weights, ckpt / "model.safetensors")
    assert main(["evaluate", str(ckpt), str(images), "--sigma", "25"]) == 2  # was: rc 0, "psnr": NaN
    warning, line = capsys.readouterr().err.strip().splitlines()  # no manifest: warned, then refused
    assert "no manifest.json" in warning
    assert line.startswith(f"error: {ckpt / 'model.safetensors'}: non-finite (NaN/inf) values in 1 tensor(s)")


def test_missing_manifest_warns_except_for_bundled_models(tmp_path, capsys):
    from sparsefold.trainers.checkpoint import load_model

    load_model("cscnet")
    assert capsys.readouterr().err == ""
    ckpt = _copy_bundled(tmp_path / "copied")
    load_model(ckpt)  # older checkpoints have no manifest: loaded, but not silently
    assert f"{ckpt}: no manifest.json, so its files cannot be verified" in one_line(capsys.readouterr().err)

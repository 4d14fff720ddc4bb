"""The README's commands, run as a user runs them: in-process through ``sparsefold.cli.main`` (the same
parser, dispatch and error policy as the console script, without a fresh interpreter and torch import per
command), plus one subprocess smoke test of the installed ``sparsefold`` entry point."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sparsefold.cli import main, parser
from sparsefold.config import load_config, load_run_config
from sparsefold.trainers.storage import BUNDLED_DIR, bundled_models


@pytest.fixture
def run(capsys, monkeypatch):
    """``run(*args, cwd=..., check=True)``: ``sparsefold ARGS`` in this process, from ``cwd``; returns
    (returncode, stdout, stderr) like a finished subprocess."""
    def _run(*args: str, cwd: Path, check: bool = True) -> SimpleNamespace:
        monkeypatch.chdir(cwd)
        capsys.readouterr()  # drop what earlier calls printed
        code = main(list(args))
        out, err = capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"exit {code}\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return _run


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_installed_entry_point_smoke(tmp_path):
    """The console script itself (one subprocess each: it is the only test that pays for a fresh interpreter)."""
    exe = Path(sys.executable).with_name("sparsefold")
    ok = subprocess.run([str(exe), "models", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert any(b["name"] == "cscnet" for b in last_json(ok.stdout)["bundled"])
    bad = subprocess.run([str(exe), "train", "model.stride=99"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "model.stride" in bad.stderr and "Traceback" not in bad.stderr


def test_train_evaluate_denoise_from_the_cli(tmp_path, cache_dir, run):
    # The README's main command with a tiny step count (the packaged quickstart config).
    p = run("train", "trainer.max_steps=6", "trainer.val_every=6", "data.val=builtin:skimage", "data.val_images=1",
            f"data.cache_dir={cache_dir}", f"trainer.output_dir={tmp_path / 'runs'}", "trainer.run_name=cli",
            "data.num_workers=0", "wandb.mode=disabled", cwd=tmp_path)
    out = last_json(p.stdout)
    assert {"checkpoint", "steps", "seconds", "val_psnr"} <= set(out) and out["steps"] == 6
    ckpt = Path(out["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 52), dtype=np.uint8)).save(imgs / f"im{i}.png")
    ev = last_json(run("evaluate", str(ckpt), str(imgs), "--sigma", "25", cwd=tmp_path).stdout)
    assert {"psnr", "ssim", "images", "params", "sec_per_image"} <= set(ev) and ev["images"] == 2

    # Evaluating a run directory uses its latest checkpoint; the same noise gives the same score.
    ev2 = last_json(run("evaluate", out["run_dir"], str(imgs), cwd=tmp_path).stdout)
    assert ev2["psnr"] == ev["psnr"]

    run("denoise", str(ckpt), str(imgs), str(tmp_path / "den"), cwd=tmp_path)
    outs = sorted((tmp_path / "den").glob("*.png"))
    assert [o.name for o in outs] == ["im0.png", "im1.png"]
    assert Image.open(outs[0]).size == (52, 40)


def test_shards_command(tmp_path, run):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 24), i * 40, dtype=np.uint8)).save(imgs / f"a{i}.png")
    p = run("shards", str(imgs), str(tmp_path / "sh"), "--shard-size", "2", cwd=tmp_path)
    pattern = p.stdout.strip().splitlines()[-1]
    assert pattern.endswith("train-{000000..000002}.tar")
    assert json.loads((tmp_path / "sh" / "index.json").read_text())["total"] == 5


def test_models_json_and_bad_input(tmp_path, run):
    info = last_json(run("models", "--json", cwd=tmp_path).stdout)
    names = {a["name"]: a["params"] for a in info["architectures"]}
    assert names["cscnet"] == 63_700 and names["dncnn"] == 556_096
    bad = run("train", "model.stride=99", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "model.stride" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("evaluate", str(tmp_path / "nope"), str(tmp_path), cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_bundled_default_model_denoises(tmp_path, run):
    if not (BUNDLED_DIR / "cscnet" / "model.safetensors").is_file():
        pytest.fail("the bundled cscnet checkpoint is missing from sparsefold/bundled/cscnet")
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (33, 47), dtype=np.uint8)).save(img)
    run("denoise", str(img), str(tmp_path / "y.png"), cwd=tmp_path)  # no CHECKPOINT: the bundled cscnet
    assert Image.open(tmp_path / "y.png").size == (47, 33)
    listed = last_json(run("models", "--json", cwd=tmp_path).stdout)["bundled"]
    assert any(b["name"] == "cscnet" and b["sigma"] == 25 for b in listed)


# --- The bundled zoo (``sparsefold/bundled/<name>/``): one trained checkpoint per model family, listed by
# ``sparsefold models --json``, usable by name with ``sparsefold evaluate NAME DIR`` and
# ``sparsefold denoise NAME IN OUT`` straight after install, and actually trained: on a crop of a
# scikit-image photo (not in the training data) with the checkpoint's own seeded noise, each one beats the
# noisy input, and beats the same architecture at its initialization (an ISTA-initialized LISTA already
# gains ~5 dB here) on the same image and noise.

FAMILIES = ("cscnet", "lista", "ksvd", "lidia", "dcea", "dncnn")  # issue 3: one bundle name containing each
BUNDLED = [d.name for d in bundled_models()]
MARGIN_DB = 2.0  # over the noisy input; measured gains on this crop: 2.5 dB (lidia, 177 steps) to 8+ dB
OVER_INIT_DB = 1.0  # over the untrained model (e.g. lista: 25.5 dB at init on this crop)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("photo")
    Image.fromarray(data.camera()[96:192, 160:256]).save(d / "camera_crop.png")  # 96x96, gray, uint8
    return d


def test_every_family_is_bundled_and_listed(tmp_path, run):
    listed = {b["name"]: b for b in last_json(run("models", "--json", cwd=tmp_path).stdout)["bundled"]}
    assert sorted(listed) == BUNDLED
    for family in FAMILIES:
        assert any(family in name for name in listed), f"no bundled model name contains {family!r}: {sorted(listed)}"
    for name in BUNDLED:
        assert (BUNDLED_DIR / name / "TRAINING.md").is_file(), f"{name}: no TRAINING.md (how it was trained)"
        assert listed[name]["params"] > 0


def test_bundled_model_evaluates_and_denoises_by_name(bundled_name, photo_dir, tmp_path, run):
    name = bundled_name
    res = last_json(run("evaluate", name, str(photo_dir), cwd=tmp_path).stdout)  # the checkpoint's own noise
    assert res["images"] == 1 and np.isfinite(res["psnr"])
    listed = {b["name"]: b for b in last_json(run("models", "--json", cwd=tmp_path).stdout)["bundled"]}
    assert listed[name]["params"] == res["params"], "the count `models` lists (config.json) != the loaded model's"
    assert res["psnr"] >= res["input_psnr"] + MARGIN_DB, (name, res["psnr"], res["input_psnr"])
    assert res["psnr"] >= untrained_psnr(name, photo_dir) + OVER_INIT_DB, name
    args = ["--sigma", "25"] if res["noise"] == "gaussian" else []
    out = tmp_path / "out.png"
    run("denoise", name, str(photo_dir / "camera_crop.png"), str(out), *args, cwd=tmp_path)
    assert Image.open(out).size == (96, 96)


def untrained_psnr(name: str, photo_dir: Path) -> float:
    """PSNR of the bundle's architecture at initialization, with the noise ``sparsefold evaluate`` uses."""
    from sparsefold.config import NoiseConfig, dataclass_from_dict
    from sparsefold.models import MODELS, build_model
    from sparsefold.trainers.evaluate import evaluate_images
    from sparsefold.trainers.storage import read_config

    meta = read_config(BUNDLED_DIR / name)
    model = build_model(dataclass_from_dict(MODELS[meta["model"]["name"]].config, meta["model"], "model"))
    noise = dataclass_from_dict(NoiseConfig, meta["run"]["noise"], "noise")
    return evaluate_images(model, [photo_dir / "camera_crop.png"], noise, gray=True)["psnr"]


# --- The CLI explains itself (issue 16, item 6): --version, --print-config, help on every argument, progress
# bars on terminals only and never with --quiet.

def test_version_is_fast_and_imports_no_torch(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"sparsefold \d+\.\d+\S*( \(git [0-9a-f]{12}(, with uncommitted changes)?\))?", out), out
    snippet = ("import sys\nfrom sparsefold.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
               "    print(e.code, 'torch' in sys.modules)")
    fresh = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert fresh.stdout.split()[-2:] == ["0", "False"], fresh.stdout + fresh.stderr  # exit 0, no torch


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser ("") and each subcommand's, by name."""
    top = parser()
    subs = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1
    return {"": top, **subs[0].choices}


def test_every_argument_of_every_command_has_help():
    parsers = _parsers()
    assert {"shards", "train", "evaluate", "denoise", "models", "report"} <= set(parsers)
    bare = [f"{name or 'sparsefold'} {a.option_strings or a.dest}" for name, p in parsers.items()
            for a in p._actions if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not bare, f"arguments without help: {bare}"


def test_no_raw_rst_in_any_help_text():
    for name, p in _parsers().items():
        text = p.format_help()
        assert "``" not in text and not re.search(r":[a-z]+:`", text), f"raw RST in `sparsefold {name} --help`"


def test_print_config_prints_the_validated_config_and_runs_nothing(tmp_path, run):
    overrides = ["trainer.max_steps=7", "noise.sigma=15", "data.train=/nonexistent/shards-{0..9}.tar",
                 f"trainer.output_dir={tmp_path / 'runs'}"]
    p = run("train", "--print-config", *overrides, cwd=tmp_path)  # a missing data.train: no data is looked at
    assert p.stderr == ""
    assert list(tmp_path.iterdir()) == [], "print-config created something"
    (tmp_path / "printed.yaml").write_text(p.stdout)
    assert load_config(tmp_path / "printed.yaml") == load_run_config(None, overrides)
    assert load_config(tmp_path / "printed.yaml").trainer.max_steps == 7
    bad = run("train", "--print-config", "trainer.no_such_key=1", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "no_such_key" in bad.stderr


def test_progress_bars_on_a_terminal_only_and_never_with_quiet(tmp_path, run, monkeypatch):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 28), dtype=np.uint8)).save(imgs / f"b{i}.png")
    commands = {"shards": ["shards", str(imgs), str(tmp_path / "sh")],
                "evaluate": ["evaluate", "cscnet", str(imgs), "--sigma", "25"],
                "denoise": ["denoise", str(imgs), str(tmp_path / "den"), "--overwrite"]}
    plain = {k: run(*args, cwd=tmp_path) for k, args in commands.items()}  # stderr captured: not a terminal
    assert not any("%|" in p.stderr for p in plain.values())
    monkeypatch.setattr("sparsefold.cli._stderr_is_terminal", lambda: True)
    for name, args in commands.items():
        shown = run(*args, cwd=tmp_path)
        assert f"{name}:" in shown.stderr and "%|" in shown.stderr and "/3 " in shown.stderr, (name, shown.stderr)
        quiet = run(*args, "--quiet", cwd=tmp_path)
        assert "%|" not in quiet.stderr, (name, quiet.stderr)
        outs = [last_json(r.stdout) if name == "evaluate" else r.stdout for r in (plain[name], shown, quiet)]
        if name == "evaluate":  # the JSON last line is unchanged but for the timings
            outs = [{k: v for k, v in o.items() if "sec" not in k} for o in outs]
        assert outs[0] == outs[1] == outs[2], name

"""W&B: the mode resolution table (README, "W&B"), checkpoints as ``model`` artifacts and their ``wandb:``
references (the W&B public API stubbed at its boundary, ``wandb.Api``), and honest metrics (windowed loss,
training-only throughput, best-PSNR summary, per-image table, the validation set and code version recorded).
Nothing here reaches the network; no real key is used (conftest hides any)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import sparsefold.trainers.loop as loop
import sparsefold.trainers.provenance as provenance
import sparsefold.trainers.storage as storage
from sparsefold.cli import main
from sparsefold.config import load_config
from sparsefold.errors import ConfigError, InputError
from sparsefold.models import build_model
from sparsefold.trainers.checkpoint import load_initial_weights, load_model, save_checkpoint
from sparsefold.trainers.storage import best_val_psnr
from sparsefold.trainers.tracking import (
    NullTracker,
    best_psnr,
    media_key,
    mode_note,
    model_panels,
    wandb_mode,
)
from sparsefold.trainers.wandb_auth import api_key_available

# ------------------------------------------------------------------ item 1: the resolution table
KEYS = ("none", "env", "netrc")  # no key; WANDB_API_KEY; a netrc entry (what `wandb login` writes)
ENVS = (None, "online", "offline", "dryrun", "disabled")  # WANDB_MODE
NOT_DISABLED = (None, "online", "offline", "dryrun")
TABLE = [  # (wandb.mode, WANDB_MODE values, key sources, effective mode): the README's table, row by row
    ("auto", NOT_DISABLED, ("env", "netrc"), "online"),
    ("auto", NOT_DISABLED, ("none",), "offline"),
    ("auto", ("disabled",), KEYS, "disabled"),
    ("online", ENVS, ("env", "netrc"), "online"),
    ("online", ENVS, ("none",), "error"),
    ("offline", ENVS, KEYS, "offline"),
    ("disabled", ENVS, KEYS, "disabled"),
]
CASES = [(mode, env, key, eff) for mode, envs, keys, eff in TABLE for env in envs for key in keys]


def set_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: str, host: str = "api.wandb.ai") -> None:
    """Make a (dummy) key visible the way ``key`` says, and nothing else."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password dummy-not-a-key\n" if key == "netrc" else "")
    monkeypatch.setenv("NETRC", str(netrc))
    if key == "env":
        monkeypatch.setenv("WANDB_API_KEY", "dummy-not-a-key")


def test_the_table_covers_every_combination_once():
    assert sorted((m, str(e), k) for m, e, k, _ in CASES) == sorted(
        (m, str(e), k) for m, e, k in itertools.product(("auto", "online", "offline", "disabled"), ENVS, KEYS))


@pytest.mark.parametrize(("mode", "env", "key", "effective"), CASES)
def test_wandb_mode_resolution_table(mode, env, key, effective, monkeypatch, tmp_path):
    set_key(monkeypatch, tmp_path, key)
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    if effective == "error":
        with pytest.raises(ConfigError, match=r"^wandb.mode: online needs a W&B API key") as e:
            wandb_mode(mode)
        assert "\n" not in str(e.value)
    else:
        assert wandb_mode(mode) == effective


def test_the_readme_has_the_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(auto|online|offline|disabled)`[^|]*\|[^|]*\|\s*(yes|no|either)\s*\|\s*([^|]+?)\s*\|$",
                      readme, re.M)
    effective = {"online": "online", "offline": "offline", "disabled": "disabled"}
    assert [(m, k, effective.get(e, "error")) for m, k, e in rows] == [
        ("auto", "yes", "online"), ("auto", "no", "offline"), ("auto", "either", "disabled"),
        ("online", "yes", "online"), ("online", "no", "error"), ("offline", "either", "offline"),
        ("disabled", "either", "disabled")]


def test_the_override_of_wandb_mode_offline_is_said(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert "wandb.mode=offline" in mode_note("auto", "online")
    assert mode_note("online", "online") is None and mode_note("auto", "offline") is None
    monkeypatch.delenv("WANDB_MODE")
    assert mode_note("auto", "online") is None


def test_the_key_is_looked_up_for_the_configured_host(monkeypatch, tmp_path):
    set_key(monkeypatch, tmp_path, "netrc", host="wandb.example.org")
    assert not api_key_available()  # an entry for another host is not W&B cloud's key
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert api_key_available()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    assert not api_key_available()


def test_the_cluster_manifests_do_not_force_offline():
    cluster = Path(__file__).resolve().parents[1] / "cluster"
    for name in ("runtime_env.yaml", "rayjob.yaml"):
        assert not re.search(r"^\s*WANDB_MODE\s*:", (cluster / name).read_text(), re.M), name


# ------------------------------------------------------------------ item 2: wandb: references
TINY = ["model.name=dncnn", "model.depth=3", "model.features=8", "wandb.mode=disabled"]


@pytest.fixture
def released(tmp_path) -> Path:
    """A checkpoint, as an artifact version would hold it."""
    cfg = load_config(None, TINY)
    return save_checkpoint(tmp_path / "released", build_model(cfg.model), cfg, {"step": 7})


@pytest.fixture
def fake_api(monkeypatch, tmp_path, released):
    """``wandb.Api`` stubbed: ``artifact(name, type)`` is recorded and downloads ``released``."""
    import wandb

    calls: list[tuple[str, str | None]] = []

    class Artifact:
        version = "v3"

        def download(self, root: str) -> str:
            shutil.copytree(released, root, dirs_exist_ok=True)
            return root

    class Api:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def artifact(self, name: str, type: str | None = None) -> Artifact:
            calls.append((name, type))
            if "missing" in name:
                raise ValueError("artifact 'missing' not found in 'me/proj'\nmore detail")
            return Artifact()

    monkeypatch.setattr(wandb, "Api", Api)
    monkeypatch.setattr(storage, "api_key_available", lambda: True)
    monkeypatch.setenv("SPARSEFOLD_CACHE", str(tmp_path / "cache"))
    return calls


def test_a_wandb_reference_resolves_into_the_cache(fake_api, tmp_path):
    model, meta = load_model("wandb:me/proj/model-run-1:best")
    assert fake_api == [("me/proj/model-run-1:best", "model")]
    assert Path(meta["path"]) == tmp_path / "cache" / "wandb" / "me" / "proj" / "model-run-1" / "v3"
    assert meta["model"]["name"] == "dncnn" and meta["state"]["step"] == 7
    assert storage.resolve_checkpoint("wandb:me/proj/model-run-1") == Path(meta["path"])  # alias: latest
    assert fake_api[-1] == ("me/proj/model-run-1:latest", "model")
    fresh = build_model(load_config(None, TINY).model)
    assert load_initial_weights(fresh, "wandb:me/proj/model-run-1:v3") == Path(meta["path"])  # trainer.init_from
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_wandb_reference_errors_are_one_line(fake_api, monkeypatch, capsys, tmp_path):
    with pytest.raises(InputError, match="cannot fetch the W&B artifact .artifact 'missing' not found") as e:
        storage.resolve_checkpoint("wandb:me/proj/missing:best")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="use wandb:ENTITY/PROJECT/NAME:ALIAS"):
        storage.resolve_checkpoint("wandb:proj-only:best")
    monkeypatch.setattr(storage, "api_key_available", lambda: False)  # offline: no key, no API call
    n = len(fake_api)
    assert main(["evaluate", "wandb:me/proj/model-run-1:best", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no W&B API key" in err[0] and len(fake_api) == n


# ------------------------------------------------------------------ items 2 and 3: an offline run, spied on
@pytest.fixture
def wandb_spy(monkeypatch, tmp_path):
    """Real offline W&B runs, with what the tracker hands to wandb recorded."""
    import wandb
    from wandb.sdk.wandb_run import Run

    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))  # artifact staging out of ~
    seen: dict[str, list] = {"init": [], "artifacts": [], "log": [], "define_metric": []}
    init, log_artifact, log, define_metric = wandb.init, Run.log_artifact, Run.log, Run.define_metric

    def spy_init(*args, **kwargs):
        seen["init"].append(kwargs)
        return init(*args, **kwargs)

    def spy_log_artifact(self, artifact, *args, **kwargs):
        seen["artifacts"].append((artifact.name, artifact.type, sorted(kwargs.get("aliases") or []),
                                  dict(artifact.metadata), sorted(artifact.manifest.entries)))
        return log_artifact(self, artifact, *args, **kwargs)

    def spy_log(self, data, *args, **kwargs):
        seen["log"].append((kwargs.get("step"), dict(data)))
        return log(self, data, *args, **kwargs)

    def spy_define_metric(self, name, *args, **kwargs):
        seen["define_metric"].append((name, kwargs.get("summary")))
        return define_metric(self, name, *args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy_init)
    for name, fn in (("log_artifact", spy_log_artifact), ("log", spy_log), ("define_metric", spy_define_metric)):
        monkeypatch.setattr(Run, name, fn)
    return seen


def small_images(folder: Path, n: int = 2) -> Path:
    """``n`` seeded 48×48 grey PNGs: validation in milliseconds."""
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(48, 48, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"im{i}.png")
    return folder


def test_an_offline_run_logs_checkpoints_as_artifacts(tiny_overrides, wandb_spy, tmp_path):
    out = loop.train(load_config(None, tiny_overrides + [
        f"data.val={small_images(tmp_path / 'val')}", "wandb.mode=offline", "trainer.max_steps=4",
        "trainer.val_every=2", "trainer.ckpt_every=2", "trainer.log_every=2", "trainer.run_name=art"]))
    arts = [a for a in wandb_spy["artifacts"] if a[1] == "model"]  # W&B logs each Table as an artifact too
    assert [a[2] for a in arts][0] == ["best", "latest", "step-2"] and len(arts) == 2
    assert "step-4" in arts[1][2] and "latest" in arts[1][2]
    psnrs = [a[3]["metrics"]["val/psnr"] for a in arts]
    assert ("best" in arts[1][2]) == (psnrs[1] > psnrs[0])
    for name, kind, _, meta, files in arts:
        assert name == "model-art" and kind == "model"
        assert {"model.safetensors", "config.json", "state.json", "manifest.json"} <= set(files)
        assert meta["config"]["model"]["name"] == "cscnet" and meta["config"]["provenance"]["val_set"]["count"] == 2
    (record,) = Path(out["run_dir"]).glob("wandb/offline-run-*/run-art.wandb")
    assert b"model-art" in record.read_bytes()  # the offline run records it, for `wandb sync`
    # item 3: best-PSNR summary, per-image table, no | in media keys, provenance in the config
    assert ("val/psnr", "max") in wandb_spy["define_metric"]
    tables = [(s, d["val/per_image"]) for s, d in wandb_spy["log"] if "val/per_image" in d]
    assert [s for s, _ in tables] == [2, 4] and all(len(t.data) == 2 for _, t in tables)
    assert not [k for _, d in wandb_spy["log"] for k in d if "|" in k]
    (init,) = wandb_spy["init"]
    prov = init["config"]["provenance"]
    assert prov["val_set"]["files"] == ["im0.png", "im1.png"] and prov["val_set"]["dir"] == str((tmp_path / "val").resolve())
    assert prov["git_commit"]
    assert json.loads((Path(out["run_dir"]) / "provenance.json").read_text()) == prov
    stored = json.loads((Path(out["checkpoint"]) / "config.json").read_text())["provenance"]
    assert stored["sparsefold_version"] == prov["sparsefold_version"] and stored["val_set"] == prov["val_set"]


# ------------------------------------------------------------------ item 3: honest metrics
class Recorder(NullTracker):
    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def log(self, metrics, step):
        self.rows.setdefault(step, {}).update(metrics)


def test_train_loss_is_the_mean_over_the_logging_window(tiny_overrides, monkeypatch, one_thread):
    losses = {}
    for every in (1, 2):
        rec = Recorder()
        monkeypatch.setattr(loop, "make_tracker", lambda *a, **k: rec)
        loop.train(load_config(None, tiny_overrides + ["trainer.max_steps=4", f"trainer.log_every={every}",
                                                       f"trainer.run_name=w{every}", "trainer.val_every=100"]))
        losses[every] = {s: m["train/loss"] for s, m in rec.rows.items() if "train/loss" in m}
    one, two = losses[1], losses[2]
    assert sorted(two) == [2, 4]
    for step in (2, 4):
        assert two[step] == pytest.approx((one[step - 1] + one[step]) / 2, rel=1e-5)
    assert two[2] != pytest.approx(one[2], rel=1e-6)  # not the last batch's


def test_loss_window_leaves_out_nonfinite_steps():
    w = loop.LossWindow()
    for v in (1.0, 3.0):
        w.add(torch.tensor(v))
    assert w.mean() == 2.0 and w.n == 0
    assert w.mean() != w.mean()  # an empty window: NaN


def test_samples_per_s_excludes_paused_time():
    clock = loop.Clock()
    with clock.paused():
        time.sleep(0.05)
    assert clock.window_paused >= 0.05
    clock.window_t, clock.window_paused, clock.window_n = time.perf_counter() - 2.0, 1.0, 100
    assert 90 < clock.samples_per_s() <= 100.5  # 100 samples over 1 s of training, not 2 s of wall time
    assert clock.window_paused == 0.0 and clock.window_n == 0


def test_file_set_names_the_images_actually_used(tmp_path):
    for sub, data in (("a", b"1"), ("b", b"2")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.png").write_bytes(data)
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"]
    s = provenance.file_set(files, "a|builtin:skimage")
    assert s["dir"] == str(tmp_path.resolve()) and s["files"] == ["a/x.png", "b/x.png"] and s["count"] == 2
    (tmp_path / "b" / "x.png").write_bytes(b"3")
    assert provenance.file_set(files, "a|builtin:skimage")["sha256"] != s["sha256"]
    assert provenance.file_set([], "v")["count"] == 0


def test_git_commit_in_a_checkout_and_unknown_outside(monkeypatch, tmp_path):
    provenance.git_commit.cache_clear()
    commit, _ = provenance.git_commit()
    if shutil.which("git") and (Path(provenance.__file__).resolve().parents[1] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
    provenance.git_commit.cache_clear()
    monkeypatch.setattr(provenance, "SOURCE", tmp_path)
    assert provenance.git_commit() == ("unknown", False)
    provenance.git_commit.cache_clear()
    assert provenance.code_version()["sparsefold_version"]


def test_media_keys_have_no_pipe():
    first = (torch.zeros(1, 8, 8),) * 3
    assert all("|" not in k for k in model_panels(torch.nn.Identity(), first))
    assert set(model_panels(torch.nn.Identity(), first, restoration=True)) == {"val/measurement-reconstruction-clean"}
    assert media_key("val/noisy|denoised|clean") == "val/noisy-denoised-clean"


def test_an_offline_resumed_run_keeps_best_for_a_better_checkpoint(tiny_overrides, wandb_spy, tmp_path):
    """Offline, W&B hands a resumed run no summary: the ``best`` alias must still beat every earlier checkpoint
    of the run (its own state.json metrics). Planted: step 2 recorded 99 dB, so the resumed step 6 is not best."""
    over = tiny_overrides + [f"data.val={small_images(tmp_path / 'val')}", "wandb.mode=offline", "trainer.val_every=2",
                             "trainer.ckpt_every=2", "trainer.log_every=2", "trainer.run_name=res"]
    out = loop.train(load_config(None, over + ["trainer.max_steps=4"]))
    state = Path(out["run_dir"]) / "step_0000002" / "state.json"
    planted = json.loads(state.read_text())
    planted["metrics"]["val/psnr"] = 99.0
    state.write_text(json.dumps(planted))
    assert best_val_psnr(Path(out["run_dir"])) == 99.0
    wandb_spy["artifacts"].clear()
    loop.train(load_config(None, over + ["trainer.max_steps=6"]))
    (art,) = [a for a in wandb_spy["artifacts"] if a[1] == "model"]
    assert "step-6" in art[2] and "best" not in art[2], art[2]


def test_log_model_false_keeps_checkpoints_out_of_wandb(tiny_overrides, wandb_spy, tmp_path):
    loop.train(load_config(None, tiny_overrides + [
        f"data.val={small_images(tmp_path / 'val')}", "wandb.mode=offline", "trainer.max_steps=2",
        "trainer.val_every=2", "trainer.ckpt_every=2", "trainer.run_name=nomodel", "wandb.log_model=false"]))
    assert not [a for a in wandb_spy["artifacts"] if a[1] == "model"]
    assert any("val/psnr" in data for _, data in wandb_spy["log"])  # the rest is logged as before


def test_best_psnr_of_a_resumed_summary():
    assert best_psnr({"val/psnr": {"max": 30.5}}) == 30.5 and best_psnr({"val/psnr": 29.0}) == 29.0
    assert best_psnr({}) == float("-inf") and best_psnr(None) == float("-inf")

"""A run's identity (its name and directory) is computed once, from the canonical config, and is the same on
the Ray driver and on every worker; a Ray run and the plain run of the same config never share a directory.

Issue 13, item 4: with a relative data path, Ray's storage folder was named from the driver's (relative)
config and the run's config.json / W&B files from the workers' (absolute) one, so the Ray run's checkpoints
landed in the plain run's folder.
"""

from __future__ import annotations

import json
import queue
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sparsefold.config import RunConfig, load_config
from sparsefold.trainers.storage import run_dir_of


def write_val(folder: Path, n: int = 2) -> Path:
    """``n`` small gray PNGs (smooth gradients with texture) as a validation folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        ramp = np.add.outer(np.arange(64), np.arange(64)) * 2 + rng.integers(0, 40, (64, 64))
        Image.fromarray(np.clip(ramp + 20 * i, 0, 255).astype(np.uint8)).save(folder / f"v{i}.png")
    return folder


def test_same_data_named_relatively_or_absolutely_is_the_same_run(tiny_overrides, tmp_path, monkeypatch):
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    write_val(repo / "val")
    elsewhere.mkdir()
    monkeypatch.chdir(repo)
    relative = run_dir_of(load_config(None, tiny_overrides + ["data.val=val|builtin:skimage"]))
    monkeypatch.chdir(elsewhere)
    for spec in (f"{repo}/val|builtin:skimage", "../repo/val | builtin:skimage"):
        assert run_dir_of(load_config(None, tiny_overrides + [f"data.val={spec}"])) == relative, spec


def test_a_ray_run_never_shares_the_plain_runs_directory(tiny_overrides):
    plain = run_dir_of(load_config(None, tiny_overrides))
    ray = run_dir_of(load_config(None, tiny_overrides + ["ray.enabled=true"]))
    assert ray.parent == plain.parent and ray != plain
    assert ray.name.startswith("cscnet-ray-") and not plain.name.startswith("cscnet-ray-")


def test_ray_driver_and_workers_agree_on_the_run(tiny_overrides, tmp_path, monkeypatch):
    """The driver's Ray storage folder is the directory a worker derives from the config it is handed
    (``RunConfig.from_dict`` as in ``train_loop_per_worker``). Ray itself is replaced by a recorder."""
    pytest.importorskip("ray")
    import ray
    import ray.train.torch
    import ray.util.queue

    from sparsefold.trainers import ray_train

    seen: dict = {}

    class Recorder:  # stands in for TorchTrainer: what the driver hands Ray and the workers
        def __init__(self, fn, *, train_loop_config, run_config, **_):
            seen.update(run=train_loop_config["run"], storage=run_config.storage_path, name=run_config.name)

        def fit(self):
            return SimpleNamespace(return_value={}, checkpoint=None, path=f"{seen['storage']}/{seen['name']}")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Recorder)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util.queue, "Queue", lambda **_: queue.Queue())  # the console relay, without Ray
    monkeypatch.chdir(tmp_path)
    write_val(tmp_path / "val")
    over = [o for o in tiny_overrides if not o.startswith("trainer.output_dir=")]
    ray_train.fit(load_config(None, over + ["data.val=val", "trainer.output_dir=runs", "ray.enabled=true"]))
    worker = RunConfig.from_dict(seen["run"])
    assert run_dir_of(worker) == Path(seen["storage"]) / seen["name"]
    assert worker.trainer.run_name == seen["name"] and worker.data.val == str(tmp_path / "val")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.ray
@pytest.mark.slow
def test_plain_and_ray_runs_of_a_relative_path_config_keep_to_their_own_directories(
        tiny_overrides, tmp_path, monkeypatch, capsys, ray_cluster):
    """The issue's acceptance test, through the CLI: `sparsefold train` plain, then with ray.enabled=true,
    on a config with relative data and output paths; then `sparsefold evaluate <run_dir>` of the Ray run."""
    from sparsefold.cli import main

    monkeypatch.chdir(tmp_path)
    write_val(tmp_path / "val")
    over = [o for o in tiny_overrides if not o.startswith("trainer.output_dir=")] + [
        "data.val=val", "trainer.output_dir=runs", "trainer.max_steps=2", "trainer.val_every=2",
        "data.val_images=1", "data.patch_size=32", "data.batch_size=2", "wandb.mode=disabled"]
    assert main(["train", *over]) == 0
    plain = _last_json(capsys)
    assert main(["train", *over, "ray.enabled=true", "ray.cpus_per_worker=0.9"]) == 0
    out = _last_json(capsys)

    runs = tmp_path / "runs"
    plain_dir, ray_dir = Path(plain["run_dir"]), Path(out["run_dir"])
    assert {p.name for p in runs.iterdir()} == {plain_dir.name, ray_dir.name} and plain_dir != ray_dir
    # one layout for both paths: <run>/step_*, each run in its own directory
    assert Path(plain["checkpoint"]).parent == plain_dir and Path(out["checkpoint"]).parent == ray_dir
    assert not (plain_dir / "checkpoints").exists() and not (ray_dir / "checkpoints").exists()
    for run_dir, use_ray in ((plain_dir, False), (ray_dir, True)):
        stored = json.loads((run_dir / "config.json").read_text())
        assert stored["ray"]["enabled"] is use_ray
    assert json.loads((ray_dir / "config.json").read_text())["trainer"]["run_name"] == ray_dir.name

    assert main(["evaluate", str(ray_dir), "val", "--sigma", "25"]) == 0
    scored = _last_json(capsys)
    assert Path(scored["checkpoint"]).parent == ray_dir and scored["images"] == 2


def test_a_workers_expected_failure_is_one_line_on_the_driver(tiny_overrides, tmp_path, monkeypatch, capsys):
    """A "training diverged" RunError raised in a Ray worker reaches the driver wrapped in Ray's
    WorkerGroupError (a multi-line report); the CLI prints the worker's one line and exits 1."""
    pytest.importorskip("ray")
    import ray
    import ray.train
    import ray.train.torch
    import ray.util.queue

    from sparsefold.cli import main
    from sparsefold.errors import RunError

    diverged = "training diverged: 6 consecutive non-finite steps at step 7; lower optim.lr"

    class Failing:  # stands in for TorchTrainer: rank 1 raised RunError
        def __init__(self, *_, **__):
            pass

        def fit(self):
            raise ray.train.WorkerGroupError("rank 1:\nTraceback ...\nRunError: " + diverged,
                                             {1: RunError(diverged)})

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Failing)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util.queue, "Queue", lambda **_: queue.Queue())  # the console relay, without Ray
    monkeypatch.chdir(tmp_path)
    write_val(tmp_path / "val")
    assert main(["train", *tiny_overrides, "data.val=val", "ray.enabled=true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {diverged}" and not any("Traceback" in ln for ln in err)

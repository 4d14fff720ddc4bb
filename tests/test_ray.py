"""Ray Train DDP: the same loop on 2 workers (gloo), one report per validation with a checkpoint.

The session's one local Ray cluster (conftest.py); each `fit` costs ~30-50 s on 2 cores, so the DDP run checked
here is conftest's ``ddp_run``, shared with the fault-tolerance test, and every model trains in ONE TorchTrainer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsefold.config import load_config

pytestmark = pytest.mark.ray


def test_two_worker_ddp(ddp_run, tmp_path_factory):
    """conftest's session DDP run (2 workers, 16 steps, validations at 8 and 16, checkpoints every 4)."""
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.storage import latest_checkpoint

    out = ddp_run.out
    assert out["steps"] == 16 and out["resumed_from_step"] is None
    assert out["samples"] == 16 * 4 * 2  # both ranks' batches count
    assert out["val_psnr"] > 20.0
    ckpt = Path(out["checkpoint"])
    assert ckpt.is_dir() and ckpt.is_relative_to(tmp_path_factory.getbasetemp())
    assert sorted(p.name for p in ckpt.parent.glob("step_*")) == [f"step_{s:07d}" for s in (4, 8, 12, 16)]
    assert latest_checkpoint(ckpt.parent) == ckpt  # the newest valid one: the final step's
    model, meta = load_model(ckpt)
    assert meta["state"]["step"] == 16 and meta["state"]["metrics"]["val/psnr"] == out["val_psnr"]


TASK_RUNS = [["task.kind=inpaint"], ["task.kind=deblur", "task.kernel_size=7"], ["task.kind=sr", "task.factor=2"],
             ["task.kind=csmri", "task.rate=0.33"]]


def _train_each(config: dict) -> list[dict]:
    """Worker loop of the zoo test: the package's own per-worker loop, once per run config. The runs share
    one Ray run (one start-up), so a run must not resume from the previous model's checkpoint in it."""
    from sparsefold.trainers import ray_train

    ray_train.resume_checkpoint = lambda ctx, restored: None
    return [ray_train.train_loop_per_worker({"run": run}) for run in config["runs"]]


def test_every_model_through_ray_ddp(ray_cluster, tiny_overrides, tmp_path):
    """Every registered model trains 2 steps under 2-worker DDP (gloo) in ONE TorchTrainer (one ~30 s start-up)."""
    import importlib.util
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from sparsefold.models import MODELS

    spec = importlib.util.spec_from_file_location("_zoo_models", Path(__file__).with_name("test_models.py"))
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)  # SMALL configs and run_overrides() of the registry contract tests
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runs = []
    for i, name in enumerate(sorted(MODELS)):  # distinct step counts: checkpoint names step_<n> stay unique
        over = [o for o in tiny_overrides if not o.startswith("model.")] + zoo.run_overrides(name) + [
            "ray.enabled=true", "ray.workers=2", f"trainer.max_steps={2 + i}", f"trainer.val_every={2 + i}",
            "data.val_images=1", "data.patch_size=32", "data.batch_size=2", f"trainer.run_name=ray-{name}",
        ]
        runs.append(load_config(None, over).to_dict())
    for j, task in enumerate(TASK_RUNS):  # issue 18: each restoration task, its operator carried by the batches
        over = [o for o in tiny_overrides if not o.startswith("model.")] + zoo.run_overrides("pgnet") + task + [
            "ray.enabled=true", "ray.workers=2", f"trainer.max_steps={2 + len(MODELS) + j}", "data.val_images=1",
            f"trainer.val_every={2 + len(MODELS) + j}", "data.patch_size=32", "data.batch_size=2",
            f"trainer.run_name=ray-pgnet-{j}"]
        runs.append(load_config(None, over).to_dict())
    trainer = TorchTrainer(
        _train_each, train_loop_config={"runs": runs},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.9}),
        run_config=ray.train.RunConfig(name="zoo", storage_path=str(tmp_path / "ray")),
    )
    result = trainer.fit()
    outs = result.return_value
    assert [o["steps"] for o in outs] == [2 + i for i in range(len(MODELS) + len(TASK_RUNS))]
    assert all(o["nonfinite_steps"] == 0 and o["val_psnr"] > 5 for o in outs), outs


def test_the_terminal_of_a_ray_run_is_a_plain_runs(ddp_run, tmp_path):
    """Rank 0's bar and [sparsefold] lines reach the driver once each (trainers/console.py), nothing of Ray's
    worker output does (log_to_driver=False; the session cluster starts with trainers/ray_env.py's settings),
    and Ray's session logs can be kept next to the run (what a run that starts its own Ray does)."""
    from sparsefold.trainers.ray_train import keep_ray_logs

    err = ddp_run.stderr
    for step in (8, 16):
        assert err.count(f"[sparsefold] step {step}: val psnr") == 1, err
    assert "16/16" in err  # the progress bar, drawn on the driver
    for noise in ("(RayTrainWorker", "TrainingReport", "Checkpoint successfully created", "\x1b[36m"):
        assert noise not in err, noise
    keep_ray_logs(tmp_path)
    logs = list((tmp_path / "ray_logs").glob("session_*/**/*"))
    assert any(p.name.startswith("ray-train-app-worker") for p in logs), sorted(p.name for p in logs)

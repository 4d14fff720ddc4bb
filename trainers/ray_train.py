"""Ray Train (V2) path: a ``TorchTrainer`` whose per-worker function runs the SAME loop as the plain
path (:func:`sparsefold.trainers.loop.train`), with DDP (gloo on CPU, NCCL on GPU), one
``ray.train.report`` per validation with rank 0's checkpoint attached, and resume from
``ray.train.get_checkpoint()``. See ../shared/notes/ray-wds-wandb-2.60.md for the 2.60 pitfalls handled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sparsefold.config import RunConfig
from sparsefold.runtime import distributed_backend
from sparsefold.trainers.loop import Dist, run_dir_of, train


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs inside every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = RunConfig.from_dict(config["run"])
    ctx = ray.train.get_context()
    resume_from = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # restart after a failure, or the same run name started again
        resume_from = Path(ckpt.to_directory())

    def report(metrics: dict, path: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    dist = Dist(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        wrap=lambda m: ray.train.torch.prepare_model(m, parallel_strategy="ddp"),
        report=report,
        resume_from=resume_from,
    )
    return train(cfg, dist)


def fit(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` with Ray Train on ``trainer.workers`` workers; returns rank 0's summary plus the
    checkpoint Ray persisted under ``<output_dir>/<run_name>/``."""
    # Reports are polled by the controller; the default 2 s interval costs ~2 s per report on small
    # machines (notes §1.3). Must be set before Ray starts: it is propagated to controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.trainer
    run_dir = run_dir_of(cfg)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict()},
        torch_config=TorchConfig(backend=distributed_backend(t.use_gpu)),
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints or None),
        ),
    )
    result = trainer.fit()
    out = dict(result.return_value or {})
    if result.checkpoint is not None:
        out["checkpoint"] = result.checkpoint.path
    out["ray_run_dir"] = result.path
    return out

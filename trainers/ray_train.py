"""Ray Train (V2) path: a ``TorchTrainer`` whose per-worker function runs the SAME loop as the plain
path (:func:`sparsefold.trainers.loop.train`), with DDP (gloo on CPU, NCCL on GPU), one
``ray.train.report`` per validation/checkpoint with rank 0's checkpoint attached (stored as
``<run storage>/step_<step>/``), and resume from the LATEST valid checkpoint in the run's storage.

Which checkpoint a restart resumes from: after a worker failure Ray 2.60 hands ``get_checkpoint()`` the
last checkpoint its controller *registered*, which can be a report or two older than what is on disk.
Rank 0 therefore scans the run's storage for the valid checkpoint (SHA-256 manifest) with
the highest step and broadcasts its name to the other ranks. Scanning was chosen over a ``latest``
pointer file: the checkpoints are their own source of truth, a partial copy is rejected by its manifest,
there is no second file to keep consistent on object stores without atomic rename, and it works
unchanged after the driver itself was killed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsefold.config import RunConfig, is_url
from sparsefold.errors import InputError, RunError, SparsefoldError
from sparsefold.runtime import canonical_paths, distributed_backend, upload_tree, url_join
from sparsefold.trainers.checkpoint import check_resume_config, latest_checkpoint
from sparsefold.trainers.loop import Dist, run_dir_of, train
from sparsefold.trainers.runlock import run_lock


def resume_checkpoint(ctx: Any, restored: Any) -> Path | None:
    """Local directory of the checkpoint every rank resumes from (see the module docstring), or None.

    ``restored`` is ``ray.train.get_checkpoint()``; it is only used when storage holds no valid one."""
    import pyarrow.fs as pafs
    import ray.train
    import torch.distributed as td

    from sparsefold.trainers.checkpoint import latest_in_storage

    storage = ctx.get_storage()
    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    rank, local = ctx.get_world_rank(), isinstance(storage.storage_filesystem, pafs.LocalFileSystem)
    best = latest_in_storage(fs, root) if rank == 0 else None
    chosen = [best.name if best is not None else None]
    if ctx.get_world_size() > 1 and td.is_initialized():
        td.broadcast_object_list(chosen, src=0)  # every rank resumes from the same checkpoint
    name = chosen[0]
    if rank == 0 and restored is not None and name is not None and Path(restored.path).name != name:
        print(f"[sparsefold] Ray restored {Path(restored.path).name}; storage holds a newer valid checkpoint "
              f"{name}: resuming from that", file=sys.stderr, flush=True)
    if name is None:
        return Path(restored.to_directory()) if restored is not None else None
    if best is not None or local:
        return best if best is not None else Path(root) / name
    return Path(ray.train.Checkpoint(f"{root}/{name}", filesystem=fs).to_directory())


def canonical_run(cfg: RunConfig) -> RunConfig:
    """The run's identity, computed ONCE, on the driver: :func:`~sparsefold.runtime.canonical_paths` (local
    paths absolute: workers run in other directories) with ``trainer.run_name`` set to the name that form
    implies. Workers get this config as is and never recompute the name, so Ray's storage folder, the
    run's config.json and W&B files and the final JSON's ``checkpoint`` and ``run_dir`` are one run."""
    canon = canonical_paths(cfg)
    return replace(canon, trainer=replace(canon.trainer, run_name=run_dir_of(canon).name))


def preflight(cfg: RunConfig) -> None:
    """Data checks on the driver, before Ray starts: a missing data path, an empty shard list or fewer
    shards than ranks × loader workers fail here with one line instead of inside every worker."""
    from sparsefold.datasets import check_shard_count, train_urls, val_files

    urls = train_urls(cfg.data)
    check_shard_count(urls, cfg.trainer.workers, cfg.data.num_workers, cfg.data.resampled)
    val_files(cfg.data)


def announce_resume(cfg: RunConfig, storage: str) -> Path | None:
    """Driver side: the latest valid checkpoint of this run in ``storage`` (local directory or URI), said
    on stderr, never silently resumed; refused when ``trainer.resume=false``."""
    import pyarrow.fs as pafs

    from sparsefold.trainers.checkpoint import checkpoint_step, latest_in_storage

    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    latest = latest_in_storage(fs, root)
    if latest is None:
        return None
    if not cfg.trainer.resume:
        raise FileExistsError(f"{storage} already holds checkpoints; pick another trainer.run_name or "
                              "set trainer.resume=true to continue it")
    print(f"[sparsefold] resuming run {Path(root).name} from step {checkpoint_step(latest)} ({latest})",
          file=sys.stderr, flush=True)
    return latest


def storage_of(cfg: RunConfig) -> tuple[str, str, str]:
    """(Ray's storage_path, run name, the run's root in storage) for ``trainer.output_dir``: an absolute
    local/NFS path (resolved here, on the driver: workers run in other directories), or a URL that
    pyarrow opens (s3://, gs://, file://), which Ray Train writes to itself -- no shared filesystem."""
    run_dir, out = run_dir_of(cfg), cfg.trainer.output_dir
    if is_url(out):
        return out.rstrip("/"), run_dir.name, url_join(out, run_dir.name)
    return str(run_dir.parent), run_dir.name, str(run_dir)


def latest_step_uri(run_root: str) -> str | None:
    """URI of the ``step_*`` checkpoint with the highest step under a URL run root (listing only)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run_root)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    steps = [i.base_name for i in infos if i.type == pafs.FileType.Directory
             and i.base_name.startswith("step_") and ".tmp-" not in i.base_name]
    return url_join(run_root, max(steps, key=lambda n: int(n.split("_")[1]))) if steps else None


def publish_run_files(cfg: RunConfig) -> str:
    """Rank 0, URL output_dir: copy the run's node-local files (config.json, W&B offline logs) next to
    Ray's checkpoints in ``<output_dir>/<run>/``. A failed upload is reported, never fatal (the
    checkpoints are already in storage)."""
    _, _, root = storage_of(cfg)
    try:
        n = upload_tree(run_dir_of(cfg), root)
        print(f"[sparsefold] uploaded {n} run files to {root}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"[sparsefold] warning: could not upload the run files to {root}: {e}", file=sys.stderr, flush=True)
    return root


def worker_failure(error: Exception) -> Exception:
    """The expected failure (:class:`~sparsefold.errors.SparsefoldError`, e.g. "training diverged") that a
    worker raised, as a new one-line error of the same class, unwrapped from Ray's ``WorkerGroupError``
    (which holds each rank's exception, possibly wrapped in a ``RayTaskError``); else ``error`` itself."""
    for failure in getattr(error, "worker_failures", {}).values():
        chain, e = [], failure
        while e is not None and len(chain) < 20:  # RayTaskError.cause / __cause__, outermost first
            chain.append(e)
            e = getattr(e, "cause", None) or e.__cause__
        ours = [e for e in chain if isinstance(e, SparsefoldError)]
        if ours:  # the innermost: the exception as raised, not Ray's wrapper of it
            lines = [ln for ln in str(ours[-1]).splitlines() if ln.strip()]
            expected = InputError if ours[-1].exit_code == InputError.exit_code else RunError
            return expected(lines[0] if lines else type(ours[-1]).__name__)
    return error


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs inside every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = RunConfig.from_dict(config["run"])
    ctx = ray.train.get_context()
    # a restart after a failure, or the same run name started again: the latest valid checkpoint
    resume_from = resume_checkpoint(ctx, ray.train.get_checkpoint())

    def report(metrics: dict, path: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        name = f"step_{int(metrics['step']):07d}" if path is not None else None  # ranked by step, not by Ray
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    dist = Dist(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        # GPU: the device Ray assigned this worker (prepare_model moves the model there too); with
        # CUDA_VISIBLE_DEVICES shared by a node's workers it need not be cuda:<local rank>
        local_rank=ray.train.torch.get_device().index if cfg.trainer.use_gpu else ctx.get_local_rank(),
        # incremental depth leaves the later layers of untied models unused in early stages
        wrap=lambda m: ray.train.torch.prepare_model(
            m, parallel_strategy="ddp",
            parallel_strategy_kwargs={"find_unused_parameters": bool(cfg.trainer.depth_stages)}),
        report=report,
        resume_from=resume_from,
    )
    remote = dist.rank == 0 and is_url(cfg.trainer.output_dir)
    try:
        out = train(cfg, dist)
    finally:
        if remote:
            root = publish_run_files(cfg)
    return {**out, "run_dir": root} if remote else out


def fit(cfg: RunConfig, *, callbacks: list | None = None, gpus_per_worker: float | None = None) -> dict[str, Any]:
    """Run ``cfg`` with Ray Train on ``trainer.workers`` workers; returns rank 0's summary plus the
    checkpoint Ray persisted under ``<output_dir>/<run_name>/``.

    ``callbacks``: extra ``ray.train.UserCallback``s (a sweep trial passes one that forwards each
    validation report to Tune). ``gpus_per_worker``: a GPU share per worker (fractions allowed) instead
    of the one GPU that ``trainer.use_gpu`` reserves."""
    cfg = canonical_run(cfg)  # the run's identity, once; from here on every process uses this config
    run_dir = run_dir_of(cfg)
    with run_lock(run_dir):  # one writer per run: taken before anything is written or Ray starts
        return run_trainer(cfg, run_dir, callbacks, gpus_per_worker)


def run_trainer(cfg: RunConfig, run_dir: Path, callbacks: list | None, gpus_per_worker: float | None) -> dict[str, Any]:
    """:func:`fit` after the run's identity is fixed: ``cfg`` is :func:`canonical_run`'s, ``run_dir`` its
    directory (local, or the node-local staging directory of a URL output_dir)."""
    # Reports are polled by the controller; the default 2 s interval costs ~2 s per report on small
    # machines (measured with Ray 2.60). Must be set before Ray starts: it is propagated to controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.trainer
    storage, name, run_root = storage_of(cfg)
    preflight(cfg)
    latest = announce_resume(cfg, run_root)
    if latest is not None:  # refused here in one line; inside a worker Ray would wrap the error
        check_resume_config(latest, cfg.to_dict())
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    gpus = (gpus_per_worker if gpus_per_worker is not None else 1) if t.use_gpu else 0
    resources = {"CPU": t.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict()},  # absolute paths and the run name: nothing to recompute
        torch_config=TorchConfig(backend=distributed_backend(t.use_gpu)),
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints or None),
            callbacks=list(callbacks or []),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as e:  # a worker's expected failure is one line, not Ray's report
        raise worker_failure(e) from e
    out = dict(result.return_value or {})
    # Ray's result.checkpoint can lag behind what is on disk (see the module docstring)
    latest = latest_step_uri(run_root) if is_url(t.output_dir) else latest_checkpoint(run_dir, warn=False)
    if latest is not None or result.checkpoint is not None:
        out["checkpoint"] = str(latest) if latest is not None else result.checkpoint.path
    out["ray_run_dir"] = result.path
    return out

"""Ray Train (V2) path: a ``TorchTrainer`` whose per-worker function runs the SAME loop as the plain
path (:func:`sparsefold.trainers.loop.train`), with DDP (gloo on CPU, NCCL on GPU), one
``ray.train.report`` per validation/checkpoint with rank 0's checkpoint attached (stored as
``<run storage>/step_<step>/``), and resume from the LATEST valid checkpoint in the run's storage.

Which checkpoint a restart resumes from: after a worker failure Ray 2.60 hands ``get_checkpoint()`` the
last checkpoint its controller *registered*, which can be a report or two older than what is on disk.
Rank 0 therefore scans the run's storage for the valid checkpoint (SHA-256 manifest) with
the highest step (trainers/storage.py:latest_checkpoint, the plain loop's scanner too) and broadcasts its
name to the other ranks. Whether a run resumes at all is decided once, on the driver
(trainers/loop.py:resume_point: announced, or refused with ``trainer.resume=false``). Scanning was chosen over a ``latest``
pointer file: the checkpoints are their own source of truth, a partial copy is rejected by its manifest,
there is no second file to keep consistent on object stores without atomic rename, and it works
unchanged after the driver itself was killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsefold.config import RunConfig, is_url
from sparsefold.errors import InputError, RunError, SparsefoldError
from sparsefold.runtime import distributed_backend
from sparsefold.trainers.console import Relay, relayed, say
from sparsefold.trainers.console import use as use_console
from sparsefold.trainers.loop import Dist, resume_point, train
from sparsefold.trainers.ray_env import ray_init_args, use_ray_train_env
from sparsefold.trainers.runlock import run_lock
from sparsefold.trainers.storage import (
    announce_resume,
    canonical_run,
    latest_checkpoint,
    publish_run_files,
    run_dir_of,
    step_dir_name,
    storage_of,
    url_join,
)


def resume_checkpoint(ctx: Any, restored: Any) -> Path | None:
    """Local directory of the checkpoint every rank resumes from (see the module docstring), or None.

    Rank 0 runs the one scanner (storage.py:latest_checkpoint) on the run's storage and broadcasts the
    name; ``restored`` (``ray.train.get_checkpoint()``) is only used when storage holds no valid one."""
    import pyarrow.fs as pafs
    import ray.train
    import torch.distributed as td

    storage = ctx.get_storage()
    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    rank, local = ctx.get_world_rank(), isinstance(storage.storage_filesystem, pafs.LocalFileSystem)
    best = latest_checkpoint(root, fs) if rank == 0 else None
    chosen = [best.name if best is not None else None]
    if ctx.get_world_size() > 1 and td.is_initialized():
        td.broadcast_object_list(chosen, src=0)  # every rank resumes from the same checkpoint
    name = chosen[0]
    if rank == 0 and restored is not None and name is not None and Path(restored.path).name != name:
        say(f"Ray restored {Path(restored.path).name}; storage holds a newer valid checkpoint {name}: resuming "
            "from that")
    if name is None:
        return Path(restored.to_directory()) if restored is not None else None
    if best is not None or local:
        return best if best is not None else Path(root) / name
    return Path(ray.train.Checkpoint(f"{root}/{name}", filesystem=fs).to_directory())


def preflight(cfg: RunConfig) -> None:
    """Data checks on the driver, before Ray starts: a missing data path, an empty shard list or fewer
    shards than ranks × loader workers fail here with one line instead of inside every worker."""
    from sparsefold.datasets import check_shard_count, train_urls, val_files

    urls = train_urls(cfg.data)
    check_shard_count(urls, cfg.ray.workers, cfg.data.num_workers, cfg.data.resampled)
    val_files(cfg.data)


def worker_failure(error: Exception) -> Exception:
    """The expected failure (:class:`~sparsefold.errors.SparsefoldError`, e.g. "training diverged") that a
    worker raised, as a new one-line error of the same class, unwrapped from Ray's ``WorkerGroupError``
    (which holds each rank's exception, possibly wrapped in a ``RayTaskError``); else ``error`` itself."""
    for failure in getattr(error, "worker_failures", {}).values():
        chain: list[BaseException] = []
        e = failure
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
    if ctx.get_world_rank() == 0 and config.get("console") is not None:
        use_console(Relay(config["console"]))  # our lines and bar: drawn by the driver (trainers/console.py)
    # a restart after a failure, or the same run name started again: the latest valid checkpoint
    resume_from = resume_checkpoint(ctx, ray.train.get_checkpoint())
    if ctx.get_world_rank() == 0 and resume_from is not None and resume_from.name != config.get("announced"):
        announce_resume(cfg.trainer.run_name, resume_from)  # a restart: the driver announced the first start

    def report(metrics: dict, path: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        name = step_dir_name(int(metrics["step"])) if path is not None else None  # ranked by step, not by Ray
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    dist = Dist(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        # GPU: the device Ray assigned this worker (prepare_model moves the model there too); with
        # CUDA_VISIBLE_DEVICES shared by a node's workers it need not be cuda:<local rank>
        local_rank=ray.train.torch.get_device().index if cfg.runtime.use_gpu else ctx.get_local_rank(),
        # incremental depth leaves the later layers of untied models unused in early stages
        wrap=lambda m: ray.train.torch.prepare_model(
            m, parallel_strategy="ddp",
            parallel_strategy_kwargs={"find_unused_parameters": bool(cfg.trainer.depth_stages)}),
        report=report,
        resume_from=resume_from,
    )
    instrument = config.get("instrument")
    dist = instrument(dist) if instrument is not None else dist
    remote = dist.rank == 0 and is_url(cfg.trainer.output_dir)
    try:
        out = train(cfg, dist)
    finally:
        if remote:
            root = publish_run_files(cfg)
    return {**out, "run_dir": root} if remote else out


def fit(cfg: RunConfig, *, callbacks: list | None = None, gpus_per_worker: float | None = None,
        instrument: Callable[[Dist], Dist] | None = None, console: bool = True) -> dict[str, Any]:
    """Run ``cfg`` with Ray Train on ``ray.workers`` workers; returns rank 0's summary plus the
    checkpoint Ray persisted under ``<output_dir>/<run_name>/``.

    ``callbacks``: extra ``ray.train.UserCallback``s (a sweep trial passes one that forwards each
    validation report to Tune). ``gpus_per_worker``: a GPU share per worker (fractions allowed) instead
    of the one GPU that ``runtime.use_gpu`` reserves. ``instrument``: applied in every worker to the
    :class:`~sparsefold.trainers.loop.Dist` its loop gets, e.g. to watch or hold its reports (the
    fault-tolerance test stops the ranks after a known checkpoint this way); shipped with cloudpickle.
    ``console``: rank 0's progress bar and lines drawn in this process (trainers/console.py; a sweep's
    trials, which Tune reports on, run without)."""
    cfg = canonical_run(cfg)  # the run's identity, once; from here on every process uses this config
    with run_lock(run_dir_of(cfg)):  # one writer per run: taken before anything is written or Ray starts
        return run_trainer(cfg, callbacks, gpus_per_worker, instrument, console)


def run_trainer(cfg: RunConfig, callbacks: list | None, gpus_per_worker: float | None,
                instrument: Callable[[Dist], Dist] | None = None, console: bool = True) -> dict[str, Any]:
    """:func:`fit` after the run's identity is fixed (``cfg`` is :func:`canonical_run`'s) and its lock is
    held; the run's storage is :func:`storage_of`'s."""
    use_ray_train_env()  # before Ray starts: propagated to the controller and the workers
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    t, ray_cfg, gpu = cfg.trainer, cfg.ray, cfg.runtime.use_gpu
    storage, name, run_root = storage_of(cfg)
    preflight(cfg)
    latest = resume_point(cfg, run_root)  # refused here in one line; inside a worker Ray would wrap the error
    ours = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")  # a Ray instance of this process
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, **ray_init_args())
    queue = Queue(actor_options={"num_cpus": 0}) if console else None
    gpus = (gpus_per_worker if gpus_per_worker is not None else 1) if gpu else 0
    resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    # ray.train.torch exports Train v2's TorchTrainer at run time (the 2.60 default), which takes a loop returning
    # a value and gives it back as Result.return_value; mypy reads Train v1's annotations of the same names
    trainer = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        # absolute paths and the run name: nothing to recompute; what the driver announced, not said twice
        train_loop_config={"run": cfg.to_dict(), "announced": latest.name if latest is not None else None,
                           "instrument": instrument, "console": queue},
        torch_config=TorchConfig(backend=distributed_backend(gpu)),
        scaling_config=ray.train.ScalingConfig(num_workers=ray_cfg.workers, use_gpu=gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints or None),
            callbacks=list(callbacks or []),
        ),
    )
    try:
        with relayed(queue) if queue is not None else contextlib.nullcontext():
            result = trainer.fit()
    except ray.train.WorkerGroupError as e:  # a worker's expected failure is one line, not Ray's report
        raise worker_failure(e) from e
    finally:
        if ours and not is_url(run_root):
            keep_ray_logs(Path(run_root))
    out = dict(result.return_value or {})  # type: ignore[attr-defined]
    newest = newest_checkpoint(run_root)  # Ray's result.checkpoint can lag behind (see the module docstring)
    if newest is None and result.checkpoint is not None:
        newest = result.checkpoint.path
    if newest is not None:
        out["checkpoint"] = newest
    out["ray_run_dir"] = result.path
    return out


def keep_ray_logs(run_dir: Path) -> None:
    """Copy this process's Ray session logs (controller, workers: every rank's output, Ray's warnings) to
    ``run_dir/ray_logs/<session>/``, where the run's other files are (Ray's own folder is under /tmp)."""
    import ray._private.worker as ray_worker  # the session folder has no public accessor in Ray 2.60

    node = getattr(getattr(ray_worker, "_global_node", None), "get_session_dir_path", None)
    if node is None or not run_dir.is_dir():
        return
    session = Path(node())
    with contextlib.suppress(OSError):  # logs are a convenience: a copy that fails must not fail the run
        shutil.copytree(session / "logs", run_dir / "ray_logs" / session.name, dirs_exist_ok=True)


def newest_checkpoint(run_root: str) -> str | None:
    """Path or URL of the newest valid checkpoint in the run's storage (a remote one is downloaded into a
    temp dir to verify it, then named by its URL)."""
    with tempfile.TemporaryDirectory() as tmp:
        latest = latest_checkpoint(run_root, download_to=tmp, warn=False)
        if latest is None:
            return None
        return url_join(run_root, latest.name) if is_url(run_root) else str(latest)

"""``sparsefold sweep``: Ray Tune over a :class:`SweepSpec`, one Ray Train run per trial.

Ray 2.60's pattern for tuning Train V2 runs: a Tune *function trainable* (:func:`run_trial`) builds the
trial's RunConfig and calls the same :func:`sparsefold.trainers.ray_train.fit` as ``sparsefold train``,
so a trial is a real, resumable Ray Train run under ``<sweep dir>/trials/<name>-<trial id>/``. A Train
callback running in the Train controller (:class:`ForwardToTune`) forwards each validation report
(rank 0's metrics) to Tune, which is what lets ASHA stop a trial between validations.

    searcher:  grid / random -> BasicVariantGenerator(random_state=seed);  optuna -> OptunaSearch (TPE)
    scheduler: asha -> ASHAScheduler(time_attr = "validation" | "step", max_t, grace_period, reduction_factor)
    failures:  a trial that raises is recorded as ERROR and the others go on (Tune FailureConfig(max_failures))
    resume:    the same command again -> Tuner.restore(resume_unfinished=True): finished and ASHA-stopped
               trials are kept, unfinished ones continue from their Train run's latest checkpoint;
               errored trials are retried only with ``--retry-errored`` (resume_errored=True)

The sweep dir holds Tune's experiment state, ``sweep_spec.json`` (the resolved spec, compared on
resume) and ``summary.json``; W&B gets one run per trial (rank 0, group = sweep name) and a summary
table (job_type ``sweep``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from sparsefold.config import ConfigError
from sparsefold.sweeps.report import collect_trials, compute_savings
from sparsefold.sweeps.spec import SPEC_FILE, SweepSpec
from sparsefold.trainers.ray_env import ray_init_args, use_ray_train_env

SUMMARY_FILE = "summary.json"


class ForwardToTune(TuneReportCallback):
    """Ray's TuneReportCallback (rank 0's metrics + checkpoint path to Tune; runs in the Train controller),
    for validation reports only (a checkpoint-only report carries the previous validation's metrics),
    plus ``validation`` = ⌈step / val_every⌉, ASHA's time in validations, derived from the step so that
    a resumed trial keeps counting where it was."""

    def __init__(self, val_every: int, max_steps: int) -> None:
        super().__init__()
        self.val_every, self.max_steps = val_every, max_steps

    def after_report(self, run_context, metrics, checkpoint) -> None:
        step = int(metrics[0].get("step", 0))
        if step % self.val_every and step != self.max_steps:
            return
        metrics = [dict(m) for m in metrics]
        metrics[0]["validation"] = math.ceil(step / self.val_every)
        super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Tune function trainable: one trial = one Ray Train run of the trial's RunConfig. Returns None
    (a returned dict without the metric would fail the searcher's check in Ray 2.60)."""
    import ray.tune

    from sparsefold.trainers.ray_train import fit

    cfg = spec.trial_config(config, ray.tune.get_context().get_trial_id())
    fit(cfg, callbacks=[ForwardToTune(cfg.trainer.val_every, cfg.trainer.max_steps)],
        gpus_per_worker=spec.resources.gpus_per_worker or None, console=False)  # Tune reports the trials


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def tuner_parts(spec: SweepSpec) -> tuple[dict, Any, Any]:
    """(param_space, TuneConfig, tune.RunConfig) from the spec: Ray Tune's own searchers and scheduler."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import SearchAlgorithm, Searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s, c = spec.search, spec.scheduler
    if s.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Searcher | SearchAlgorithm = OptunaSearch(seed=s.seed)
    else:
        # a SearchAlgorithm, not a Searcher: Tune ignores TuneConfig.max_concurrent_trials for it
        search_alg = BasicVariantGenerator(random_state=s.seed, max_concurrent=spec.max_concurrent_trials)
    scheduler = (ASHAScheduler(time_attr=c.metric_key, max_t=spec.max_t, grace_period=c.grace_period,
                               reduction_factor=c.reduction_factor) if c.kind == "asha" else FIFOScheduler())
    tune_config = tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search_alg, scheduler=scheduler,
                                  num_samples=s.num_samples,
                                  max_concurrent_trials=spec.max_concurrent_trials if s.kind == "optuna" else None,
                                  trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(name=spec.name, storage_path=spec.storage, verbose=1,
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures))
    return {d.key: d.domain() for d in spec.space}, tune_config, run_config


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Dotted path of the first difference between two JSON-like values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"


def init_local_ray(num_cpus: int | None = None, env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """Start a local Ray cluster whose processes know its own State API (dashboard) address.

    Train V2 frees the worker placement group of a trial that Tune stopped (ASHA kills the trial, so the
    Train controller dies without cleaning up) from a detached PlacementGroupCleaner that asks the State
    API for the controller's state with no address. With several Ray instances on one host (parallel CI
    jobs, other users) that lookup fails ("Found multiple active Ray instances"), the stopped trials'
    CPUs are never released and the sweep waits forever. A fixed dashboard port exported as
    RAY_API_SERVER_ADDRESS in the job's runtime env (inherited by every actor) points it at this cluster.
    """
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**(env or {}), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": env},
             **kwargs)


def _init_ray(spec: SweepSpec) -> None:
    import ray

    # Before Ray starts (propagated to Train controllers and workers).
    use_ray_train_env()

    if not ray.is_initialized():  # keep the dashboard: Train's placement-group cleanup needs it (Ray 2.60)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **ray_init_args())
        else:
            init_local_ray(**ray_init_args())
    total = ray.cluster_resources().get("CPU", 0.0)
    need = spec.resources.cpus_per_trial
    if need > total:
        print(f"[sparsefold] warning: a trial needs {need:g} CPUs, the cluster has {total:g} now: trials wait "
              "for the autoscaler (lower resources.cpus_per_worker on a fixed cluster)", file=sys.stderr)
    elif spec.max_concurrent_trials * need > total + 1e-9:
        print(f"[sparsefold] note: {spec.max_concurrent_trials} concurrent trials × {need:g} CPUs > {total:g} "
              "CPUs: fewer trials run at once", file=sys.stderr)


def run_sweep(spec: SweepSpec, retry_errored: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the summary written to ``<sweep dir>/summary.json``."""
    from ray import tune

    from sparsefold.trainers.ray_train import preflight

    sweep_dir = spec.sweep_dir
    # data checks once, before Ray starts (and image folders sharded once, not by two trials at a time)
    preflight(spec.trial_config({d.key: d.probes()[0] for d in spec.space}, "preflight"))
    _init_ray(spec)
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"cpu": spec.resources.driver_cpus})
    if tune.Tuner.can_restore(str(sweep_dir)):
        old = json.loads((sweep_dir / SPEC_FILE).read_text()) if (sweep_dir / SPEC_FILE).is_file() else {}
        diff = first_difference(old, spec.to_dict())
        if diff:
            raise ConfigError(f"name: {sweep_dir} was started with another spec ({diff}); use another name or storage")
        print(f"[sparsefold] resuming sweep {sweep_dir} (finished trials are kept)", file=sys.stderr)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=retry_errored)
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1))
        space, tune_config, run_config = tuner_parts(spec)
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    grid = tuner.fit()
    trials = collect_trials(sweep_dir, spec)
    summary = {"sweep_dir": str(sweep_dir), "name": spec.name, "trials": len(trials),
               "errors": grid.num_errors, "metric": spec.search.metric, "mode": spec.search.mode,
               "asha": compute_savings(trials), "results": trials}
    best = [t for t in trials if t.get("best_val_psnr") is not None]
    if best:
        top = max(best, key=lambda t: t["best_val_psnr"])
        summary["best"] = {k: top[k] for k in ("trial_id", "params", "best_val_psnr", "run_dir")}
    (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    log_summary(spec, trials)
    return summary


def log_summary(spec: SweepSpec, trials: list[dict]) -> None:
    """One W&B run (group = sweep name, job_type ``sweep``) with the per-trial table."""
    from sparsefold.trainers.tracking import wandb_mode

    base = spec.base_config().wandb
    mode = wandb_mode(base.mode)
    if mode == "disabled" or not trials:
        return
    import wandb

    keys = [d.key for d in spec.space]
    cols: list[str | int] = ["trial_id", "status", *keys, "steps", "max_steps", "best_val_psnr", "best_step"]
    rows = [[t["trial_id"], t["status"], *[t["params"].get(k) for k in keys], t["steps"], t["max_steps"],
             t.get("best_val_psnr"), t.get("best_step")] for t in trials]
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=base.project, entity=base.entity or None, group=spec.name, job_type="sweep",
                     name=f"{spec.name}-summary", config=spec.to_dict(), mode=mode, dir=str(spec.sweep_dir),
                     reinit="finish_previous")
    run.log({"sweep/trials": wandb.Table(columns=cols, data=[[str(v) if isinstance(v, (list, dict)) else v
                                                               for v in r] for r in rows])})
    run.summary.update({"sweep/" + k: v for k, v in compute_savings(trials).items()})
    run.finish()

"""The one training loop. Plain single process (CPU or one GPU) as is; Ray Train wraps it (ray_train.py)
by passing a :class:`Dist` with its rank, DDP wrapper and report hook. Nothing here imports Ray.

Step-based: every rank draws batches from its own part of the shards (PatchStream splits by rank and
loader worker), looping epochs, so ranks never run out at different times. Validation, checkpoints
and W&B happen on rank 0; with Ray, every rank calls ``report`` at each validation/checkpoint (it is
a barrier).

Resume and faults: a run resumes from its latest valid checkpoint (weights, optimizer, data position,
lr scale); every step reseeds the global RNG from (seed, rank, step), so resumed == uninterrupted bit
for bit on CPU. A non-finite loss or gradient (decided on all ranks at once) skips the step;
``trainer.rollback_after`` such steps in a row restore the last checkpoint (kept in memory) and multiply
the learning rate by ``trainer.rollback_lr_factor``. Only a healthy state is checkpointed (and becomes
the rollback target; see :func:`unhealthy`), so the newest checkpoint is always the last healthy one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsefold.config import ConfigError, RunConfig, is_url, to_dict
from sparsefold.datasets import (
    PatchStream,
    check_shard_count,
    make_loader,
    skipped_while_sharding,
    train_urls,
    val_files,
)
from sparsefold.datasets.patches import stable_seed
from sparsefold.errors import RunError
from sparsefold.models import build_model, count_parameters
from sparsefold.runtime import canonical_paths, runtime_for, staging_root
from sparsefold.trainers.checkpoint import (
    check_resume_config,
    fault_hook,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
)
from sparsefold.trainers.evaluate import evaluate_images
from sparsefold.trainers.losses import Objective
from sparsefold.trainers.runlock import run_lock
from sparsefold.trainers.tracking import make_tracker, model_panels


@dataclass
class Dist:
    """What the runtime around the loop provides. The default is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # DDP wrapping (Ray: prepare_model)
    report: Callable[[dict, Path | None], None] | None = None  # Ray: ray.train.report with a checkpoint
    resume_from: Path | None = None  # Ray: the checkpoint get_checkpoint() restored


def default_run_name(cfg: RunConfig) -> str:
    """Stable name from what defines the experiment (model, data, noise, optim, loss, seed), so running the
    same command again resumes it; changing max_steps extends the same run.

    Hashed from the canonical config (:func:`~sparsefold.runtime.canonical_paths`): data named by a relative
    path from the repository or by an absolute path from elsewhere is the same run, and a Ray worker (handed
    absolute paths) would compute what its driver did -- though the driver hands it the name anyway.

    A Ray run (``trainer.use_ray``) is ``<model>-ray-<hash>``, never the plain run's directory: the two lay
    a run out differently (plain: ``<run>/checkpoints/step_*``; Ray Train's storage: ``<run>/step_*`` and its
    snapshot), so in one directory neither would resume from the other's checkpoints, yet both would write
    config.json and W&B files there. Other trainer settings (workers, precision, ...) are not in the name."""
    key = {k: v for k, v in canonical_paths(cfg).to_dict().items() if k not in ("trainer", "wandb")}
    key["seed"] = cfg.trainer.seed
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.model.name}-{'ray-' if cfg.trainer.use_ray else ''}{digest}"


def run_dir_of(cfg: RunConfig) -> Path:
    """Local directory of the run: ``<output_dir>/<run name>``. When output_dir is a URL (Ray path only),
    a node-local staging directory instead: Ray Train uploads the checkpoints, ray_train.py the rest."""
    name, out = cfg.trainer.run_name or default_run_name(cfg), cfg.trainer.output_dir
    return staging_root() / name if is_url(out) else Path(out).expanduser().resolve() / name


def lr_at(step: int, cfg: RunConfig, progress: float | None = None) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then constant / cosine / step decay.
    ``progress`` in [0, 1] overrides step/max_steps for the cosine (a CPU-time budget's fraction)."""
    o, total = cfg.optim, cfg.trainer.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps) if progress is None else progress
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    if o.schedule == "step":
        return o.lr * o.gamma ** (step // o.step_size)
    return o.lr


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers end with every epoch)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def batches(ds: PatchStream, loader: Any, epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, batch) forever; resumes inside an epoch by skipping ``skip`` batches."""
    while True:
        ds.set_epoch(epoch)
        seen = 0
        for i, b in enumerate(loader):
            seen += 1
            if i >= skip:
                yield epoch, i, b
        if seen == 0:
            raise ConfigError(f"data.batch_size: {ds.data.batch_size} is more than data.train yields on this rank "
                              f"in an epoch (epoch {epoch} had no full batch); lower data.batch_size or add data")
        epoch, skip = epoch + 1, 0


def depth_at(step: int, cfg: RunConfig, progress: float | None = None) -> int | None:
    """Unfolding depth of step ``step`` under ``trainer.depth_stages`` (equal shares of max_steps, or of
    the budget's ``progress``), or None."""
    stages = cfg.trainer.depth_stages
    if not stages:
        return None
    frac = step / cfg.trainer.max_steps if progress is None else progress
    return stages[min(int(frac * len(stages)), len(stages) - 1)]


def budget_progress(step: int, cpu_seconds: float, cfg: RunConfig, world_size: int) -> float | None:
    """Fraction of the training done under ``trainer.budget_cpu_seconds``: max(steps, CPU time) used,
    the largest over ranks (one all-reduce), so every rank stops at the same step. None without a budget."""
    budget = cfg.trainer.budget_cpu_seconds
    if budget <= 0:
        return None
    frac = torch.tensor([max(step / cfg.trainer.max_steps, cpu_seconds / budget)], dtype=torch.float64)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        frac = frac.float()
        torch.distributed.all_reduce(frac, op=torch.distributed.ReduceOp.MAX)
    return min(float(frac), 1.0)


def unfolding_metrics(model: nn.Module) -> dict[str, float]:
    """Mean |value| of every learned threshold / step parameter (names containing thresh, tau, lam, step)."""
    out = {}
    for name, p in model.named_parameters():
        if any(k in name.lower() for k in ("thresh", "tau", "lam", "step", "bias_b")):
            out[f"model/{name}"] = float(p.detach().float().abs().mean())
    return out


def all_ranks(ok: torch.Tensor, world_size: int) -> bool:
    """Whether the boolean ``ok`` holds on EVERY rank (one tiny all-reduce under DDP), so that all ranks
    skip, step, checkpoint and roll back together: a rank skipping backward alone would leave the others
    waiting in allreduce."""
    flag = ok.float().reshape(1)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def all_finite(x: torch.Tensor, world_size: int) -> bool:
    """Whether ``x`` is finite on every rank (:func:`all_ranks`)."""
    return all_ranks(torch.isfinite(x.detach()).all(), world_size)


def unhealthy(cfg: RunConfig, model: nn.Module, rt: Any, batch: tuple[torch.Tensor, ...], streak: int,
              world_size: int) -> str | None:
    """Why the current state must not become a checkpoint or the rollback target, or None when healthy.

    Healthy: no open non-finite streak, every parameter and buffer finite (BatchNorm's running stats
    turn NaN in the forward of a skipped step), and a finite loss OF THESE WEIGHTS on this step's batch.
    The step's own loss was computed before its update, so with a huge lr (1e30) a step ends "finite"
    with weights that overflow in the next forward; one extra forward (eval mode, no grad, no DDP) sees
    that. Weights that are merely large but compute finite losses are healthy: finiteness is the rule.
    Decided on all ranks together (every rank calls this at the same steps)."""
    if streak:
        return f"{streak} non-finite step{'s' if streak > 1 else ''} in a row"
    weights = [v.detach() for v in model.state_dict().values() if v.is_floating_point()]
    if not all_ranks(torch.stack([torch.isfinite(v).all() for v in weights]).all(), world_size):
        return "non-finite weights"
    was_training = model.training
    model.eval()
    with torch.no_grad(), rt.autocast():
        loss = Objective(model, cfg.loss, cfg.noise)(*batch)
    model.train(was_training)
    return None if all_finite(loss, world_size) else "its weights give a non-finite loss"


def diverged(cfg: RunConfig, state: dict, streak: int, good_step: int, last_ckpt: Path | None) -> RunError:
    """The one-line error that ends a run after ``trainer.max_rollbacks`` rollbacks."""
    where = f" ({last_ckpt}, the newest checkpoint on disk)" if last_ckpt else ""
    return RunError(f"training diverged: {streak} consecutive non-finite steps at step {state['step']} after "
                    f"{state['rollbacks']} rollbacks (trainer.max_rollbacks={cfg.trainer.max_rollbacks}); last healthy "
                    f"state: step {good_step}{where}; lower optim.lr (now {cfg.optim.lr:g}) or set optim.grad_clip "
                    f"(now {cfg.optim.grad_clip:g}; e.g. 1)")


def snapshot(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> tuple[dict, dict, dict]:
    """In-memory copy of what a checkpoint holds (weights, optimizer, state), the rollback target."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
            copy.deepcopy(state))


def train(cfg: RunConfig, dist: Dist | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``trainer.max_steps``; returns {checkpoint, steps, seconds, val_psnr, ...}.

    Rank 0 of the plain path holds the run lock (trainers/runlock.py) for the whole run, taken before
    anything in the run directory is read or written; under Ray the driver holds it (ray_train.fit)."""
    dist = dist or Dist()
    if dist.report is not None or dist.rank != 0:
        return _train(cfg, dist)
    with run_lock(run_dir_of(cfg)):
        return _train(cfg, dist)


def _train(cfg: RunConfig, dist: Dist) -> dict[str, Any]:
    """The loop of :func:`train`."""
    t, main = cfg.trainer, dist.rank == 0
    rt = runtime_for(t, dist.local_rank)  # device, autocast dtype, compile, channels-last
    run_dir = run_dir_of(cfg)
    run_name = run_dir.name
    ckpt_dir = run_dir / "checkpoints"
    torch.manual_seed(t.seed)

    model = rt.place(build_model(cfg.model))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "skipped": 0, "seconds": 0.0,
             "nonfinite_steps": 0, "rollbacks": 0, "lr_scale": 1.0}
    latest = latest_checkpoint(ckpt_dir) if dist.report is None else None  # Ray: ray_train.py decides
    if not t.resume and latest is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pick another trainer.run_name or "
                              "set trainer.resume=true to continue it")
    resume = dist.resume_from or (latest if t.resume else None)
    if resume is not None:
        check_resume_config(resume, cfg.to_dict())  # one trajectory per run directory
        state.update(load_training_state(resume, model, opt))
        if main:
            print(f"[sparsefold] resuming run {run_name} from step {state['step']} ({resume})"
                  + (f", lr scale {state['lr_scale']:g}" if state["lr_scale"] != 1 else ""), file=sys.stderr)
    resumed_from, good, streak = (state["step"] if resume is not None else None), snapshot(model, opt, state), 0
    fault_hook("start", dist.rank, state["step"])
    net = rt.compiled(dist.wrap(Objective(model, cfg.loss, cfg.noise)))  # DDP wraps model + loss (multilayer, nll)

    urls = train_urls(cfg.data)
    unreadable = skipped_while_sharding(urls)  # images left out of the shards: part of data/skipped
    check_shard_count(urls, dist.world_size, cfg.data.num_workers, cfg.data.resampled)
    ds = PatchStream(urls, cfg.data, cfg.noise, seed=t.seed, rank=dist.rank, world_size=dist.world_size)
    stream = batches(ds, make_loader(ds, cfg.data), state["epoch"], state["batch_in_epoch"])
    val = val_files(cfg.data)[: cfg.data.val_images] if main else []

    tracker = make_tracker(cfg, dist.rank, run_dir, run_name, resume is not None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        tracker.log({"model/params": count_parameters(model)}, step=state["step"])
    bar = None
    if main and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=state["step"], desc=run_name, unit="step", dynamic_ncols=True)

    scaler, last_ckpt, metrics = rt.grad_scaler, resume, {}
    cpu0, cpu_base = _cpu_seconds(), state.get("cpu_seconds", 0.0)
    t_start, win_t, win_n = time.perf_counter() - state["seconds"], time.perf_counter(), 0
    grad_norm, depth = float("nan"), None
    progress = None
    while state["step"] < t.max_steps and progress != 1.0:
        epoch, index, b = next(stream)
        torch.manual_seed(stable_seed("step", t.seed, dist.rank, state["step"]))  # randomness = f(step): resumable
        noisy, clean = b["noisy"].to(rt.device, non_blocking=True), b["clean"].to(rt.device, non_blocking=True)
        sigma = b["sigma"].to(rt.device, non_blocking=True)
        progress = budget_progress(state["step"], cpu_base + _cpu_seconds() - cpu0, cfg, dist.world_size)
        depth = depth_at(state["step"], cfg, progress)
        if depth is not None and depth != getattr(model, "active_depth", None):
            model.set_depth(depth)  # incremental depth: the deeper model warm-starts from the shorter one
            model.active_depth = depth
            if main:
                print(f"[sparsefold] step {state['step']}: unfolding depth {depth}", file=sys.stderr, flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], cfg, progress) * state["lr_scale"]  # lr_scale < 1 after rollbacks
        net.train()
        with rt.autocast():
            loss = net(noisy, clean, sigma)  # loss.kind, see trainers/losses.py
        opt.zero_grad(set_to_none=True)
        finite = all_finite(loss, dist.world_size)  # a non-finite loss is skipped (and counted), never stepped on
        if finite:
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf))
            if scaler:  # fp16: the scaler itself skips steps with inf gradients
                scaler.step(opt)
                scaler.update()
            elif math.isfinite(grad_norm):  # gradients are all-reduced: the same decision on every rank
                opt.step()
            else:
                finite = False  # a finite loss with non-finite gradients: skipped like a non-finite loss
            if finite and hasattr(model, "project_"):
                model.project_()  # constraints after each step (e.g. CDLNet: τ ≥ 0, filters in the unit ball)
        state.update(step=state["step"] + 1, epoch=epoch, batch_in_epoch=index + 1,
                     samples=state["samples"] + noisy.shape[0] * dist.world_size,
                     skipped=state["skipped"] + int(b.get("skipped", 0)))
        win_n += noisy.shape[0] * dist.world_size
        state["nonfinite_steps"] += int(not finite)
        streak = 0 if finite else streak + 1
        if t.rollback_after and streak >= t.rollback_after:  # K bad steps in a row: back to the last checkpoint
            if state["rollbacks"] >= t.max_rollbacks:
                raise diverged(cfg, state, streak, good[2]["step"], last_ckpt if dist.report is None else None)
            keep = {"nonfinite_steps": state["nonfinite_steps"], "rollbacks": state["rollbacks"] + 1,
                    "lr_scale": state["lr_scale"] * t.rollback_lr_factor}
            bad_step = state["step"]
            model.load_state_dict(good[0])
            opt.load_state_dict(copy.deepcopy(good[1]))  # a copy: the optimizer would share the tensors
            state.clear()
            state.update(copy.deepcopy(good[2]), **keep)
            stream.close()  # data position of the checkpoint: the same batches again, at a lower lr
            stream = batches(ds, make_loader(ds, cfg.data), state["epoch"], state["batch_in_epoch"])
            streak = 0
            if main:
                tracker.log({"train/" + k: state[k] for k in ("nonfinite_steps", "rollbacks", "lr_scale")}, step=bad_step)
                print(f"[sparsefold] step {bad_step}: {t.rollback_after} consecutive non-finite steps; rolled back "
                      f"to step {state['step']}, lr scale {state['lr_scale']:g}", file=sys.stderr, flush=True)
            if bar is not None:
                bar.n = state["step"]
                bar.refresh()
            continue
        step, last = state["step"], state["step"] == t.max_steps or progress == 1.0  # steps or CPU budget spent
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2e}", lr=f"{g['lr']:.1e}")
        if main and (step % t.log_every == 0 or last):
            now = time.perf_counter()
            tracker.log({"train/loss": loss.item(), "train/lr": g["lr"], "train/samples_per_s": win_n / (now - win_t),
                         "train/grad_norm": grad_norm, "data/skipped": state["skipped"] + unreadable,
                         "train/nonfinite_steps": state["nonfinite_steps"], "train/rollbacks": state["rollbacks"],
                         "train/lr_scale": state["lr_scale"], "epoch": epoch, **({"model/depth": depth} if depth else {})},
                        step=step)
            win_t, win_n = now, 0
        do_val, do_ckpt = step % t.val_every == 0 or last, step % t.ckpt_every == 0 or last
        if not (do_val or do_ckpt):
            continue
        state["seconds"] = time.perf_counter() - t_start
        state["cpu_seconds"] = cpu_base + _cpu_seconds() - cpu0  # this process + its finished loader workers
        if main and do_val and val:
            res = evaluate_images(model, val, cfg.noise, cfg.data.gray, rt.device, with_ssim=True, keep_first=True)
            metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"], "val/input_psnr": res["input_psnr"]}
            if hasattr(model, "code_sparsity"):
                sp = model.code_sparsity(res["first"][0].unsqueeze(0).to(rt.device))
                metrics.update({f"codes/nonzero_t{i}": v for i, v in enumerate(sp)})
            tracker.log({**metrics, **unfolding_metrics(model)}, step=step)
            line = (f"[sparsefold] step {step}: val psnr {res['psnr']:.3f} dB, ssim {res['ssim']:.4f} "
                    f"({len(val)} images, {time.perf_counter() - t_start:.0f} s)")
            bar.write(line, file=sys.stderr) if bar is not None else print(line, file=sys.stderr, flush=True)
            tracker.log_images(model_panels(model, res["first"]), step=step)
        state["metrics"] = metrics
        why = unhealthy(cfg, model, rt, (noisy, clean, sigma), streak, dist.world_size)  # never checkpoint a bad state
        if why and main:
            print(f"[sparsefold] step {step}: not checkpointed ({why}); the rollback target stays step "
                  f"{good[2]['step']}", file=sys.stderr, flush=True)
        if dist.report is not None:  # Ray: one report per validation/checkpoint, checkpoint attached on rank 0
            with tempfile.TemporaryDirectory() as tmp:
                path = save_checkpoint(Path(tmp) / "ckpt", model, cfg, state, opt) if main and not why else None
                dist.report({"step": step, **metrics, "val_psnr": metrics.get("val/psnr", float("nan"))}, path)
        elif main and not why:
            last_ckpt = save_checkpoint(ckpt_dir / f"step_{step:07d}", model, cfg, state, opt)
            prune_checkpoints(ckpt_dir, t.keep_checkpoints)
        if not why:
            good = snapshot(model, opt, state)  # every rank: the rollback target is what was just checkpointed
        fault_hook("checkpoint", dist.rank, step)
    if bar is not None:
        bar.close()
    if main and not metrics and val:  # nothing left to train (resumed a finished run): still score it
        res = evaluate_images(model, val, cfg.noise, cfg.data.gray, rt.device)
        metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"]}
    tracker.finish()
    return {"checkpoint": str(last_ckpt) if last_ckpt else None, "run_dir": str(run_dir), "steps": state["step"],
            "seconds": round(time.perf_counter() - t_start, 2), "val_psnr": metrics.get("val/psnr"),
            "val_ssim": metrics.get("val/ssim"), "samples": state["samples"], "skipped": state["skipped"] + unreadable,
            "nonfinite_steps": state["nonfinite_steps"], "rollbacks": state["rollbacks"], "lr_scale": state["lr_scale"],
            "resumed_from_step": resumed_from, "params": count_parameters(model),
            "cpu_seconds": round(cpu_base + _cpu_seconds() - cpu0, 1)}

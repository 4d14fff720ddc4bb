"""The one training loop. Plain single process (CPU or one GPU) as is; Ray Train wraps it (ray_train.py)
by passing a :class:`Dist` with its rank, DDP wrapper and report hook. Nothing here imports Ray.

Step-based: every rank draws batches from its own part of the shards (PatchStream splits by rank and
loader worker), looping epochs, so ranks never run out at different times. Validation, checkpoints
and W&B happen on rank 0; with Ray, every rank calls ``report`` at each validation (it is a barrier).
"""

from __future__ import annotations

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

from sparsefold.config import RunConfig, to_dict
from sparsefold.datasets import PatchStream, check_shard_count, make_loader, train_urls, val_files
from sparsefold.models import build_model, count_parameters
from sparsefold.runtime import select_runtime
from sparsefold.trainers.checkpoint import (
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
)
from sparsefold.trainers.evaluate import evaluate_images
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
    """Stable name from what defines the experiment (model, data, noise, optim, seed), so running the
    same command again resumes it; changing max_steps extends the same run."""
    key = {k: v for k, v in cfg.to_dict().items() if k not in ("trainer", "wandb")}
    key["seed"] = cfg.trainer.seed
    return f"{cfg.model.name}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]}"


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.trainer.output_dir).expanduser().resolve() / (cfg.trainer.run_name or default_run_name(cfg))


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then constant / cosine / step decay."""
    o, total = cfg.optim, cfg.trainer.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
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
            raise RuntimeError(f"data.train: epoch {epoch} yielded no batch on this rank (too few samples "
                               f"for data.batch_size={ds.data.batch_size}?)")
        epoch, skip = epoch + 1, 0


def train(cfg: RunConfig, dist: Dist | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``trainer.max_steps``; returns {checkpoint, steps, seconds, val_psnr, ...}."""
    dist = dist or Dist()
    t, main = cfg.trainer, dist.rank == 0
    rt = select_runtime(t.use_gpu, t.amp, dist.local_rank, t.threads)
    run_dir = run_dir_of(cfg)
    run_name = run_dir.name
    ckpt_dir = run_dir / "checkpoints"
    torch.manual_seed(t.seed)

    model = build_model(cfg.model).to(rt.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "skipped": 0, "seconds": 0.0}
    resume = dist.resume_from or (latest_checkpoint(ckpt_dir) if t.resume else None)
    if not t.resume and latest_checkpoint(ckpt_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pick another trainer.run_name or "
                              "set trainer.resume=true to continue it")
    if resume is not None:
        state.update(load_training_state(resume, model, opt))
        if main:
            print(f"[sparsefold] resuming run {run_name} from step {state['step']} ({resume})", file=sys.stderr)
    net = dist.wrap(model)

    urls = train_urls(cfg.data)
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
    t_start, win_t, win_n, bad = time.perf_counter() - state["seconds"], time.perf_counter(), 0, 0
    while state["step"] < t.max_steps:
        epoch, index, b = next(stream)
        noisy, clean = b["noisy"].to(rt.device, non_blocking=True), b["clean"].to(rt.device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], cfg)
        net.train()
        with rt.autocast():
            loss = torch.mean((net(noisy).float() - clean) ** 2)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            bad += 1  # a non-finite loss is skipped (and counted), never stepped on
        else:
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(opt) if scaler else opt.step()
            if scaler:
                scaler.update()
        state.update(step=state["step"] + 1, epoch=epoch, batch_in_epoch=index + 1,
                     samples=state["samples"] + noisy.shape[0] * dist.world_size,
                     skipped=state["skipped"] + int(b.get("skipped", 0)))
        win_n += noisy.shape[0] * dist.world_size
        step, last = state["step"], state["step"] == t.max_steps
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2e}", lr=f"{g['lr']:.1e}")
        if main and (step % t.log_every == 0 or last):
            now = time.perf_counter()
            tracker.log({"train/loss": loss.item(), "train/lr": g["lr"], "train/samples_per_s": win_n / (now - win_t),
                         "data/skipped": state["skipped"], "train/nonfinite_steps": bad, "epoch": epoch}, step=step)
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
            tracker.log(metrics, step=step)
            line = (f"[sparsefold] step {step}: val psnr {res['psnr']:.3f} dB, ssim {res['ssim']:.4f} "
                    f"({len(val)} images, {time.perf_counter() - t_start:.0f} s)")
            bar.write(line, file=sys.stderr) if bar is not None else print(line, file=sys.stderr, flush=True)
            tracker.log_images(model_panels(model, res["first"]), step=step)
        state["metrics"] = metrics
        if dist.report is not None:  # Ray: one report per validation, checkpoint attached on rank 0
            if do_val:
                with tempfile.TemporaryDirectory() as tmp:
                    path = save_checkpoint(Path(tmp) / "ckpt", model, cfg, state, opt) if main else None
                    dist.report({"step": step, **metrics, "val_psnr": metrics.get("val/psnr", float("nan"))}, path)
        elif main:
            last_ckpt = save_checkpoint(ckpt_dir / f"step_{step:07d}", model, cfg, state, opt)
            prune_checkpoints(ckpt_dir, t.keep_checkpoints)
    if bar is not None:
        bar.close()
    if main and not metrics and val:  # nothing left to train (resumed a finished run): still score it
        res = evaluate_images(model, val, cfg.noise, cfg.data.gray, rt.device)
        metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"]}
    tracker.finish()
    return {"checkpoint": str(last_ckpt) if last_ckpt else None, "run_dir": str(run_dir), "steps": state["step"],
            "seconds": round(time.perf_counter() - t_start, 2), "val_psnr": metrics.get("val/psnr"),
            "val_ssim": metrics.get("val/ssim"), "samples": state["samples"], "skipped": state["skipped"],
            "nonfinite_steps": bad, "params": count_parameters(model)}

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

Parts, each testable on its own (tests/test_loop_steps.py): :class:`TrainState` (what ``state.json``
holds), :func:`train_step`, :func:`roll_back`, :func:`checkpoint` (validation, health gate, checkpoint or
Ray report); :func:`train` strings them together, the objects of one run held in a :class:`Run`.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from sparsefold.config import ConfigError, OptimConfig, RunConfig, to_dict
from sparsefold.datasets import (
    PatchStream,
    check_shard_count,
    make_loader,
    skipped_while_sharding,
    train_urls,
    val_files,
)
from sparsefold.datasets.degrade import make_operator
from sparsefold.datasets.patches import stable_seed
from sparsefold.errors import RunError
from sparsefold.models import build_model, count_parameters
from sparsefold.models.contract import Checkpointed, CodeSparsity, Deepening, Projected
from sparsefold.runtime import Runtime, runtime_for
from sparsefold.trainers.checkpoint import (
    check_resume_config,
    load_initial_weights,
    load_training_state,
    save_checkpoint,
)
from sparsefold.trainers.console import Terminal, say, sink
from sparsefold.trainers.evaluate import evaluate_on_task
from sparsefold.trainers.losses import Objective
from sparsefold.trainers.provenance import code_version, file_set
from sparsefold.trainers.runlock import run_lock
from sparsefold.trainers.storage import (
    announce_resume,
    best_val_psnr,
    latest_checkpoint,
    prune_checkpoints,
    run_dir_of,
    step_dir_name,
)
from sparsefold.trainers.tracking import NullTracker, make_tracker, model_panels


@dataclass
class Dist:
    """What the runtime around the loop provides. The default is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # DDP wrapping (Ray: prepare_model)
    report: Callable[[dict, Path | None], None] | None = None  # Ray: ray.train.report with a checkpoint
    resume_from: Path | None = None  # Ray: the checkpoint get_checkpoint() restored


@dataclass
class TrainState:
    """Where a run stands: what every checkpoint's ``state.json`` holds (this class defines both), and
    what a rollback restores. A resumed run continues from it: step, data position, counters, lr scale."""

    step: int = 0  # steps taken, skipped ones included
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already used: where the data continues
    samples: int = 0  # training samples seen, all ranks
    skipped: int = 0  # unreadable samples the loader dropped
    seconds: float = 0.0  # wall time, resumed parts included
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    rollbacks: int = 0
    lr_scale: float = 1.0  # trainer.rollback_lr_factor ** rollbacks
    cpu_seconds: float = 0.0  # CPU time (see :class:`Clock`), resumed parts included
    metrics: dict[str, float] = field(default_factory=dict)  # the latest validation of this process

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        """From a ``state.json``: a key it lacks keeps its default (an older checkpoint), a key this class
        does not know is ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The ``state.json`` of a checkpoint."""
        return asdict(self)

    def advance(self, epoch: int, index: int, samples: int, skipped: int, finite: bool) -> None:
        """Count one step that used batch ``index`` of ``epoch`` (``samples`` over all ranks)."""
        self.step += 1
        self.epoch, self.batch_in_epoch = epoch, index + 1
        self.samples += samples
        self.skipped += skipped
        self.nonfinite_steps += int(not finite)


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


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """``optim.kind``: Adam (with ``eps``) or SGD with ``momentum``; ``weight_decay`` is an L2 term in both."""
    if o.kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers end with every epoch)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def batches(ds: PatchStream, loader: Any, epoch: int, skip: int) -> Generator[tuple[int, int, dict], None, None]:
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


def unhealthy(cfg: RunConfig, model: nn.Module, rt: Any, batch: tuple[Any, ...], streak: int,
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


def diverged(cfg: RunConfig, state: TrainState, streak: int, good_step: int, last_ckpt: Path | None) -> RunError:
    """The one-line error that ends a run after ``trainer.max_rollbacks`` rollbacks."""
    where = f" ({last_ckpt}, the newest checkpoint on disk)" if last_ckpt else ""
    return RunError(f"training diverged: {streak} consecutive non-finite steps at step {state.step} after "
                    f"{state.rollbacks} rollbacks (trainer.max_rollbacks={cfg.trainer.max_rollbacks}); last healthy "
                    f"state: step {good_step}{where}; lower optim.lr (now {cfg.optim.lr:g}) or set optim.grad_clip "
                    f"(now {cfg.optim.grad_clip:g}; e.g. 1)")


class Snapshot(NamedTuple):
    """In-memory copy of what a checkpoint holds (weights, optimizer, state): the rollback target."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: TrainState


def snapshot(model: nn.Module, opt: torch.optim.Optimizer, state: TrainState) -> Snapshot:
    """A :class:`Snapshot` of the current weights, optimizer and state (copies: later steps do not move it)."""
    return Snapshot({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
                    copy.deepcopy(state))


class StepResult(NamedTuple):
    """What one :func:`train_step` did."""

    loss: torch.Tensor  # the loss of the weights before the update
    finite: bool  # stepped: the loss and the gradients were finite on every rank
    grad_norm: float | None  # gradient norm before clipping; None when a non-finite loss skipped the backward


def train_step(net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Any, ...],
               lr: float, *, grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None,
               autocast: Callable[[], AbstractContextManager] = nullcontext, world_size: int = 1) -> StepResult:
    """One optimizer step at learning rate ``lr`` of ``net`` (the loss module around ``model``, DDP-wrapped
    under Ray) on ``batch`` = (noisy, clean, sigma): forward, backward, clip at ``grad_clip`` (0: no clipping),
    update, then the model's constraints (``project_``, e.g. CDLNet: τ ≥ 0, filters in the unit ball).

    A non-finite loss on any rank skips the backward, a finite loss with non-finite gradients the update
    (gradients are all-reduced: the same decision on every rank); either way the weights and the optimizer
    are untouched and the result says ``finite=False``. With fp16's ``scaler`` the scaler skips such steps."""
    for g in opt.param_groups:
        g["lr"] = lr
    net.train()
    with autocast():
        loss = net(*batch)  # loss.kind, see trainers/losses.py
    opt.zero_grad(set_to_none=True)
    if not all_finite(loss, world_size):
        return StepResult(loss, False, None)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
    if scaler:
        scaler.step(opt)
        scaler.update()
    elif math.isfinite(grad_norm):
        opt.step()
    else:
        return StepResult(loss, False, grad_norm)
    if isinstance(model, Projected):
        model.project_()
    return StepResult(loss, True, grad_norm)


def roll_back(model: nn.Module, opt: torch.optim.Optimizer, good: Snapshot, state: TrainState,
              lr_factor: float) -> TrainState:
    """Restore ``good``'s weights and optimizer into ``model`` and ``opt``; return its state (step, data
    position, ...) with the run's own counters carried over: ``nonfinite_steps`` and the latest validation
    ``metrics`` kept, one more rollback, ``lr_scale`` multiplied by ``lr_factor``."""
    model.load_state_dict(good.weights)
    opt.load_state_dict(copy.deepcopy(good.optimizer))  # a copy: the optimizer would share the tensors
    return replace(copy.deepcopy(good.state), nonfinite_steps=state.nonfinite_steps, metrics=state.metrics,
                   rollbacks=state.rollbacks + 1, lr_scale=state.lr_scale * lr_factor)


@dataclass
class Clock:
    """Wall and CPU seconds of a run, those of the processes it resumed from included."""

    cpu_base: float = 0.0  # CPU seconds of the resumed runs
    wall0: float = field(default_factory=time.perf_counter)  # when the run would have started, uninterrupted
    cpu0: float = field(default_factory=_cpu_seconds)
    window_t: float = field(default_factory=time.perf_counter)  # throughput window: start, samples since
    window_n: int = 0
    window_paused: float = 0.0  # seconds of the window spent outside training (validation, checkpoints)

    @classmethod
    def resumed(cls, state: TrainState) -> Clock:
        """Clocks starting now, continuing those of ``state``."""
        return cls(cpu_base=state.cpu_seconds, wall0=time.perf_counter() - state.seconds)

    def cpu(self) -> float:
        """CPU time of this process and its finished loader workers, plus the resumed runs'."""
        return self.cpu_base + _cpu_seconds() - self.cpu0

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def samples_per_s(self) -> float:
        """Training samples per second since the previous call, the time inside :meth:`paused` excluded;
        starts a new window."""
        now = time.perf_counter()
        rate = self.window_n / max(now - self.window_t - self.window_paused, 1e-9)
        self.window_t, self.window_n, self.window_paused = now, 0, 0.0
        return rate

    @contextmanager
    def paused(self) -> Generator[None, None, None]:
        """Time spent in this block (validation, checkpoint, report) is not training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.window_paused += time.perf_counter() - t0


@dataclass
class LossWindow:
    """``train/loss``: the mean loss over the steps of one logging window, summed on the device (no step waits
    for a ``.item()``); a non-finite step is left out (it is counted in ``train/nonfinite_steps``)."""

    total: torch.Tensor | None = None
    n: int = 0

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.total, self.n = (loss if self.total is None else self.total + loss), self.n + 1

    def mean(self) -> float:
        """The window's mean (NaN when every step of it was non-finite); starts a new window."""
        value = float(self.total) / self.n if self.total is not None and self.n else float("nan")
        self.total, self.n = None, 0
        return value


@dataclass
class Run:
    """One run's model, optimizer and state, and where its results go: what the parts of the loop share."""

    cfg: RunConfig
    dist: Dist
    rt: Runtime
    run_dir: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    state: TrainState
    good: Snapshot  # the rollback target: the last healthy checkpoint (or the start)
    last_ckpt: Path | None = None  # the newest checkpoint written (plain path) or resumed from
    resumed_from: int | None = None  # the step this process resumed at
    streak: int = 0  # non-finite steps in a row
    tracker: NullTracker = field(default_factory=NullTracker)
    val: list[Path] = field(default_factory=list)  # validation images (rank 0)
    provenance: dict[str, Any] = field(default_factory=dict)  # code version + validation set (rank 0)
    loss: LossWindow = field(default_factory=LossWindow)
    bar: Terminal | None = None  # where the progress bar is drawn (rank 0, trainer.progress): trainers/console.py
    clock: Clock = field(default_factory=Clock)

    @property
    def main(self) -> bool:
        return self.dist.rank == 0

    def say(self, line: str) -> None:
        """One ``[sparsefold]`` line on stderr (rank 0), above the progress bar if there is one."""
        if self.main:
            say(line)


def resume_point(cfg: RunConfig, run: str | Path, *, announce: bool = True) -> Path | None:
    """THE resume decision, of the plain loop and of the Ray driver: the checkpoint the run at ``run`` (its
    directory, or its root URL in storage) resumes from, or None for a fresh start. That is the newest
    valid checkpoint (storage.py:latest_checkpoint; a remote one is downloaded), refused with
    ``FileExistsError`` when ``trainer.resume=false`` and with ``InputError`` when ``cfg`` changes a
    trajectory setting of the stored run (:func:`check_resume_config`), then announced on stderr.

    Here rather than in storage.py because of that trajectory check, which reads configs the way the
    checkpoint loader does; storage.py stays free of torch."""
    latest = latest_checkpoint(run)
    if latest is None:
        return None
    if not cfg.trainer.resume:
        raise FileExistsError(f"{run} already holds checkpoints; pick another trainer.run_name or "
                              "set trainer.resume=true to continue it")
    check_resume_config(latest, cfg.to_dict())  # one trajectory per run directory
    if announce:
        announce_resume(str(run).rstrip("/").rsplit("/", 1)[-1], latest)
    return latest


def start(cfg: RunConfig, dist: Dist) -> Run:
    """Model and optimizer, resumed from the run's latest checkpoint (:func:`resume_point`) or, under Ray,
    from ``dist.resume_from``, else fresh."""
    t = cfg.trainer
    rt = runtime_for(cfg.runtime, dist.local_rank)  # device, autocast dtype, compile, channels-last
    run_dir = run_dir_of(cfg)
    # plain: decided here; Ray: the driver decided (resume_point) and rank 0 found the newest (ray_train.py)
    resume = dist.resume_from if dist.report is not None else resume_point(cfg, run_dir, announce=dist.rank == 0)
    torch.manual_seed(t.seed)
    fine_tune = resume is None and bool(t.init_from)
    model = build_model(cfg.model, init=resume is None and not fine_tune)  # else a checkpoint fills every weight
    if t.activation_checkpointing:  # validated: an unfolded model (models/contract.py Checkpointed)
        cast(Checkpointed, model).checkpoint_unfoldings = True
    if fine_tune:
        source = load_initial_weights(model, t.init_from)
        if dist.rank == 0:
            say(f"new run {run_dir.name} starts from the weights of {source}")
    model = rt.place(model)
    opt = make_optimizer(model, cfg.optim)
    state = TrainState()
    if resume is not None:
        state = replace(TrainState.from_dict(load_training_state(resume, model, opt)), metrics={})  # validate anew
    run = Run(cfg, dist, rt, run_dir, model, opt, state, snapshot(model, opt, state), last_ckpt=resume,
              resumed_from=state.step if resume is not None else None)
    return run


def open_data(cfg: RunConfig, dist: Dist) -> tuple[PatchStream, int]:
    """This rank's training stream, and the number of images left out of the shards (``data/skipped``)."""
    urls = train_urls(cfg.data)
    check_shard_count(urls, dist.world_size, cfg.data.num_workers, cfg.data.resampled)
    ds = PatchStream(urls, cfg.data, cfg.noise, seed=cfg.trainer.seed, rank=dist.rank, world_size=dist.world_size,
                     task=cfg.task)
    return ds, skipped_while_sharding(urls)


def open_outputs(run: Run) -> None:
    """Rank 0: validation images, ``config.json`` and ``provenance.json`` (code version, the validation images
    resolved), the W&B run (every rank gets a tracker), progress bar."""
    cfg, t = run.cfg, run.cfg.trainer
    run.val = val_files(cfg.data)[: cfg.data.val_images] if run.main else []
    run.provenance = {**code_version(), "val_set": file_set(run.val, cfg.data.val)} if run.main else {}
    resumed = run.resumed_from is not None
    run.tracker = make_tracker(cfg, run.dist.rank, run.run_dir, run.run_dir.name, resumed, run.provenance,
                               best_val_psnr(run.run_dir) if resumed and run.main else float("-inf"))
    if not run.main:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    (run.run_dir / "provenance.json").write_text(json.dumps(run.provenance, indent=1))
    run.tracker.log({"model/params": count_parameters(run.model)}, step=run.state.step)
    if t.progress:
        run.bar = sink()
        run.bar.open_bar(t.max_steps, run.state.step, run.run_dir.name)


def use_depth(run: Run, depth: int | None) -> None:
    """Switch the model to ``depth`` unfoldings (``trainer.depth_stages``) when it runs another depth."""
    model = run.model
    if depth is not None and isinstance(model, Deepening) and depth != model.depth:
        model.set_depth(depth)  # incremental depth: the deeper model warm-starts from the shorter one
        run.say(f"step {run.state.step}: unfolding depth {depth}")


def rollback(run: Run) -> None:
    """``trainer.rollback_after`` non-finite steps in a row: back to the last healthy checkpoint at
    ``trainer.rollback_lr_factor`` × the learning rate, or the run ends after ``trainer.max_rollbacks``."""
    t, bad = run.cfg.trainer, run.state
    if bad.rollbacks >= t.max_rollbacks:
        raise diverged(run.cfg, bad, run.streak, run.good.state.step, run.last_ckpt if run.dist.report is None else None)
    run.state, run.streak = roll_back(run.model, run.opt, run.good, bad, t.rollback_lr_factor), 0
    if run.main:
        run.tracker.log({"train/" + k: getattr(run.state, k) for k in ("nonfinite_steps", "rollbacks", "lr_scale")},
                        step=bad.step)
    run.say(f"step {bad.step}: {t.rollback_after} consecutive non-finite steps; rolled back "
            f"to step {run.state.step}, lr scale {run.state.lr_scale:g}")
    if run.bar is not None:
        run.bar.move_to(run.state.step)


def log_step(run: Run, lr: float, grad_norm: float, epoch: int, depth: int | None, unreadable: int) -> None:
    """The ``train/*`` metrics of this step (rank 0, every ``trainer.log_every`` steps and the last):
    ``train/loss`` and ``train/samples_per_s`` over the window since the previous log (:class:`LossWindow`,
    :meth:`Clock.samples_per_s`), the others as they stand now."""
    s = run.state
    run.tracker.log({"train/loss": run.loss.mean(), "train/lr": lr, "train/samples_per_s": run.clock.samples_per_s(),
                     "train/grad_norm": grad_norm, "data/skipped": s.skipped + unreadable,
                     "train/nonfinite_steps": s.nonfinite_steps, "train/rollbacks": s.rollbacks,
                     "train/lr_scale": s.lr_scale, "epoch": epoch, **({"model/depth": depth} if depth else {})},
                    step=s.step)


def validate(run: Run) -> dict[str, float]:
    """Rank 0: score the validation images; log PSNR/SSIM, a per-image PSNR table, code sparsity, unfolding
    parameters and image panels; print one line. Returns the ``val/*`` metrics."""
    model, cfg, step = run.model, run.cfg, run.state.step
    res = evaluate_on_task(model, run.val, cfg.task, cfg.noise, cfg.data.gray, run.rt.device, keep_first=True)
    metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"], "val/input_psnr": res["input_psnr"]}
    if isinstance(model, CodeSparsity):
        sp = model.code_sparsity(res["first"][0].unsqueeze(0).to(run.rt.device))
        metrics.update({f"codes/nonzero_t{i}": v for i, v in enumerate(sp)})
    run.tracker.log({**metrics, **unfolding_metrics(model)}, step=step)
    run.tracker.log_table("val/per_image", ["file", "psnr"], [[r["file"], r["psnr"]] for r in res["per_image"]],
                          step=step)
    run.say(f"step {step}: val psnr {res['psnr']:.3f} dB, ssim {res['ssim']:.4f} "
            f"({len(run.val)} images, {run.clock.wall():.0f} s)")
    run.tracker.log_images(model_panels(model, res["first"], cfg.task.kind != "denoise"), step=step)
    return metrics


def checkpoint(run: Run, batch: tuple[Any, ...], validate_first: bool = False) -> None:
    """Validate first if asked (rank 0), then checkpoint the current state if it is healthy
    (:func:`unhealthy`, judged on this step's ``batch``) and make it the rollback target; otherwise say why
    not and keep the old target.

    Plain path: rank 0 writes ``<run>/step_<n>`` and prunes old ones. Ray: every rank reports
    (a barrier), rank 0 with the checkpoint attached; Ray Train copies it into its storage. Either way the
    tracker logs the checkpoint as a W&B artifact (a no-op but on rank 0)."""
    cfg, dist, state = run.cfg, run.dist, run.state
    state.seconds, state.cpu_seconds = run.clock.wall(), run.clock.cpu()
    if validate_first and run.main and run.val:
        state.metrics = validate(run)
    why = unhealthy(cfg, run.model, run.rt, batch, run.streak, dist.world_size)
    if why:
        run.say(f"step {state.step}: not checkpointed ({why}); the rollback target stays step {run.good.state.step}")
    extra = {"provenance": run.provenance}
    if dist.report is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = None
            if run.main and not why:
                path = save_checkpoint(Path(tmp) / "ckpt", run.model, cfg, state.to_dict(), run.opt, extra)
                run.tracker.log_checkpoint(path, state.step, state.metrics, validate_first)
            dist.report({"step": state.step, **state.metrics, "val_psnr": state.metrics.get("val/psnr", float("nan"))},
                        path)
    elif run.main and not why:
        run.last_ckpt = save_checkpoint(run.run_dir / step_dir_name(state.step), run.model, cfg, state.to_dict(),
                                        run.opt, extra)
        run.tracker.log_checkpoint(run.last_ckpt, state.step, state.metrics, validate_first)
        prune_checkpoints(run.run_dir, cfg.trainer.keep_checkpoints)
    if not why:
        run.good = snapshot(run.model, run.opt, state)  # every rank: the target is what was just checkpointed


def finish(run: Run, unreadable: int) -> dict[str, Any]:
    """Close the bar and the tracker; the result: {checkpoint, steps, seconds, val_psnr, ...}. A run with
    nothing left to train (a finished run resumed) is still scored."""
    if run.bar is not None:
        run.bar.close()
    s, metrics = run.state, run.state.metrics
    if run.main and not metrics and run.val:
        res = evaluate_on_task(run.model, run.val, run.cfg.task, run.cfg.noise, run.cfg.data.gray, run.rt.device)
        metrics = {"val/psnr": res["psnr"], "val/ssim": res["ssim"]}
    run.tracker.finish()
    return {"checkpoint": str(run.last_ckpt) if run.last_ckpt else None, "run_dir": str(run.run_dir), "steps": s.step,
            "seconds": round(run.clock.wall(), 2), "val_psnr": metrics.get("val/psnr"),
            "val_ssim": metrics.get("val/ssim"), "samples": s.samples, "skipped": s.skipped + unreadable,
            "nonfinite_steps": s.nonfinite_steps, "rollbacks": s.rollbacks, "lr_scale": s.lr_scale,
            "resumed_from_step": run.resumed_from, "params": count_parameters(run.model),
            "cpu_seconds": round(run.clock.cpu(), 1)}


def train(cfg: RunConfig, dist: Dist | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``trainer.max_steps`` (or its CPU budget); returns {checkpoint, steps, seconds,
    val_psnr, ...}. Rank 0 of the plain path holds the run lock (trainers/runlock.py) for the whole run,
    taken before anything in the run directory is read or written; under Ray the driver holds it."""
    dist, t = dist or Dist(), cfg.trainer
    with run_lock(run_dir_of(cfg)) if dist.report is None and dist.rank == 0 else nullcontext():
        run = start(cfg, dist)  # model, optimizer, resumed state
        net = run.rt.compiled(dist.wrap(Objective(run.model, cfg.loss, cfg.noise)))  # DDP wraps model + loss
        ds, unreadable = open_data(cfg, dist)
        stream = batches(ds, make_loader(ds, cfg.data), run.state.epoch, run.state.batch_in_epoch)
        open_outputs(run)  # validation images, W&B, config.json, progress bar
        run.clock, scaler, grad_norm, progress = Clock.resumed(run.state), run.rt.grad_scaler, float("nan"), None
        while run.state.step < t.max_steps and progress != 1.0:
            epoch, index, b = next(stream)
            torch.manual_seed(stable_seed("step", t.seed, dist.rank, run.state.step))  # randomness = f(step): resumable
            batch = tuple(b[k].to(run.rt.device, non_blocking=True) for k in ("noisy", "clean", "sigma"))
            if "op" in b:  # a restoration task: the operator of this batch's measurements (datasets/degrade.py)
                op_name, op_params = b["op"]
                batch = (*batch, make_operator(op_name, op_params, run.rt.device))
            progress = budget_progress(run.state.step, run.clock.cpu(), cfg, dist.world_size)
            depth = depth_at(run.state.step, cfg, progress)
            use_depth(run, depth)
            lr = lr_at(run.state.step, cfg, progress) * run.state.lr_scale  # lr_scale < 1 after rollbacks
            res = train_step(net, run.model, run.opt, batch, lr, grad_clip=cfg.optim.grad_clip, scaler=scaler,
                             autocast=run.rt.autocast, world_size=dist.world_size)
            grad_norm = grad_norm if res.grad_norm is None else res.grad_norm
            n = len(batch[0]) * dist.world_size
            run.state.advance(epoch, index, n, int(b.get("skipped", 0)), res.finite)
            run.clock.window_n += n
            if res.finite:
                run.loss.add(res.loss)
            run.streak = 0 if res.finite else run.streak + 1
            if t.rollback_after and run.streak >= t.rollback_after:  # K bad steps in a row: the last checkpoint
                rollback(run)
                stream.close()  # the checkpoint's data position: the same batches again, at a lower lr
                stream = batches(ds, make_loader(ds, cfg.data), run.state.epoch, run.state.batch_in_epoch)
                continue
            step, last = run.state.step, run.state.step == t.max_steps or progress == 1.0  # steps or budget spent
            if run.bar is not None:
                run.bar.advance(1, {"loss": f"{res.loss.item():.2e}", "lr": f"{lr:.1e}"})
            if run.main and (step % t.log_every == 0 or last):
                log_step(run, lr, grad_norm, epoch, depth, unreadable)
            do_val = step % t.val_every == 0 or last
            if do_val or step % t.ckpt_every == 0:
                with run.clock.paused():  # not training time (train/samples_per_s)
                    checkpoint(run, batch, validate_first=do_val)
        return finish(run, unreadable)

"""Typed, frozen run configuration, validated before any cluster resource is requested.

A run is described by one :class:`RunConfig` made of one frozen dataclass per component
(``data``, ``noise``, ``model``, ``optim``, ``trainer``, ``wandb``). It is built from a YAML file
plus dotted ``key=value`` overrides (``model.depth=8 trainer.max_steps=50``); an unknown key, a
wrong type or an impossible value raises :class:`ConfigError` with one line naming the field.

The ``model`` section's fields depend on ``model.name``: each registered model brings its own
frozen config dataclass (see :data:`sparsefold.models.MODELS`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# ConfigError and check live in the import-free errors module (the model files use them); importing them
# here keeps ``from sparsefold.config import ConfigError, check`` working.
from sparsefold.errors import ConfigError, check
from sparsefold.models import MODELS  # plain data: torch only once a model's .config/.module is used
from sparsefold.models.contract import Likelihood, Multilayer, NoiseChecked


def is_url(path: str) -> bool:
    """``scheme://...`` (s3://, gs://, file://, ...), as opposed to a filesystem path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def split_spec(spec: str) -> list[str]:
    """The parts of a shard list (``data.train``): split on ``::`` and on commas outside ``{...}`` brace
    expressions. The one parser of that syntax (datasets/shards.py expands the parts, trainers/storage.py
    makes them absolute)."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for part in spec.split("::"):
        for ch in part:
            depth += ch == "{"
            depth -= ch == "}"
            if ch == "," and depth == 0:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        parts.append("".join(cur))
        cur, depth = [], 0
    return [p.strip() for p in parts if p.strip()]


def spec_options(spec: str) -> list[str]:
    """The fallbacks of a data spec (``data.val``: ``A|B``, the first that exists is used), stripped, empty
    ones dropped; a ``pipe:`` spec is one option (its shell command may hold ``|``). The one parser of that
    syntax (datasets/prepare.py picks the option, trainers/storage.py makes them absolute, the preflight and
    ``launch`` check them)."""
    if str(spec).startswith("pipe:"):
        return [str(spec)]
    return [o.strip() for o in str(spec).split("|") if o.strip()]


PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # trainer.precision; mapping in sparsefold/runtime.py


@dataclass(frozen=True, kw_only=True)
class NoiseConfig:
    """Noise synthesized on the fly, per sample.

    ``gaussian``: y = x + σ/255·n, σ fixed, or σ ~ U[sigma, sigma_max] per image when ``sigma_max`` is set.
    ``poisson``:  y = Poisson(peak·x) / peak.   ``binomial``: y = Binomial(trials, x) / trials.
    """

    kind: str = "gaussian"
    sigma: float = 25.0
    sigma_max: float | None = None
    peak: float = 4.0
    trials: int = 1

    def __post_init__(self) -> None:
        check(self.kind in ("gaussian", "poisson", "binomial"), "kind", f"unknown noise kind {self.kind!r}")
        check(self.sigma >= 0, "sigma", f"must be >= 0, got {self.sigma}")
        if self.sigma_max is not None:
            check(self.sigma_max >= self.sigma, "sigma_max", f"must be >= sigma ({self.sigma}), got {self.sigma_max}")
        check(self.peak > 0, "peak", f"must be > 0, got {self.peak}")
        check(self.trials >= 1, "trials", f"must be >= 1, got {self.trials}")

    def at_evaluation(self) -> NoiseConfig:
        """The noise evaluation draws: a σ range collapses to its middle (the shared evaluation convention)."""
        if self.sigma_max is None:
            return self
        return dataclasses.replace(self, sigma=0.5 * (self.sigma + self.sigma_max), sigma_max=None)

    @property
    def eval_sigma(self) -> float:
        """The σ (0..255) of the evaluation noise; 0 for Poisson/Binomial data."""
        return self.at_evaluation().sigma if self.kind == "gaussian" else 0.0


TASKS = ("denoise", "inpaint", "deblur", "sr", "csmri")
_IF_SET: dict[str, Any] = {"run_name": "if_set"}  # a run's name keeps its hash while the task is denoising


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """The forward operator A of y = A x + n (n: the ``noise`` section), drawn per sample
    (models/operators.py; datasets/degrade.py). ``denoise``: A = I.

    ``inpaint``: pixels kept with probability ``keep`` (``mask=random``), or ``holes`` square holes of
    ``block`` pixels (``mask=blocks``). ``deblur``: a ``kernel_size`` kernel, ``gaussian`` (std ``blur_sigma``
    px) or ``motion`` (a line of ``motion_length`` px at a uniform random angle), ``boundary`` circular or
    reflect. ``sr``: ×``factor`` down-sampling after a ``filter`` (box / bicubic) anti-alias filter.
    ``csmri``: single-coil k-space sampled at ``rate`` by a ``sampling`` mask (cartesian: variable density,
    random per sample; radial), complex measurements (gray images only)."""

    kind: str = field(default="denoise", metadata=_IF_SET)
    keep: float = field(default=0.5, metadata=_IF_SET)
    mask: str = field(default="random", metadata=_IF_SET)
    block: int = field(default=16, metadata=_IF_SET)
    holes: int = field(default=1, metadata=_IF_SET)
    kernel: str = field(default="gaussian", metadata=_IF_SET)
    kernel_size: int = field(default=15, metadata=_IF_SET)
    blur_sigma: float = field(default=1.6, metadata=_IF_SET)
    motion_length: float = field(default=9.0, metadata=_IF_SET)
    boundary: str = field(default="circular", metadata=_IF_SET)
    factor: int = field(default=2, metadata=_IF_SET)
    filter: str = field(default="bicubic", metadata=_IF_SET)
    rate: float = field(default=0.2, metadata=_IF_SET)
    sampling: str = field(default="cartesian", metadata=_IF_SET)

    def __post_init__(self) -> None:
        check(self.kind in TASKS, "kind", f"must be one of {', '.join(TASKS)}, got {self.kind!r}")
        check(0 < self.keep <= 1, "keep", f"must be in (0, 1], got {self.keep}")
        check(self.mask in ("random", "blocks"), "mask", f"must be random or blocks, got {self.mask!r}")
        check(self.block >= 1 and self.holes >= 1, "block" if self.block < 1 else "holes", "must be >= 1")
        check(self.kernel in ("gaussian", "motion"), "kernel", f"must be gaussian or motion, got {self.kernel!r}")
        check(self.kernel_size >= 3 and self.kernel_size % 2 == 1, "kernel_size",
              f"must be odd and >= 3, got {self.kernel_size}")
        check(self.blur_sigma > 0, "blur_sigma", f"must be > 0, got {self.blur_sigma}")
        check(self.kernel != "motion" or 1 <= self.motion_length <= self.kernel_size - 1, "motion_length",
              f"must be in [1, kernel_size - 1 = {self.kernel_size - 1}], got {self.motion_length}")
        check(self.boundary in ("circular", "reflect"), "boundary", f"must be circular or reflect, got {self.boundary!r}")
        check(self.factor in (2, 3, 4), "factor", f"must be 2, 3 or 4, got {self.factor}")
        check(self.filter in ("box", "bicubic"), "filter", f"must be box or bicubic, got {self.filter!r}")
        check(0 < self.rate <= 1, "rate", f"must be in (0, 1], got {self.rate}")
        check(self.sampling in ("cartesian", "radial"), "sampling",
              f"must be cartesian or radial, got {self.sampling!r}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where images come from and how they are cut.

    ``train`` is a WebDataset shard URL (``dir/train-{000000..000009}.tar``, ``file://``, ``s3://``,
    ``gs://`` through fsspec), a folder holding shards (its ``index.json``), an image folder (shards
    are built once into ``cache_dir``), or ``builtin:skimage`` (scikit-image's bundled photos).
    ``val`` is an image folder (or ``builtin:skimage``) scored on whole images with seeded noise.
    """

    train: str = "builtin:skimage"
    val: str = "builtin:skimage"
    val_images: int = 4
    patch_size: int = 128
    batch_size: int = 4
    num_workers: int = 1
    shuffle_buffer: int = 64
    crops_per_image: int = 1
    resampled: bool = False
    epoch_batches: int = 0
    gray: bool = True
    allow_pipe: bool = False
    shard_size: int = 100
    cache_dir: str = ""

    def __post_init__(self) -> None:
        check(bool(self.train), "train", "must name shards, an image folder or builtin:skimage")
        check(self.patch_size >= 16, "patch_size", f"must be >= 16, got {self.patch_size}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.val_images >= 0, "val_images", f"must be >= 0, got {self.val_images}")
        check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        check(self.crops_per_image >= 1, "crops_per_image", f"must be >= 1, got {self.crops_per_image}")
        check(self.epoch_batches >= 0, "epoch_batches", f"must be >= 0, got {self.epoch_batches}")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        if self.train.startswith("pipe:"):
            check(self.allow_pipe, "train", "pipe: URLs run a shell command; set data.allow_pipe=true to allow them")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Adam (``kind=adam``) or SGD with momentum (``kind=sgd``), with a warm-up and a cosine / step / constant
    schedule. ``eps`` is Adam's; ``momentum`` SGD's; ``weight_decay`` is an L2 term in both."""

    kind: str = field(default="adam", metadata={"run_name": "if_set"})  # added in 0.1: see storage
    momentum: float = field(default=0.9, metadata={"run_name": "if_set"})  # ditto
    lr: float = 1e-3
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    step_size: int = 1000
    gamma: float = 0.5
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        check(self.kind in ("adam", "sgd"), "kind", f"unknown optimizer {self.kind!r} (valid: adam, sgd)")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.schedule in ("constant", "cosine", "step"), "schedule", f"unknown schedule {self.schedule!r}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.step_size >= 1, "step_size", f"must be >= 1, got {self.step_size}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Training objective on the final reconstruction x̂ (and the intermediate ones for ``multilayer``).

    ``mse``: mean (x̂ − x)².  ``l1``: mean |x̂ − x|.  ``ssim_mixed``: α·(1 − SSIM) + (1 − α)·L1 with
    α = ``ssim_weight`` (Zhao et al. 2017).  ``multilayer``: Σ_t w_t·MSE(x̂_t, x) / Σ_t w_t over the
    unfoldings, w_t = ``layer_decay``^(T−1−t) (the last layer weighs 1).  ``nll``: unsupervised, no clean
    target: the noise model's negative log-likelihood of the noisy input under the model's natural
    parameter η (needs a model with ``natural``; Gaussian / Poisson / Binomial from ``noise.kind``).
    ``log_mse``: log10 of the batch's MSE (LIDIA's objective; its gradient is the MSE's over MSE·ln 10).
    """

    kind: str = "mse"
    ssim_weight: float = 0.84
    layer_decay: float = 0.5

    def __post_init__(self) -> None:
        check(self.kind in LOSSES, "kind", f"unknown loss {self.kind!r} (valid: {', '.join(LOSSES)})")
        check(0 <= self.ssim_weight <= 1, "ssim_weight", f"must be in [0, 1], got {self.ssim_weight}")
        check(0 < self.layer_decay <= 1, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")


LOSSES = ("mse", "l1", "ssim_mixed", "multilayer", "nll", "log_mse")
# evaluation conventions (trainers/evaluate.py): the shared one, and the DCEA code's Poisson convention
EVAL_CONVENTIONS = ("shared", "dcea")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """How long and how often: steps, validation, checkpoints, rollback after divergence, where the run's
    files go and under which name, the seed, an optional depth schedule / CPU-time budget, and the weights a
    fine-tuning run starts from (``init_from``: a checkpoint directory, its model.safetensors, a run
    directory (its newest checkpoint) or a bundled model's name; not a resume: new optimizer, step 0)."""

    max_steps: int = 1000
    val_every: int = 200
    ckpt_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 3
    rollback_after: int = 10  # K consecutive non-finite steps -> back to the last checkpoint (0: never)
    rollback_lr_factor: float = 0.5  # the learning rate is multiplied by this at each rollback
    max_rollbacks: int = 5  # then the run stops with an error instead of looping
    output_dir: str = "runs"  # a path; or a URL (s3://, gs://, file://) with ray.enabled=true
    run_name: str = ""
    resume: bool = True
    seed: int = 0
    progress: bool = True
    depth_stages: tuple[int, ...] = ()
    budget_cpu_seconds: float = 0.0
    init_from: str = ""  # fine-tuning: a new run starts from this checkpoint's weights (new optimizer, step 0)
    # recompute each unfolding in the backward pass instead of storing it (unfolded models: models/unfolding.py)
    activation_checkpointing: bool = field(default=False, metadata={"run_name": "if_set"})  # added in 0.1

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.val_every >= 1, "val_every", f"must be >= 1, got {self.val_every}")
        check(self.ckpt_every >= 1, "ckpt_every", f"must be >= 1, got {self.ckpt_every}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.keep_checkpoints >= 0, "keep_checkpoints", f"must be >= 0 (0 keeps all), got {self.keep_checkpoints}")
        check(self.rollback_after >= 0, "rollback_after", f"must be >= 0 (0: never roll back), got {self.rollback_after}")
        check(0 < self.rollback_lr_factor <= 1, "rollback_lr_factor", f"must be in (0, 1], got {self.rollback_lr_factor}")
        check(self.max_rollbacks >= 0, "max_rollbacks", f"must be >= 0, got {self.max_rollbacks}")
        check("/" not in self.run_name, "run_name", "must not contain '/'")
        check(all(d >= 1 for d in self.depth_stages) and list(self.depth_stages) == sorted(set(self.depth_stages)),
              "depth_stages", f"must be increasing depths >= 1, got {list(self.depth_stages)}")
        check(len(self.depth_stages) <= self.max_steps, "depth_stages", "more stages than max_steps")
        check(self.budget_cpu_seconds >= 0, "budget_cpu_seconds", f"must be >= 0 (0: no budget), got {self.budget_cpu_seconds}")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Where and how each training process computes; sparsefold/runtime.py maps it to a device and an
    autocast dtype (its module docstring has the table). ``precision=fp32`` means no autocast."""

    use_gpu: bool = False
    precision: str = "auto"  # autocast dtype: auto | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the training module
    channels_last: bool = False  # channels-last weights (GPU convolutions)
    fused: bool = True  # compiled (fused) soft-threshold kernels on large code maps (models/prox.py)
    threads: int = 0  # torch intra-op threads per process (0: torch's default)

    def __post_init__(self) -> None:
        check(self.precision in PRECISIONS, "precision", f"unknown {self.precision!r} (valid: {', '.join(PRECISIONS)})")
        check(self.use_gpu or self.precision != "fp16", "precision", "fp16 needs runtime.use_gpu=true (on CPU: bf16 or fp32)")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Ray Train DDP (``enabled``): ``workers`` training processes (one GPU each with runtime.use_gpu), each
    reserving ``cpus_per_worker`` CPUs; ``max_failures`` restarts from the latest checkpoint (-1: forever)."""

    enabled: bool = False
    workers: int = 1
    cpus_per_worker: float = 1.0
    max_failures: int = 0

    def __post_init__(self) -> None:
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.workers == 1 or self.enabled, "workers", "more than 1 worker needs ray.enabled=true")
        check(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1 retries forever), got {self.max_failures}")


def check_sections(trainer: TrainerConfig, ray: RayConfig) -> None:
    """Checks across the sections that need no model (run with the rest of the preflight)."""
    check(ray.enabled or not is_url(trainer.output_dir), "trainer.output_dir",
          f"{trainer.output_dir} is a URL: the plain path writes a local/NFS directory; set ray.enabled=true "
          "(Ray Train uploads checkpoints to URLs) or give a path")


# Keys of older configs (and of the checkpoints they wrote), read as their new names; a config file or an
# override that uses one gets a one-line deprecation notice on stderr. ``trainer.amp`` has no new name:
# amp=false was fp32 (runtime.precision=fp32), amp=true the default.
RENAMED = {
    "trainer.use_ray": "ray.enabled",
    "trainer.workers": "ray.workers",
    "trainer.cpus_per_worker": "ray.cpus_per_worker",
    "trainer.max_failures": "ray.max_failures",
    "trainer.use_gpu": "runtime.use_gpu",
    "trainer.precision": "runtime.precision",
    "trainer.compile": "runtime.compile",
    "trainer.channels_last": "runtime.channels_last",
    "trainer.threads": "runtime.threads",
}


def deprecated(message: str) -> None:
    print(f"[sparsefold] deprecated: {message}", file=sys.stderr, flush=True)


def renamed_key(key: str, value: Any, notify: bool) -> tuple[str | None, Any]:
    """The current name of the dotted ``key`` and its value (None: the key is dropped). ``notify``: say so."""
    if key == "trainer.amp":
        amp = _coerce(value, bool, key)
        if notify:
            deprecated(f"trainer.amp={str(amp).lower()}: use runtime.precision "
                       f"({'auto' if amp else 'fp32'}; fp32 means no autocast)")
        return (None, None) if amp else ("runtime.precision", "fp32")
    if key in RENAMED:
        if notify:
            deprecated(f"{key} is now {RENAMED[key]} (read as such; the old name will be removed)")
        return RENAMED[key], value
    return key, value


def migrate(d: dict[str, Any], notify: bool = False) -> dict[str, Any]:
    """``d`` (a raw config mapping) with its old keys under their new names. A key given under both names
    is refused (one ConfigError naming both). ``notify``: a deprecation line per old key (user input, not
    the config.json of an old checkpoint)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (d or {}).items()}
    trainer = out.get("trainer")
    if not isinstance(trainer, dict):
        return out
    old = sorted((n for n in trainer if f"trainer.{n}" in RENAMED or n == "amp"), key=lambda n: n == "amp")
    for name in old:  # amp last: amp=false agrees with a precision of auto (what it meant) or fp32
        new, value = renamed_key(f"trainer.{name}", trainer.pop(name), notify)
        if new is None:
            continue
        section, field_name = new.split(".")
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping, got {target!r}")
        agrees = target.get(field_name, value) == value or (name == "amp" and target[field_name] == "auto")
        if not agrees:
            raise ConfigError(f"{new}: given twice, also as trainer.{name} (its old name); keep {new}")
        target[field_name] = value
    return out


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """W&B logging from rank 0. ``auto``: online when WANDB_API_KEY is set, offline otherwise. ``log_model``:
    each checkpoint as a ``model`` artifact (aliases latest / best / step-N), as Lightning's ``log_model="all"``;
    false keeps checkpoints out of W&B (metrics, images and tables are still logged)."""

    mode: str = "auto"
    project: str = "sparsefold"
    entity: str = ""
    group: str = ""
    tags: tuple[str, ...] = ()
    log_model: bool = True

    def __post_init__(self) -> None:
        check(self.mode in ("auto", "online", "offline", "disabled"), "mode", f"unknown mode {self.mode!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole run. ``model`` is the config dataclass of the model named by ``model.name``."""

    model: Any
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        """Checks across sections: what the model can do vs the loss, the noise and the trainer."""
        check_sections(self.trainer, self.ray)
        channels = getattr(self.model, "channels", 1)  # every zoo model has it; 1 = gray, 3 = colour
        check(channels == (1 if self.data.gray else 3), "data.gray",
              f"model.channels={channels} needs {'gray' if channels == 1 else 'colour'} images: set "
              f"data.gray={'true' if channels == 1 else 'false'} (or model.channels={1 if self.data.gray else 3})")
        module = MODELS[self.model.name].module if self.model.name in MODELS else None
        if isinstance(self.model, NoiseChecked):
            self.model.check_noise(self.noise)  # e.g. a Poisson DCEA on Gaussian data
        if self.loss.kind == "multilayer" and module is not None:
            check(issubclass(module, Multilayer), "loss.kind",
                  f"multilayer needs intermediate reconstructions; model {self.model.name!r} has none")
        if self.loss.kind == "nll" and module is not None:
            check(issubclass(module, Likelihood), "loss.kind",
                  f"nll (unsupervised) needs a likelihood model (dcea_c, dcea_uc); {self.model.name!r} has none")
        self.check_task(module)
        if self.trainer.depth_stages:
            # Deepening has a data member (depth), which issubclass() cannot check on a class
            check(module is not None and callable(getattr(module, "set_depth", None)), "trainer.depth_stages",
                  f"model {self.model.name!r} has no set_depth (not an unfolded model)")
            depth = getattr(self.model, "depth", None)
            check(self.trainer.depth_stages[-1] == depth, "trainer.depth_stages",
                  f"the last stage must equal model.depth={depth}, got {list(self.trainer.depth_stages)}")
        if self.trainer.activation_checkpointing:  # a class attribute (models/contract.py Checkpointed)
            check(module is not None and hasattr(module, "checkpoint_unfoldings"), "trainer.activation_checkpointing",
                  f"model {self.model.name!r} is not an unfolded model: it has no unfoldings to checkpoint")

    def check_task(self, module: type | None) -> None:
        """A restoration task needs a model that takes the operator, Gaussian noise (added to A x) and a
        pixel loss; MRI is gray, super-resolution crops divide by the factor."""
        task = self.task
        if task.kind == "denoise":
            return
        if module is None or not getattr(module, "takes_operator", False):  # the list imports every model file
            restorers = ", ".join(n for n, e in MODELS.items() if getattr(e.module, "takes_operator", False))
            check(False, "task.kind", f"{task.kind} needs a model that takes the forward operator ({restorers}); "
                  f"{self.model.name!r} does not")
        kinds = getattr(module, "task_kinds", None)
        check(kinds is None or task.kind in kinds, "task.kind",
              f"model {self.model.name!r} serves task.kind {', '.join(kinds or ())}, not {task.kind}")
        check(self.noise.kind == "gaussian", "noise.kind",
              f"task.kind={task.kind} adds Gaussian noise to A x; got {self.noise.kind!r}")
        check(self.loss.kind not in ("nll", "multilayer"), "loss.kind",
              f"task.kind={task.kind} trains with a pixel loss (mse, l1, ssim_mixed, log_mse), not {self.loss.kind}")
        check(task.kind != "csmri" or self.data.gray, "data.gray", "task.kind=csmri: single-coil MRI is gray")
        check(task.kind != "sr" or self.data.patch_size % task.factor == 0, "data.patch_size",
              f"must be divisible by task.factor={task.factor}, got {self.data.patch_size}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        return run_config_from_dict(d)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "noise": NoiseConfig,
    "task": TaskConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "trainer": TrainerConfig,
    "runtime": RuntimeConfig,
    "ray": RayConfig,
    "wandb": WandbConfig,
}


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML-able dict of a (nested) config dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; accept ints for floats and strings from the CLI."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (inner, *_rest) = typing.get_args(tp) or (str,)
        return tuple(_coerce(v, inner, name) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                pass
        if number is None:
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(number):  # inf/nan pass every `>= 0` check below and train on garbage
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def dataclass_from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    """Build the frozen dataclass ``cls`` from ``d``; errors name ``<prefix>.<field>``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names, key=str)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}") from None


def sections_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """The sections other than ``model``, validated: {section: dataclass}. Imports no torch, so a bad
    key or value there fails in milliseconds (the model section needs the model registry)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {d!r}")
    d = migrate(d)
    unknown = sorted(set(d) - set(SECTIONS) - {"model"}, key=str)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (valid: model, {', '.join(SECTIONS)})")
    sections = {key: dataclass_from_dict(cls, d.get(key) or {}, key) for key, cls in SECTIONS.items()}
    check_sections(sections["trainer"], sections["ray"])
    return sections


def run_config_from_dict(d: dict[str, Any]) -> RunConfig:
    sections = sections_from_dict(dict(d or {}))
    model = d.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    name = model.get("name", "cscnet")
    if not isinstance(name, str) or name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r} (registered: {', '.join(sorted(MODELS))})")
    model = {**model, "name": name}
    return RunConfig(model=dataclass_from_dict(MODELS[name].config, model, "model"), **sections)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML scalars)."""
    d = migrate(d)  # a dict saved before the trainer/runtime/ray split (e.g. a sweep's base): its old keys first
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{key!r}: overrides look like section.key=value")
        try:
            value = parse_yaml(raw, f"the value of {key}") if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        new, value = renamed_key(".".join(parts), value, notify=True)
        if new is None:
            continue
        parts = new.split(".")
        section = d.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"{parts[0]}: expected a mapping")
        if parts[0] == "model" and parts[1] == "name" and section.get("name") not in (None, value):
            section = d[parts[0]] = {}  # a different model: its fields start from its defaults
        section[parts[1]] = value
    return d


def _refuse_duplicates(node: yaml.Node, path: str, source: str, done: set[int]) -> None:
    """ConfigError naming the first key given twice in one mapping (PyYAML would keep the last silently).
    ``done``: ids of the nodes already checked (an alias can make the node graph cyclic)."""
    if id(node) in done:
        return
    done.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, path, source, done)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key, value in node.value:
        name = f"{path}.{key.value}" if path else str(key.value)
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if key.value in seen:
                raise ConfigError(f"{name}: given twice in {source} (line {key.start_mark.line + 1}); keep one")
            seen.add(key.value)
        _refuse_duplicates(value, name, source, done)


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` (plain data only: ``!!python/...`` tags are refused) that also refuses a key given
    twice in one mapping. ``source`` (a file name) goes into the error."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, "", source, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; any problem is one ConfigError line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: no such file {str(p)!r}")
    try:
        d = parse_yaml(p.read_text(encoding="utf-8"), str(p))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {p}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = "; only plain YAML values are allowed (no !! tags)" if isinstance(e, yaml.constructor.ConstructorError) else ""
        raise ConfigError(f"config: {p}{where}: {what}{hint}") from None
    if not isinstance(d or {}, dict):
        raise ConfigError(f"config: {p} must hold a mapping")
    return d or {}


def config_dict(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """YAML file (optional) + dotted overrides -> the raw nested dict (not validated yet)."""
    return apply_overrides(migrate(read_config_file(path), notify=True) if path else {}, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + dotted overrides -> validated :class:`RunConfig`."""
    return run_config_from_dict(config_dict(path, overrides))


# ------------------------------------------------------------------------------------------------
# Preflight: what a local run can check before it imports torch or reads any data (milliseconds).


def _plain_local(spec: str) -> Path | None:
    """The path of a data spec that names ONE local file or folder (no pattern, list, URL or builtin)."""
    spec = spec[len("file://"):] if spec.startswith("file://") else spec
    if spec.startswith(("builtin:", "pipe:")) or is_url(spec) or any(c in spec for c in "{},*?[|") or "::" in spec:
        return None
    return Path(spec).expanduser()


def check_data_paths(data: DataConfig) -> None:
    """Refuse a ``data.train`` / ``data.val`` that names a local path that does not exist. Patterns,
    URLs and fallbacks (``a|b``: only when every option is missing) are left to the data layer."""
    for key in ("train", "val"):
        spec = getattr(data, key)
        options = [_plain_local(o) for o in spec_options(spec)] if key == "val" else [_plain_local(spec)]
        try:
            missing = bool(options) and all(p is not None and not p.exists() for p in options)
        except (OSError, ValueError):  # a name too long, a NUL byte
            missing = True
        if missing and key == "train":  # the data layer's wording (datasets/shards.py), said before it loads
            raise ConfigError(f"data.train: shard not found: {spec} (no such file or folder); give shards, a shard "
                              "folder, an image folder or builtin:skimage")
        if missing:
            raise ConfigError(f"data.val: {spec}: no such image folder; pass an existing folder of images or "
                              "builtin:skimage")


def check_output_dir(trainer: TrainerConfig) -> None:
    """Refuse a local ``trainer.output_dir`` that cannot be created or written (its nearest existing
    ancestor must be a writable folder). Nothing is created; URLs are left to Ray's storage."""
    out = trainer.output_dir
    if is_url(out):
        return
    p: Path | str  # the path reported: the nearest existing ancestor, or ``out`` itself if unusable
    try:
        p = Path(out).expanduser().absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        why = "is not a folder" if not p.is_dir() else "" if os.access(p, os.W_OK | os.X_OK) else "is not writable"
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        p, why = out, f"is not a usable path ({e})"
    if why:
        raise ConfigError(f"trainer.output_dir: cannot write {out!r}: {p} {why}; choose a folder you can write to")


# ------------------------------------------------------------------------------------------------
# The run config of ``sparsefold train`` (and of ``sparsefold launch``, which validates the same way).

QUICKSTART = "quickstart.yaml"  # the packaged default config (sparsefold/configs/)


def load_run_config(config: str | None, overrides: list[str], local: bool = False) -> RunConfig:
    """The validated run config of ``sparsefold train [CONFIG] [overrides]`` (no file: the packaged quickstart).

    With ``local`` (the run starts in this process), what needs neither torch nor data is checked first, in
    milliseconds: every section but ``model``, that local data paths exist and that ``trainer.output_dir``
    can be written; then the model section (which imports the model registry, hence torch)."""
    if config is None or "=" in config:  # no file: the packaged quickstart
        overrides = ([config] if config else []) + overrides
        config = str(resources.files("sparsefold") / "configs" / QUICKSTART)
    d = config_dict(config, overrides)
    if local:
        sections = sections_from_dict(d)
        check_data_paths(sections["data"])
        check_output_dir(sections["trainer"])
    return run_config_from_dict(d)

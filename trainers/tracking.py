"""Experiment tracking, gated to rank 0 in ONE place.

:func:`make_tracker` returns a W&B-backed tracker on rank 0 and a no-op on every other rank (Ray's
``setup_wandb`` does not gate ranks under Train V2); the loop calls the tracker on every rank and never
checks the rank itself. The key is never logged: the config we send is the RunConfig (no secret fields)
plus provenance (trainers/provenance.py).

What a W&B run holds: ``train/*`` every ``trainer.log_every`` steps (``train/loss``: the mean over the steps
of that window with a finite loss; ``train/samples_per_s``: training time only, validation and checkpoints
excluded), ``val/*`` and a per-image PSNR table at each validation (the summary's ``val/psnr`` is the best,
not the last), image panels, and each checkpoint as an artifact of type ``model``
(:meth:`WandbTracker.log_checkpoint`), which ``evaluate`` / ``denoise`` / ``trainer.init_from`` accept as
``wandb:ENTITY/PROJECT/NAME:ALIAS`` (trainers/storage.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sparsefold.config import RunConfig
from sparsefold.errors import ConfigError
from sparsefold.models.contract import HasDictionary
from sparsefold.trainers.console import say
from sparsefold.trainers.wandb_auth import api_key_available


class NullTracker:
    """Tracker of non-zero ranks and of ``wandb.mode=disabled``: every method a no-op."""

    run_dir: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        pass

    def log_checkpoint(self, directory: Path, step: int, metrics: dict[str, float], validated: bool) -> None:
        pass

    def finish(self) -> None:
        pass


WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES: tuple[WandbMode, ...] = ("online", "offline", "disabled")


def wandb_mode(mode: str) -> WandbMode:
    """The W&B mode a run starts in, from ``wandb.mode`` (config), the ``WANDB_MODE`` environment variable and
    whether an API key is available (:func:`~sparsefold.trainers.wandb_auth.api_key_available`:
    ``WANDB_API_KEY``, or a netrc entry such as ``wandb login`` writes):

    ===========  ====================================  ===========  ===============================
    wandb.mode   WANDB_MODE (env)                      API key      effective mode
    ===========  ====================================  ===========  ===============================
    auto         unset, online, offline, other         yes          online
    auto         unset, online, offline, other         no           offline
    auto         disabled                              any          disabled
    online       any                                   yes          online
    online       any                                   no           ConfigError (one line)
    offline      any                                   any          offline
    disabled     any                                   any          disabled
    ===========  ====================================  ===========  ===============================

    So the config decides; the environment variable only ever turns ``auto`` off (``disabled``). An
    ``offline`` in the environment does not hold ``auto`` offline: cluster manifests and Ray's own W&B helpers
    set it for their purposes, and ``auto`` means "online when a key is here" (say ``wandb.mode=offline`` to
    stay offline with a key). The resolved mode is passed to ``wandb.init``, where it wins over the variable.
    Anything but ``auto`` and :data:`WANDB_MODES` is a ConfigError (the config check refuses it earlier)."""
    if mode != "auto" and mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode: unknown mode {mode!r}; use auto, online, offline or disabled")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        mode = "disabled" if env == "disabled" else "online" if api_key_available() else "offline"
    elif mode == "online" and not api_key_available():
        raise ConfigError("wandb.mode: online needs a W&B API key and none was found (WANDB_API_KEY, or "
                          "`wandb login`); use wandb.mode=auto to log offline without one")
    for known in WANDB_MODES:  # narrows the string to the Literal that wandb.init's signature asks for
        if mode == known:
            return known
    raise AssertionError(mode)


def mode_note(configured: str, effective: str) -> str | None:
    """The line said when ``auto`` goes online although ``WANDB_MODE`` asks for offline, else None."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if configured == "auto" and effective == "online" and env in ("offline", "dryrun"):
        return (f"W&B logs online (an API key is available); WANDB_MODE={env} in the environment does not hold "
                "wandb.mode=auto offline -- set wandb.mode=offline for that")
    return None


def media_key(key: str) -> str:
    """A W&B key whose media file name is portable: W&B names the file after the key, so no ``|``."""
    return key.replace("|", "-")


def best_psnr(summary: Any) -> float:
    """The best ``val/psnr`` a resumed run's W&B summary holds ({"max": x} under define_metric), or -inf."""
    value = summary.get("val/psnr") if summary is not None else None
    if value is not None and hasattr(value, "get"):
        value = value.get("max")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("-inf")


class WandbTracker(NullTracker):
    def __init__(self, cfg: RunConfig, run_dir: Path, run_name: str, resume: bool,
                 provenance: dict[str, Any] | None = None, best: float = float("-inf")) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        mode = wandb_mode(cfg.wandb.mode)
        self._wandb, self.config = wandb, {**cfg.to_dict(), "provenance": provenance or {}}
        self.log_model = cfg.wandb.log_model
        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            group=cfg.wandb.group or None,
            tags=list(cfg.wandb.tags) or None,
            name=run_name,
            id=run_name.replace(".", "-")[:64],
            resume="allow" if resume else None,
            config=self.config,
            mode=mode,
            dir=str(run_dir.resolve()),
            job_type="train",
        )
        for key in ("val/psnr", "val/ssim"):  # the summary holds the best, not the last
            self.run.define_metric(key, summary="max")
        # a resumed run: the best of what W&B kept (nothing when offline) and of the run's own checkpoints
        self.best = max(best_psnr(self.run.summary), best) if resume else float("-inf")
        self.run_dir = getattr(self.run, "dir", None)
        note = mode_note(cfg.wandb.mode, mode)
        if note:
            say(note)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({media_key(k): self._wandb.Image(v, caption=k) for k, v in images.items()}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        cols: list[str | int] = [*columns]  # the type wandb.Table's signature asks for
        self.run.log({media_key(key): self._wandb.Table(columns=cols, data=rows)}, step=step)

    def log_checkpoint(self, directory: Path, step: int, metrics: dict[str, float], validated: bool) -> None:
        """The checkpoint folder as version N of the artifact ``model-<run id>`` (type ``model``), aliased
        ``latest``, ``step-<N>`` and, when this step's validation PSNR is the best of the run so far, ``best``;
        the config (with provenance) and this step's metrics as metadata. The files are copied to W&B's
        staging area here, so ``directory`` may be deleted right after (Ray's temporary checkpoint)."""
        if not self.log_model:  # wandb.log_model=false
            return
        psnr = metrics.get("val/psnr", float("nan")) if validated else float("nan")
        best = math.isfinite(psnr) and psnr > self.best
        self.best = psnr if best else self.best
        art = self._wandb.Artifact(f"model-{self.run.id}", type="model", metadata={
            "step": step, "metrics": dict(metrics) if validated else {}, "config": self.config})
        art.add_dir(str(directory))
        self.run.log_artifact(art, aliases=["latest", f"step-{step}", *(["best"] if best else [])])

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: RunConfig, rank: int, run_dir: Path, run_name: str, resume: bool,
                 provenance: dict[str, Any] | None = None, best: float = float("-inf")) -> NullTracker:
    """THE rank gate: a :class:`WandbTracker` on rank 0 (unless the mode resolves to disabled), else a no-op.
    ``best``: a resumed run's best validation PSNR so far (its checkpoints'), for the ``best`` alias."""
    if rank != 0 or wandb_mode(cfg.wandb.mode) == "disabled":
        return NullTracker()
    return WandbTracker(cfg, run_dir, run_name, resume, provenance, best)


# ------------------------------------------------------------------ images for the dashboard
def to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) or (H, W) in [0, 1] -> uint8 HxW or HxWxC."""
    x = x.detach().float().clamp(0, 1).cpu()
    if x.dim() == 3:
        x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    return (x.numpy() * 255 + 0.5).astype(np.uint8)


def atom_grid(atoms: Tensor, pad: int = 1, scale: int = 4) -> np.ndarray:
    """Dictionary atoms (K, C, k, k) -> one uint8 image grid, each atom min-max normalized."""
    a = atoms.detach().float().cpu()
    a = a.mean(1) if a.shape[1] != 3 else a.permute(0, 2, 3, 1).mean(-1)  # (K, k, k)
    lo = a.flatten(1).min(1).values[:, None, None]
    hi = a.flatten(1).max(1).values[:, None, None]
    a = (a - lo) / (hi - lo).clamp_min(1e-12)
    k_, k = a.shape[0], a.shape[-1]
    cols = int(np.ceil(np.sqrt(k_)))
    rows = int(np.ceil(k_ / cols))
    grid = torch.ones(rows * (k + pad) + pad, cols * (k + pad) + pad)
    for i in range(k_):
        r, c = divmod(i, cols)
        grid[pad + r * (k + pad): pad + r * (k + pad) + k, pad + c * (k + pad): pad + c * (k + pad) + k] = a[i]
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (grid.numpy() * 255 + 0.5).astype(np.uint8)


def side_by_side(*images: Tensor) -> np.ndarray:
    """Noisy | denoised | clean, as one uint8 image."""
    return np.concatenate([to_uint8(x) for x in images], axis=1)


def model_panels(model: torch.nn.Module, first: tuple[Tensor, Tensor, Tensor] | None,
                 restoration: bool = False) -> dict[str, np.ndarray]:
    """The first validation image side by side (a restoration task's measurement shown as Aᵀy) and the atoms."""
    panels = {}
    if first is not None:
        panels["val/measurement-reconstruction-clean" if restoration else "val/noisy-denoised-clean"] = \
            side_by_side(*first)
    if isinstance(model, HasDictionary):
        panels["model/atoms"] = atom_grid(model.dictionary())
    return panels

"""Experiment tracking, gated to rank 0 in ONE place.

:func:`make_tracker` returns a W&B-backed tracker on rank 0 and a no-op on every other rank (Ray's
``setup_wandb`` does not gate ranks under Train V2). W&B mode ``auto`` is online when ``WANDB_API_KEY``
is set and offline otherwise, so no account is needed; the key itself is never logged: the config we
send is the RunConfig, which has no secret fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sparsefold.config import RunConfig
from sparsefold.errors import ConfigError
from sparsefold.models.contract import HasDictionary


class NullTracker:
    """Tracker of non-zero ranks and of ``wandb.mode=disabled``."""

    run_dir: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES: tuple[WandbMode, ...] = ("online", "offline", "disabled")


def wandb_mode(mode: str) -> WandbMode:
    """The W&B mode to start a run in. ``auto``: the WANDB_MODE environment variable if set, else online with
    an API key, else offline. Anything but ``auto`` and :data:`WANDB_MODES` is a ConfigError (the config
    check refuses it earlier)."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "")
        mode = env if env in WANDB_MODES else "online" if os.environ.get("WANDB_API_KEY") else "offline"
    for known in WANDB_MODES:  # narrows the string to the Literal that wandb.init's signature asks for
        if mode == known:
            return known
    raise ConfigError(f"wandb.mode: unknown mode {mode!r}; use auto, online, offline or disabled")


class WandbTracker(NullTracker):
    def __init__(self, cfg: RunConfig, run_dir: Path, run_name: str, resume: bool) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            group=cfg.wandb.group or None,
            tags=list(cfg.wandb.tags) or None,
            name=run_name,
            id=run_name.replace(".", "-")[:64],
            resume="allow" if resume else None,
            config=cfg.to_dict(),
            mode=wandb_mode(cfg.wandb.mode),
            dir=str(run_dir.resolve()),
            job_type="train",
        )
        self.run_dir = getattr(self.run, "dir", None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({k: self._wandb.Image(v, caption=k) for k, v in images.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: RunConfig, rank: int, run_dir: Path, run_name: str, resume: bool) -> NullTracker:
    if rank != 0 or wandb_mode(cfg.wandb.mode) == "disabled":
        return NullTracker()
    return WandbTracker(cfg, run_dir, run_name, resume)


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


def model_panels(model: torch.nn.Module, first: tuple[Tensor, Tensor, Tensor] | None) -> dict[str, np.ndarray]:
    panels = {}
    if first is not None:
        panels["val/noisy|denoised|clean"] = side_by_side(*first)
    if isinstance(model, HasDictionary):
        panels["model/atoms"] = atom_grid(model.dictionary())
    return panels

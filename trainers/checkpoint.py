"""Checkpoints without pickle: safetensors weights + JSON config/state + a weights-only optimizer file.

Layout of one checkpoint directory::

    model.safetensors     model weights (safetensors; tensors only)
    config.json           {"model": {...}, "run": {...full RunConfig...}, "format": 1}
    state.json            {"step", "epoch", "batch_in_epoch", "metrics", ...}
    optimizer.pt          optimizer state_dict (tensors + numbers), loaded with weights_only=True

A checkpoint is written into ``<name>.tmp-<pid>`` and renamed into place, so a half-written one is
never loaded; ``latest_checkpoint`` only considers complete directories.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsefold.config import RunConfig, dataclass_from_dict, to_dict

FORMAT = 1
WEIGHTS, CONFIG, STATE, OPTIM = "model.safetensors", "config.json", "state.json", "optimizer.pt"
BUNDLED_DIR = Path(str(importlib.resources.files("sparsefold"))) / "bundled"  # models shipped in the package


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, tampered with or not ours."""


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    cfg: RunConfig,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Atomically write a checkpoint directory; returns its final path."""
    final = Path(directory)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": str(FORMAT), "model": cfg.model.name})
    (tmp / CONFIG).write_text(json.dumps({"format": FORMAT, "model": to_dict(cfg.model), "run": cfg.to_dict()}, indent=1))
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIM)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and ".tmp-" not in directory.name and all(
        (directory / f).is_file() for f in (WEIGHTS, CONFIG, STATE)
    )


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The complete ``step_*`` checkpoint with the highest step, or None."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return None
    done = [p for p in d.glob("step_*") if is_complete(p)]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints (0 keeps all); remove stale temp dirs."""
    for p in checkpoints_dir.glob("step_*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        done = sorted((p for p in checkpoints_dir.glob("step_*") if is_complete(p)),
                      key=lambda p: int(p.name.split("_")[1]))
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(ref: str | Path) -> Path:
    """A checkpoint directory from a path (directory or its model.safetensors) or a bundled model name."""
    p = Path(ref)
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    if p.is_dir():
        if (p / "checkpoints").is_dir() and not (p / WEIGHTS).exists():
            latest = latest_checkpoint(p / "checkpoints")  # a run directory: its latest checkpoint
            if latest is None:
                raise CheckpointError(f"{p}: run directory has no complete checkpoint")
            return latest
        if not is_complete(p):
            raise CheckpointError(f"{p}: incomplete checkpoint (needs {WEIGHTS}, {CONFIG}, {STATE})")
        return p
    bundled = BUNDLED_DIR / str(ref)
    if "/" not in str(ref) and is_complete(bundled):
        return bundled
    names = sorted(x.name for x in BUNDLED_DIR.iterdir() if is_complete(x)) if BUNDLED_DIR.is_dir() else []
    raise CheckpointError(f"{ref}: not a checkpoint directory or a bundled model (bundled: {', '.join(names) or 'none'})")


def read_config(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / CONFIG}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{directory / CONFIG}: not a sparsefold checkpoint config")
    return meta


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights (strict). Returns (model, meta)."""
    from sparsefold.models import MODELS, build_model

    directory = resolve_checkpoint(ref)
    meta = read_config(directory)
    name = meta["model"].get("name")
    if name not in MODELS:
        raise CheckpointError(f"{directory}: unknown model {name!r}")
    model = build_model(dataclass_from_dict(MODELS[name].config, meta["model"], "model"))
    try:
        weights = load_file(str(directory / WEIGHTS), device=str(device))
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise CheckpointError(f"{directory / WEIGHTS}: not a valid safetensors file ({e})") from None
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match {name} (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(weights)
    meta["state"] = json.loads((directory / STATE).read_text())
    meta["path"] = str(directory)
    return model.to(device), meta


def load_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer (weights_only=True, no pickle); return state.json."""
    weights = load_file(str(directory / WEIGHTS), device="cpu")
    model.load_state_dict(weights)
    if (directory / OPTIM).is_file():
        optimizer.load_state_dict(torch.load(directory / OPTIM, map_location="cpu", weights_only=True))
    return json.loads((directory / STATE).read_text())

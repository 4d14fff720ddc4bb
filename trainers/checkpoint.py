"""Checkpoints without pickle: writing, verifying on load and loading the tensors of a checkpoint
directory (the layout, the manifest check and the scanner are in trainers/storage.py).

Atomicity: a checkpoint is written (and fsynced) into ``<name>.tmp-<pid>`` and renamed into place, so a
crash leaves either the old state or a ``.tmp-`` directory that nothing loads; every file is pinned by a
SHA-256 manifest written last. A tampered ``optimizer.pt`` (e.g. a pickle with a malicious ``__reduce__``)
is refused by the manifest, and even with a matching manifest it would not run code, since
``torch.load(weights_only=True)`` refuses it.

Resuming needs a manifest. Loading weights for inference (:func:`load_model`) verifies it when present
and accepts older checkpoints without one (safetensors + JSON: nothing in them executes), with a one-line
warning (none for the bundled models, which ship without one). Non-finite weights are refused either way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparsefold.config import RunConfig, dataclass_from_dict, migrate, to_dict
from sparsefold.errors import InputError, RunError
from sparsefold.models import MODELS, build_model
from sparsefold.trainers.console import say
from sparsefold.trainers.provenance import code_version
from sparsefold.trainers.storage import (
    BUNDLED_DIR,
    CONFIG,
    FORMAT,
    MANIFEST,
    OPTIM,
    STATE,
    WEIGHTS,
    CheckpointError,
    absolute_paths,
    latest_checkpoint,
    read_config,
    resolve_checkpoint,
    sha256_file,
    temp_dir,
    verify_checkpoint,
)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, model: nn.Module, cfg: RunConfig, state: dict[str, Any],
                 optimizer: torch.optim.Optimizer | None, extra: dict[str, Any] | None = None) -> None:
    """Write every file of a checkpoint into ``tmp`` (fresh), fsynced, the manifest last; ``extra`` adds
    keys to config.json (e.g. an imported release's ``source``; the training loop's ``provenance``, which adds
    the validation set to the code version recorded by default)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": str(FORMAT), "model": cfg.model.name})
    meta = {"provenance": code_version(), **(extra or {}), "format": FORMAT, "model": to_dict(cfg.model),
            "run": cfg.to_dict()}
    (tmp / CONFIG).write_text(json.dumps(meta, indent=1))
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIM)
    files = {}
    for name in sorted(p.name for p in tmp.iterdir()):
        _fsync(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)


def _write_failed(final: Path, e: BaseException) -> RunError:
    """One line for a checkpoint that could not be written (its temp dir is already gone): the reason
    (``No space left on device``, or torch's ``unexpected pos ...`` when its writer hit a full disk), what
    to do, and the previous checkpoint, which was not touched."""
    if isinstance(e, OSError) and e.strerror:
        why = e.strerror
    else:
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__) + " (disk full?)"
    previous = latest_checkpoint(final.parent, warn=False)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was touched"
    return RunError(f"could not write checkpoint {final}: {why}; free space or move trainer.output_dir; {kept}")


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    cfg: RunConfig,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint directory (temp dir, fsync, manifest, rename); returns its path.
    ``extra``: more top-level keys for config.json (provenance)."""
    final = Path(directory)
    tmp = temp_dir(final)
    try:
        _write_files(tmp, model, cfg, state, optimizer, extra)
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, read-only; torch/safetensors wrap it
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, e) from e
    old = final.with_name(f"{final.name}.tmp-old-{os.getpid()}")
    if final.exists():  # re-saving a step (after a rollback): keep the old one until the new is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


# Config keys a resumed run may change (a section name allows the whole section). They decide how long,
# how often, where and on what the run goes on -- not which updates the steps compute (up to rounding:
# device, threads, compile). max_steps / budget_cpu_seconds extend a run (the README's "raising
# trainer.max_steps extends it"); rollback_* govern what happens after divergence; data.val* and
# data.cache_dir only change what is measured or cached. Every other key (model, data.train, batch size,
# loss, optim, noise, seed, ray.workers, runtime.precision, depth_stages, ...) would splice a second trajectory
# onto the first in one run directory: a resume that changes one is refused (check_resume_config).
RESUME_MAY_CHANGE = frozenset({
    "wandb", "trainer.max_steps", "trainer.budget_cpu_seconds", "trainer.val_every", "trainer.ckpt_every",
    "trainer.log_every", "trainer.keep_checkpoints", "trainer.progress", "trainer.output_dir", "trainer.run_name",
    "trainer.resume", "trainer.rollback_after", "trainer.rollback_lr_factor", "trainer.max_rollbacks",
    "runtime.threads", "runtime.use_gpu", "runtime.compile", "runtime.channels_last", "runtime.fused",
    "ray.enabled", "ray.max_failures", "ray.cpus_per_worker", "data.val", "data.val_images", "data.cache_dir",
})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key of two run configs (``RunConfig.to_dict()``) that differs and is
    not in :data:`RESUME_MAY_CHANGE`. Keys only one side has (a field added or removed since) are skipped;
    ``data.train`` is compared as absolute paths (relative to this process's directory)."""
    old, cur = _flat(migrate(stored)), _flat(json.loads(json.dumps(new)))  # JSON: tuples become lists
    for side in (old, cur):
        if isinstance(side.get("data.train"), str):
            side["data.train"] = absolute_paths(side["data.train"])
    fixed = [k for k in sorted(old.keys() & cur.keys()) if k not in RESUME_MAY_CHANGE
             and k.split(".")[0] not in RESUME_MAY_CHANGE]
    return [f"{k}: {old[k]!r} -> {cur[k]!r}" for k in fixed if old[k] != cur[k]]


def check_resume_config(directory: Path, run: dict[str, Any]) -> None:
    """Refuse (:class:`InputError`, one line) to resume the checkpoint ``directory`` with a run config
    ``run`` whose trajectory settings differ from the config it was trained with (see
    :data:`RESUME_MAY_CHANGE`); the differing keys are listed."""
    stored = read_config(directory).get("run")
    changes = config_changes(stored, run) if isinstance(stored, dict) else []
    if changes:
        raise InputError(f"{directory}: this run was trained with other settings ({'; '.join(changes)}); resuming "
                         "would mix two trajectories in one run: keep them, or pick another trainer.run_name")


def _load_weights(directory: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(directory / WEIGHTS), device=device)
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{directory / WEIGHTS}: not a valid safetensors file ({msg})") from None


def _load_strict(model: nn.Module, weights: dict[str, torch.Tensor], directory: Path, name: str) -> None:
    """Load ``weights`` into ``model``: every tensor present, of the right shape, and finite (a NaN/inf
    weight would score NaN or resume a diverged run; refused whether or not a manifest vouches for it)."""
    own = model.state_dict()
    missing, unexpected = set(own) - set(weights), set(weights) - set(own)
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        first = (f"; {shapes[0]} is {tuple(weights[shapes[0]].shape)} there, {tuple(own[shapes[0]].shape)} here"
                 if shapes else "")
        raise CheckpointError(f"{directory}: weights do not match {name} (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}, wrong shape {shapes[:3]}{first})")
    bad = sorted(k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointError(f"{directory / WEIGHTS}: non-finite (NaN/inf) values in {len(bad)} tensor(s), e.g. "
                              f"{bad[0]}: a diverged or corrupt checkpoint; use an earlier one")
    model.load_state_dict(weights)


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes, without its init (every weight comes from the checkpoint),
    and load its weights (strict). Returns (model, meta), the model in eval mode, ready for inference
    (BatchNorm on its running statistics; ``model.train()`` to train it further)."""
    directory = resolve_checkpoint(ref)
    verify_checkpoint(directory, require_manifest=False)
    if not (directory / MANIFEST).is_file() and not directory.resolve().is_relative_to(BUNDLED_DIR.resolve()):
        say(f"{directory}: no {MANIFEST}, so its files cannot be verified (an older checkpoint, or a partial "
              "copy); loading it anyway")
    meta = read_config(directory)
    name = meta["model"].get("name")
    if name not in MODELS:
        raise CheckpointError(f"{directory}: unknown model {name!r}")
    model = build_model(dataclass_from_dict(MODELS[name].config, meta["model"], "model"), init=False)
    _load_strict(model, _load_weights(directory, str(device)), directory, name)
    meta["state"] = json.loads((directory / STATE).read_text())
    meta["path"] = str(directory)
    return model.to(device).eval(), meta


def load_initial_weights(model: nn.Module, ref: str) -> Path:
    """``trainer.init_from``: load the weights of the checkpoint ``ref`` into a fresh ``model`` (strict: every
    tensor, same shapes, finite); returns the checkpoint's directory. Optimizer and state are not read."""
    try:
        directory = resolve_checkpoint(ref)
        verify_checkpoint(directory, require_manifest=False)
        _load_strict(model, _load_weights(directory), directory, type(model).__name__)
    except CheckpointError as e:
        raise InputError(f"trainer.init_from: {e}; model.* must describe the checkpoint's model (its "
                         "config.json)") from None
    return directory


def load_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Verify the manifest, then restore weights and optimizer (``weights_only=True``: no pickle code
    runs); return state.json."""
    directory = Path(directory)
    verify_checkpoint(directory, require_manifest=True)
    _load_strict(model, _load_weights(directory), directory, type(model).__name__)
    if (directory / OPTIM).is_file():
        try:
            optimizer.load_state_dict(torch.load(directory / OPTIM, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001  (weights_only refuses anything but tensors/containers)
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(e).__name__)
            raise CheckpointError(f"{directory / OPTIM}: refused (not a weights-only file: {why.rstrip('.')}); "
                                  "it was not unpickled") from None
    return json.loads((directory / STATE).read_text())

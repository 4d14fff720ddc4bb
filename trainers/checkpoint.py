"""Checkpoints without pickle: safetensors weights + JSON config/state + a weights-only optimizer file,
every file pinned by a SHA-256 manifest.

Layout of one checkpoint directory::

    model.safetensors     model weights (safetensors; tensors only)
    config.json           {"model": {...}, "run": {...full RunConfig...}, "format": 1}
    state.json            {"step", "epoch", "batch_in_epoch", "lr_scale", "rollbacks", "metrics", ...}:
                          the fields of trainers/loop.py:TrainState
    optimizer.pt          optimizer state_dict (tensors + numbers), loaded with weights_only=True
    manifest.json         {"format": 1, "files": {name: {"sha256", "bytes"}}}, written last

Atomicity: a checkpoint is written (and fsynced) into ``<name>.tmp-<pid>`` and renamed into place, so a
crash leaves either the old state or a ``.tmp-`` directory that nothing loads. A copy that can still be
partial (Ray copying our directory into its storage, a truncated upload) is caught by the manifest: a
file that is missing, has the wrong size or the wrong SHA-256 makes the whole checkpoint invalid, and
:func:`latest_checkpoint` falls back to the next older valid one. The same check refuses a tampered
file (e.g. an ``optimizer.pt`` swapped for a pickle with a malicious ``__reduce__``); even a matching
manifest would not make that file run code, since ``torch.load(weights_only=True)`` refuses it. (The
manifest guards integrity, not authorship: whoever can write the storage can rewrite it; what keeps that
harmless is that nothing loaded from a checkpoint can execute code.)

Resuming needs a manifest. Loading weights for inference (:func:`load_model`) verifies it when present
and accepts older checkpoints without one (safetensors + JSON: nothing in them executes), with a one-line
warning (none for the bundled models, which ship without one). Non-finite weights are refused either way.

Which checkpoint is "the latest" is decided from the checkpoints themselves (the ``step`` in each valid
one's state.json), never from a pointer file or from Ray's bookkeeping, which after a crash can name an
older one (Ray 2.60 hands a restarted worker the checkpoint its controller last registered, which can be a
report or two behind what is on disk). :func:`latest_in_storage` does the same on any
``pyarrow.fs`` filesystem (Ray's storage: local, NFS, S3, GCS).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparsefold.config import RunConfig, dataclass_from_dict, to_dict
from sparsefold.errors import InputError, RunError
from sparsefold.runtime import absolute_paths

FORMAT = 1
WEIGHTS, CONFIG, STATE, OPTIM = "model.safetensors", "config.json", "state.json", "optimizer.pt"
MANIFEST = "manifest.json"
REQUIRED = (WEIGHTS, CONFIG, STATE)
PREFIXES = ("step_", "checkpoint_")  # ours (plain and Ray), and Ray's default checkpoint_<timestamp>
BUNDLED_DIR = Path(str(importlib.resources.files("sparsefold"))) / "bundled"  # models shipped in the package


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, tampered with or not ours."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _own_temp(final: Path) -> Path:
    """The temp directory this process writes ``final`` into (the pid tells :func:`prune_checkpoints`
    whose it is)."""
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def _write_files(tmp: Path, model: nn.Module, cfg: RunConfig, state: dict[str, Any],
                 optimizer: torch.optim.Optimizer | None) -> None:
    """Write every file of a checkpoint into ``tmp`` (fresh), fsynced, the manifest last."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": str(FORMAT), "model": cfg.model.name})
    (tmp / CONFIG).write_text(json.dumps({"format": FORMAT, "model": to_dict(cfg.model), "run": cfg.to_dict()}, indent=1))
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
) -> Path:
    """Atomically write a checkpoint directory (temp dir, fsync, manifest, rename); returns its path."""
    final = Path(directory)
    tmp = _own_temp(final)
    try:
        _write_files(tmp, model, cfg, state, optimizer)
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


def verify_checkpoint(directory: str | Path, require_manifest: bool = True) -> None:
    """Raise :class:`CheckpointError` (one line) unless every file of ``directory`` matches its manifest.

    Checked: the required files exist, the manifest lists them (and ``optimizer.pt`` when present), and
    each listed file has the recorded size and SHA-256. Without a manifest: an error if
    ``require_manifest``, else only the structure is checked (legacy / bundled checkpoints)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory")
    if ".tmp-" in d.name:
        raise CheckpointError(f"{d}: a temporary (half-written) checkpoint")
    missing = [f for f in REQUIRED if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d}: incomplete checkpoint (missing {', '.join(missing)})")
    if not (d / MANIFEST).is_file():
        if require_manifest:
            raise CheckpointError(f"{d}: no {MANIFEST}; refusing to resume from an unverifiable checkpoint")
        return
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
        assert manifest.get("format") == FORMAT and isinstance(files, dict)
    except Exception:  # noqa: BLE001  (unreadable, not JSON, wrong shape)
        raise CheckpointError(f"{d / MANIFEST}: not a sparsefold checkpoint manifest") from None
    needed = list(REQUIRED) + ([OPTIM] if (d / OPTIM).exists() else [])
    unlisted = [f for f in needed if f not in files]
    if unlisted:
        raise CheckpointError(f"{d}: {', '.join(unlisted)} not in {MANIFEST} (foreign file?)")
    for name, rec in files.items():
        p = d / name
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{d / MANIFEST}: bad file name {name!r}")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != rec.get("bytes") or sha256_file(p) != rec.get("sha256"):
            raise CheckpointError(f"{p}: SHA-256/size does not match {MANIFEST} (truncated or tampered)")


def is_complete(directory: Path) -> bool:
    """Structurally complete (required files present, not a temp dir); see :func:`verify_checkpoint`."""
    return directory.is_dir() and ".tmp-" not in directory.name and all((directory / f).is_file() for f in REQUIRED)


def checkpoint_step(directory: Path) -> int:
    """The step recorded in a checkpoint's state.json."""
    try:
        return int(json.loads((Path(directory) / STATE).read_text())["step"])
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{Path(directory) / STATE}: unreadable or no step") from None


def _warn(msg: str) -> None:
    print(f"[sparsefold] {msg}", file=sys.stderr, flush=True)


def latest_checkpoint(checkpoints_dir: str | Path, warn: bool = True) -> Path | None:
    """The valid checkpoint (manifest verified) with the highest step in state.json, or None.

    Considers ``step_*`` (ours) and ``checkpoint_*`` (Ray's default names) subdirectories; temp dirs,
    incomplete, truncated or tampered ones are skipped (with a warning on stderr)."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return None
    ranked = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith(PREFIXES) and ".tmp-" not in p.name:
            try:
                ranked.append((checkpoint_step(p), p.name, p))
            except CheckpointError as e:
                if warn:
                    _warn(f"skipping checkpoint: {e}")
    for _, _, p in sorted(ranked, reverse=True):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            if warn:
                _warn(f"skipping checkpoint: {e}")
    return None


def latest_in_storage(fs: Any, root: str, download_to: str | Path | None = None) -> Path | None:
    """:func:`latest_checkpoint` on a ``pyarrow.fs`` filesystem (Ray's run storage).

    Local filesystems are checked in place. Remote ones: ``step_*`` directories are tried from the highest
    step down (the step is in the name), each downloaded into ``download_to`` (default: a new temp dir)
    and verified there; returns the local copy of the first valid one."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return latest_checkpoint(root)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("step_") and ".tmp-" not in i.base_name), reverse=True)
    dest = Path(download_to or tempfile.mkdtemp(prefix="sparsefold-ckpt-"))
    for name in names:
        local = dest / name
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        pafs.copy_files(f"{root.rstrip('/')}/{name}", str(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            verify_checkpoint(local)
            return local
        except CheckpointError as e:
            _warn(f"skipping checkpoint {root}/{name}: {e}")
            shutil.rmtree(local, ignore_errors=True)
    return None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints (0 keeps all); remove this process's leftover temp
    dirs. Another process's ``.tmp-<pid>`` may be a checkpoint it is writing right now: never touched.
    Only healthy states are checkpointed (trainers/loop.py), so the newest one, always kept, is healthy."""
    for p in checkpoints_dir.glob(f"step_*.tmp-{os.getpid()}"):
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        done = sorted((p for p in checkpoints_dir.glob("step_*") if is_complete(p)),
                      key=lambda p: int(p.name.split("_")[1]))
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(ref: str | Path) -> Path:
    """A checkpoint directory from a path (directory or its model.safetensors) or a bundled model name.
    A run directory (plain: ``<run>/checkpoints/step_*``; Ray: ``<run>/step_*``) gives its latest valid one."""
    p = Path(ref)
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    if p.is_dir():
        if not (p / WEIGHTS).exists() and ((p / "checkpoints").is_dir() or any(p.glob("step_*"))):
            latest = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)  # a run directory
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


# Config keys a resumed run may change (a section name allows the whole section). They decide how long,
# how often, where and on what the run goes on -- not which updates the steps compute (up to rounding:
# device, threads, compile). max_steps / budget_cpu_seconds extend a run (the README's "raising
# trainer.max_steps extends it"); rollback_* govern what happens after divergence; data.val* and
# data.cache_dir only change what is measured or cached. Every other key (model, data.train, batch size,
# loss, optim, noise, seed, workers, precision, amp, depth_stages, ...) would splice a second trajectory
# onto the first in one run directory: a resume that changes one is refused (check_resume_config).
RESUME_MAY_CHANGE = frozenset({
    "wandb", "trainer.max_steps", "trainer.budget_cpu_seconds", "trainer.val_every", "trainer.ckpt_every",
    "trainer.log_every", "trainer.keep_checkpoints", "trainer.progress", "trainer.threads", "trainer.output_dir",
    "trainer.run_name", "trainer.resume", "trainer.use_ray", "trainer.max_failures", "trainer.cpus_per_worker",
    "trainer.use_gpu", "trainer.compile", "trainer.channels_last", "trainer.rollback_after",
    "trainer.rollback_lr_factor", "trainer.max_rollbacks", "data.val", "data.val_images", "data.cache_dir",
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
    old, cur = _flat(stored), _flat(json.loads(json.dumps(new)))  # JSON round trip: tuples become lists
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
        raise CheckpointError(f"{directory}: weights do not match {name} (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}, wrong shape {shapes[:3]})")
    bad = sorted(k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointError(f"{directory / WEIGHTS}: non-finite (NaN/inf) values in {len(bad)} tensor(s), e.g. "
                              f"{bad[0]}: a diverged or corrupt checkpoint; use an earlier one")
    model.load_state_dict(weights)


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights (strict). Returns (model, meta)."""
    from sparsefold.models import MODELS, build_model

    directory = resolve_checkpoint(ref)
    verify_checkpoint(directory, require_manifest=False)
    if not (directory / MANIFEST).is_file() and not directory.resolve().is_relative_to(BUNDLED_DIR.resolve()):
        _warn(f"{directory}: no {MANIFEST}, so its files cannot be verified (an older checkpoint, or a partial "
              "copy); loading it anyway")
    meta = read_config(directory)
    name = meta["model"].get("name")
    if name not in MODELS:
        raise CheckpointError(f"{directory}: unknown model {name!r}")
    model = build_model(dataclass_from_dict(MODELS[name].config, meta["model"], "model"))
    _load_strict(model, _load_weights(directory, str(device)), directory, name)
    meta["state"] = json.loads((directory / STATE).read_text())
    meta["path"] = str(directory)
    return model.to(device), meta


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


def fault_hook(event: str, rank: int, step: int) -> None:
    """Test hook for the fault-tolerance tests, inert unless ``SPARSEFOLD_FAULT_DIR`` is set.

    ``start``: write this process's pid to ``<dir>/rank<r>.pid`` (so a test can SIGKILL one worker).
    ``checkpoint``: while ``<dir>/hold`` exists and holds ``step``, wait (at most 10 min), so a test can
    kill a process at a known point after that checkpoint is on disk."""
    d = os.environ.get("SPARSEFOLD_FAULT_DIR")
    if not d:
        return
    d = Path(d)
    if event == "start":
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{rank}.pid.tmp").write_text(str(os.getpid()))
        os.replace(d / f"rank{rank}.pid.tmp", d / f"rank{rank}.pid")
        return
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if int((d / "hold").read_text().strip() or -1) != step:
                return
        except (OSError, ValueError):
            return
        time.sleep(0.05)

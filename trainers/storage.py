"""Where a run's files live, in ONE place: the run's identity (its name), its directory, the on-disk layout
of a checkpoint, the one scanner for "the newest valid checkpoint", and the storage Ray Train writes to.
No torch here (``sparsefold models`` lists the bundled models through this module without it); pyarrow
only inside the functions that reach a filesystem other than the local one, wandb only inside the one that
fetches a ``wandb:`` checkpoint.

Layout of a run (the plain loop and Ray Train alike)::

    <trainer.output_dir>/<run>/    local/NFS path, or a URL (Ray path: Ray Train writes the checkpoints
                                   there itself; the other files are staged under staging_root() and
                                   uploaded when the run ends)
        .lock                      host and pid of the one process writing the run (trainers/runlock.py)
        config.json                the run's config
        provenance.json            code version, git commit, the validation images used (trainers/provenance.py)
        wandb/                     W&B offline files
        step_<N:07d>/              the checkpoint of step N (files below)
        step_<N:07d>.tmp-<pid>/    a checkpoint being written by process <pid>; nothing loads it

Plain runs written before the layout was unified hold their checkpoints in ``<run>/checkpoints/step_*``:
they are still found (read, never written; see :func:`checkpoint_parents`).

Layout of one checkpoint directory::

    model.safetensors     model weights (safetensors; tensors only)
    config.json           {"model": {...}, "run": {...full RunConfig...}, "format": 1,
                           "provenance": {version, git commit, validation images}: trainers/provenance.py}
    state.json            {"step", "epoch", "batch_in_epoch", "lr_scale", ...}: trainers/loop.py:TrainState
    optimizer.pt          optimizer state_dict, loaded with weights_only=True (trainers/checkpoint.py)
    manifest.json         {"format": 1, "files": {name: {"sha256", "bytes"}}}, written last

A checkpoint is *complete* when the first three files are there and its name is not a temp name, and
*valid* when every file matches the manifest (size and SHA-256): a partial copy (Ray copying into its
storage, a truncated upload) or a tampered file is invalid, and the scanner falls back to the next older
valid checkpoint. The manifest guards integrity, not authorship; what keeps a rewritten file harmless is
that nothing loaded from a checkpoint can execute code (trainers/checkpoint.py).

Which checkpoint is "the latest" is decided from the checkpoints themselves (the ``step`` in each valid
one's state.json), never from a pointer file or from Ray's bookkeeping, which after a crash can name an
older one (Ray 2.60 hands a restarted worker the checkpoint its controller last registered, which can be a
report or two behind what is on disk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from sparsefold.config import RunConfig, is_url, spec_options, split_spec, to_dict
from sparsefold.errors import InputError
from sparsefold.trainers.console import say
from sparsefold.trainers.wandb_auth import api_key_available

FORMAT = 1
WEIGHTS, CONFIG, STATE, OPTIM = "model.safetensors", "config.json", "state.json", "optimizer.pt"
MANIFEST = "manifest.json"
REQUIRED = (WEIGHTS, CONFIG, STATE)
STEP = "step_"  # our checkpoint directories: step_<N:07d>
PREFIXES = (STEP, "checkpoint_")  # ours, and Ray's default checkpoint_<timestamp> names
TEMP = ".tmp-"  # <name>.tmp-<pid>: a checkpoint being written
LEGACY_DIR = "checkpoints"  # plain runs before the unified layout: <run>/checkpoints/step_* (read only)
BUNDLED_DIR = Path(str(importlib.resources.files("sparsefold"))) / "bundled"  # models shipped in the package


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, tampered with or not ours."""



# ------------------------------------------------------------------------------------------------
# Run identity and the run directory


def cache_root() -> Path:
    """``$SPARSEFOLD_CACHE`` or ``~/.cache/sparsefold``."""
    env = os.environ.get("SPARSEFOLD_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsefold"


def staging_root() -> Path:
    """Node-local directory for the files of runs whose output_dir is a URL (config.json, W&B offline
    files), uploaded to ``<output_dir>/<run>/`` when the run ends: ``<cache_root>/runs``."""
    return cache_root() / "runs"


def absolute_paths(spec: str) -> str:
    """The local paths of a data spec made absolute and canonical in this process (``~`` expanded, ``..``
    and symlinks resolved); ``A|B`` fallbacks (parts stripped, as ``val_files`` reads them) and brace
    patterns kept; URLs, ``builtin:`` parts, ``pipe:`` specs (a shell command may hold ``|``) and the
    empty string unchanged."""
    if not spec or str(spec).startswith("pipe:"):
        return spec

    def canonical(part: str) -> str:
        keep = is_url(part) or part.startswith("builtin:")
        return part if keep else str(Path(part).expanduser().resolve())

    options = [split_spec(p) for p in spec_options(spec)]  # val: fallbacks; train: a list of shard specs
    if not any(options):  # nothing but separators: left as given, for the data error to quote
        return spec
    return "|".join(",".join(canonical(part) for part in parts) for parts in options)


def canonical_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its local paths absolute in this process (``data.train``/``val``/``cache_dir`` through
    :func:`absolute_paths`, ``trainer.output_dir`` resolved; URLs kept). The form a run's identity is
    computed from, and the one Ray workers receive: they run in other directories, and the same data
    named relatively from one directory or absolutely from another must give the same run. A
    ``trainer.init_from`` that names an existing path is made absolute too (a bundled name is kept)."""
    d, out, init = cfg.data, cfg.trainer.output_dir, cfg.trainer.init_from
    data = replace(d, train=absolute_paths(d.train), val=absolute_paths(d.val), cache_dir=absolute_paths(d.cache_dir))
    out = out if is_url(out) else str(Path(out).expanduser().resolve())
    init = str(Path(init).expanduser().resolve()) if init and Path(init).expanduser().exists() else init
    return replace(cfg, data=data, trainer=replace(cfg.trainer, output_dir=out, init_from=init))


# sections that say how or where a run executes, not which experiment it is: not in the run's name
NOT_IN_NAME = ("trainer", "runtime", "ray", "wandb")


def named_fields(section: Any) -> dict[str, Any]:
    """The fields of a config section that enter a run's name: all, except a field added after runs were
    first named (``metadata={"run_name": "if_set"}``) while it holds its default: an existing experiment keeps
    its name, hence is resumed by the same command, when a release adds an option."""
    out = to_dict(section)
    for f in dataclasses.fields(section):
        if f.metadata.get("run_name") == "if_set" and getattr(section, f.name) == f.default:
            del out[f.name]
    return out


def default_run_name(cfg: RunConfig) -> str:
    """Stable name from what defines the experiment (model, data, noise, optim, loss, seed), so running the
    same command again resumes it; changing max_steps extends the same run.

    Hashed from the canonical config (:func:`canonical_paths`): data named by a relative path from the
    repository or by an absolute path from elsewhere is the same run, and a Ray worker (handed absolute
    paths) would compute what its driver did -- though the driver hands it the name anyway.

    A Ray run (``ray.enabled``) is ``<model>-ray-<hash>``, never the plain run's directory: Ray Train keeps
    its own bookkeeping there (its checkpoint-manager snapshot, and it prunes what it registered), so a
    plain run's checkpoints in the same folder would be pruned or resumed behind its back. Other trainer,
    runtime and Ray settings (workers, precision, ...) are not in the name; ``trainer.init_from`` is."""
    canon = canonical_paths(cfg)
    key: dict[str, Any] = {name: named_fields(getattr(canon, name)) for name in canon.to_dict()
                           if name not in NOT_IN_NAME}
    key = {name: fields for name, fields in key.items() if fields}  # a section added later, at its defaults
    key["seed"] = cfg.trainer.seed
    if cfg.trainer.init_from:  # a fine-tuning run is another experiment than the same config from scratch
        key["init_from"] = canonical_paths(cfg).trainer.init_from
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.model.name}-{'ray-' if cfg.ray.enabled else ''}{digest}"


def run_dir_of(cfg: RunConfig) -> Path:
    """Local directory of the run: ``<output_dir>/<run name>``. When output_dir is a URL (Ray path only),
    a node-local staging directory instead: Ray Train uploads the checkpoints, :func:`publish_run_files`
    the rest."""
    name, out = cfg.trainer.run_name or default_run_name(cfg), cfg.trainer.output_dir
    return staging_root() / name if is_url(out) else Path(out).expanduser().resolve() / name


def canonical_run(cfg: RunConfig) -> RunConfig:
    """The run's identity, computed ONCE, on the driver: :func:`canonical_paths` (local paths absolute:
    workers run in other directories) with ``trainer.run_name`` set to the name that form implies. Workers
    get this config as is and never recompute the name, so Ray's storage folder, the run's config.json and
    W&B files and the final JSON's ``checkpoint`` and ``run_dir`` are one run."""
    canon = canonical_paths(cfg)
    return replace(canon, trainer=replace(canon.trainer, run_name=run_dir_of(canon).name))


# ------------------------------------------------------------------------------------------------
# Ray storage, URLs and upload: trainer.output_dir is a local/NFS path, or (Ray path) a URL that pyarrow
# opens -- the same resolver Ray Train uses for storage_path, so whatever Ray can checkpoint to, results
# can go to.


def url_join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def storage_of(cfg: RunConfig) -> tuple[str, str, str]:
    """(Ray's storage_path, run name, the run's root in storage) for ``trainer.output_dir``: an absolute
    local/NFS path (resolved here, on the driver: workers run in other directories), or a URL that
    pyarrow opens (s3://, gs://, file://), which Ray Train writes to itself -- no shared filesystem."""
    run_dir, out = run_dir_of(cfg), cfg.trainer.output_dir
    if is_url(out):
        return out.rstrip("/"), run_dir.name, url_join(out, run_dir.name)
    return str(run_dir.parent), run_dir.name, str(run_dir)


def upload_tree(local_dir: str | Path, url: str) -> int:
    """Copy the files under ``local_dir`` to ``url`` (a directory URL: s3://, gs://, file://, ...),
    creating it; existing files there (Ray's checkpoints) stay. Returns the number of files copied."""
    import pyarrow.fs as pafs

    if not is_url(url):
        raise ValueError(f"upload_tree: {url!r} is not a URL")
    fs, root = pafs.FileSystem.from_uri(url)
    local = Path(local_dir)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:
        dst = f"{root.rstrip('/')}/{p.relative_to(local).as_posix()}"
        fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        with p.open("rb") as src, fs.open_output_stream(dst) as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    return len(files)


def publish_run_files(cfg: RunConfig) -> str:
    """Rank 0, URL output_dir: copy the run's node-local files (config.json, W&B offline logs) next to
    Ray's checkpoints in ``<output_dir>/<run>/``. A failed upload is reported, never fatal (the
    checkpoints are already in storage). Returns the run's root URL."""
    _, _, root = storage_of(cfg)
    try:
        n = upload_tree(run_dir_of(cfg), root)
        say(f"uploaded {n} run files to {root}")
    except Exception as e:  # noqa: BLE001
        say(f"warning: could not upload the run files to {root}: {e}")
    return root


# ------------------------------------------------------------------------------------------------
# One checkpoint on disk


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``: ``step_0000042`` (sorts like the steps)."""
    return f"{STEP}{step:07d}"


def temp_dir(final: Path) -> Path:
    """The temp directory this process writes the checkpoint ``final`` into (the pid tells
    :func:`prune_checkpoints` whose it is)."""
    return final.with_name(f"{final.name}{TEMP}{os.getpid()}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(directory: Path) -> bool:
    """Structurally complete (required files present, not a temp dir); see :func:`verify_checkpoint`."""
    return directory.is_dir() and TEMP not in directory.name and all((directory / f).is_file() for f in REQUIRED)


def _manifest_files(d: Path) -> dict[str, Any]:
    """The ``files`` of ``d``'s manifest, or :class:`CheckpointError` when it is not ours."""
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
        assert manifest.get("format") == FORMAT and isinstance(files, dict)
    except Exception:  # noqa: BLE001  (unreadable, not JSON, wrong shape)
        raise CheckpointError(f"{d / MANIFEST}: not a sparsefold checkpoint manifest") from None
    return files


def verify_checkpoint(directory: str | Path, require_manifest: bool = True) -> None:
    """Raise :class:`CheckpointError` (one line) unless every file of ``directory`` matches its manifest.

    Checked: the required files exist, the manifest lists them (and ``optimizer.pt`` when present), and
    each listed file has the recorded size and SHA-256. Without a manifest: an error if
    ``require_manifest``, else only the structure is checked (legacy / bundled checkpoints)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory")
    if TEMP in d.name:
        raise CheckpointError(f"{d}: a temporary (half-written) checkpoint")
    missing = [f for f in REQUIRED if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d}: incomplete checkpoint (missing {', '.join(missing)})")
    if not (d / MANIFEST).is_file():
        if require_manifest:
            raise CheckpointError(f"{d}: no {MANIFEST}; refusing to resume from an unverifiable checkpoint")
        return
    files = _manifest_files(d)
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


def checkpoint_step(directory: Path) -> int:
    """The step recorded in a checkpoint's state.json."""
    try:
        return int(json.loads((Path(directory) / STATE).read_text())["step"])
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{Path(directory) / STATE}: unreadable or no step") from None


def read_config(directory: Path) -> dict[str, Any]:
    """A checkpoint's config.json (``model``, ``run``, ``format``; bundled models add ``params``)."""
    try:
        meta = json.loads((directory / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / CONFIG}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{directory / CONFIG}: not a sparsefold checkpoint config")
    return meta


# ------------------------------------------------------------------------------------------------
# The checkpoints of a run: the one scanner, pruning, resolving a reference


def checkpoint_parents(run: str) -> tuple[str, str]:
    """The directories (local paths or paths in a pyarrow filesystem) whose ``step_*`` children are the
    checkpoints of the run at ``run``: the run directory itself, and -- read-only compatibility -- the
    ``checkpoints/`` folder where plain runs wrote them before the layout was unified. Nothing writes or
    prunes there any more; this is the only place that knows the old layout."""
    return run, f"{run.rstrip('/')}/{LEGACY_DIR}"


def _step_in_name(name: str) -> int | None:
    """N for a ``step_<N>`` directory name (temp names excluded), else None."""
    m = re.fullmatch(rf"{STEP}(\d+)", name)
    return int(m.group(1)) if m else None


def _skipped(e: CheckpointError, warn: bool) -> None:
    if warn:
        say(f"skipping checkpoint: {e}")


def best_val_psnr(run: Path) -> float:
    """The best validation PSNR any complete checkpoint of a local run recorded (state.json ``metrics``), or
    -inf: what a resumed run's W&B ``best`` alias must beat, whatever W&B itself kept (offline: nothing)."""
    best = float("-inf")
    for d in checkpoint_dirs(run):
        try:
            value = json.loads((d / STATE).read_text()).get("metrics", {}).get("val/psnr")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = max(best, float(value))
    return best


def checkpoint_dirs(run: Path) -> list[Path]:
    """The checkpoint directories of a local run, both layouts: by name only (neither checked nor ordered)."""
    parents = [Path(p) for p in checkpoint_parents(str(run))]
    return [p for d in parents if d.is_dir() for p in d.iterdir()
            if p.is_dir() and p.name.startswith(PREFIXES) and TEMP not in p.name]


def _latest_local(run: Path, warn: bool) -> Path | None:
    """Local run: candidates ranked by the step in their state.json, verified in place, newest first."""
    ranked = []
    for p in checkpoint_dirs(run):
        try:
            ranked.append((checkpoint_step(p), p.name, str(p), p))
        except CheckpointError as e:
            _skipped(e, warn)
    for *_, p in sorted(ranked, reverse=True):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            _skipped(e, warn)
    return None


def _latest_remote(fs: Any, run: str, download_to: str | Path | None, warn: bool) -> Path | None:
    """Remote run: ``step_*`` tried from the highest step (in the name) down, each downloaded into
    ``download_to`` (default: a new temp dir) and verified there; the local copy of the first valid one."""
    import pyarrow.fs as pafs

    found = []
    for parent in checkpoint_parents(run):
        for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
            step = _step_in_name(i.base_name)
            if i.type == pafs.FileType.Directory and step is not None:
                found.append((step, i.base_name, i.path))
    dest = Path(download_to or tempfile.mkdtemp(prefix="sparsefold-ckpt-"))
    for _, name, remote in sorted(found, reverse=True):
        local = dest / name
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        pafs.copy_files(remote, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            verify_checkpoint(local)
            return local
        except CheckpointError as e:
            _skipped(CheckpointError(f"{remote}: {e}"), warn)
            shutil.rmtree(local, ignore_errors=True)
    return None


def latest_checkpoint(run: str | Path, fs: Any = None, *, download_to: str | Path | None = None,
                      warn: bool = True) -> Path | None:
    """THE scanner: the newest valid checkpoint (manifest verified) of the run at ``run``, or None.

    ``run`` is a local directory, a URL (s3://, gs://, file://: opened with pyarrow), or a path in the
    ``pyarrow.fs`` filesystem ``fs`` (Ray's run storage). Local runs are checked in place: ``step_*`` and
    ``checkpoint_*`` (Ray's default names) ranked by the step in their state.json. Remote runs: ``step_*``
    tried newest first (the step is in the name), each downloaded into ``download_to`` and verified there;
    the local copy is returned. Temp, incomplete, truncated or tampered checkpoints are skipped (said on
    stderr if ``warn``)."""
    if fs is None and not is_url(str(run)):
        return _latest_local(Path(run), warn)
    import pyarrow.fs as pafs

    if fs is None:
        fs, run = pafs.FileSystem.from_uri(str(run))
    if isinstance(fs, pafs.LocalFileSystem):
        return _latest_local(Path(run), warn)
    return _latest_remote(fs, str(run), download_to, warn)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints of ``run_dir`` (0 keeps all); remove this process's
    leftover temp dirs. Another process's ``.tmp-<pid>`` may be a checkpoint it is writing right now: never
    touched. Only healthy states are checkpointed (trainers/loop.py), so the newest one, always kept, is
    healthy. A legacy ``checkpoints/`` folder is left alone (read only)."""
    for p in run_dir.glob(f"{STEP}*{TEMP}{os.getpid()}"):
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        done = sorted((p for p in run_dir.glob(f"{STEP}*") if is_complete(p) and _step_in_name(p.name) is not None),
                      key=lambda p: _step_in_name(p.name) or 0)
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def bundled_models() -> list[Path]:
    """The complete checkpoints shipped in the package (``sparsefold/bundled/<name>/``), by name."""
    return sorted(d for d in BUNDLED_DIR.iterdir() if is_complete(d)) if BUNDLED_DIR.is_dir() else []


# a checkpoint logged to W&B as an artifact (trainers/tracking.py): wandb:ENTITY/PROJECT/NAME[:ALIAS]
WANDB_REF = re.compile(r"wandb:([\w.-]+)/([\w.-]+)/([\w.-]+)(?::([\w.-]+))?")


def fetch_wandb_checkpoint(ref: str) -> Path:
    """The checkpoint a ``wandb:ENTITY/PROJECT/NAME:ALIAS`` reference names (alias default ``latest``),
    downloaded through the W&B public API into ``<cache_root>/wandb/ENTITY/PROJECT/NAME/<version>`` (a version
    already there is checked and completed by W&B, not downloaded again). Needs network and an API key: a
    one-line InputError otherwise, or when the artifact does not exist."""
    m = WANDB_REF.fullmatch(ref)
    if m is None:
        raise InputError(f"{ref}: not a W&B checkpoint reference; use wandb:ENTITY/PROJECT/NAME:ALIAS "
                         "(e.g. wandb:me/sparsefold/model-cscnet-1a2b3c4d:best)")
    entity, project, name, alias = m.groups()
    if not api_key_available():
        raise InputError(f"{ref}: no W&B API key here (WANDB_API_KEY, or `wandb login`); a wandb: checkpoint "
                         "can only be fetched online")
    try:
        import wandb

        art = wandb.Api(timeout=30).artifact(f"{entity}/{project}/{name}:{alias or 'latest'}", type="model")
        dest = cache_root() / "wandb" / entity / project / name / str(art.version)
        art.download(root=str(dest))
    except Exception as e:  # noqa: BLE001  (wandb's errors: no network, not found, no access, ...)
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InputError(f"{ref}: cannot fetch the W&B artifact ({why})") from None
    return dest


def resolve_checkpoint(ref: str | Path) -> Path:
    """THE resolver: a checkpoint directory from a path (directory or its model.safetensors), a bundled
    model name, or a W&B artifact ``wandb:ENTITY/PROJECT/NAME:ALIAS`` (:func:`fetch_wandb_checkpoint`). A run
    directory gives its latest valid checkpoint (:func:`latest_checkpoint`, both layouts)."""
    p = fetch_wandb_checkpoint(str(ref)) if str(ref).startswith("wandb:") else Path(ref)
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    if p.is_dir():
        if not (p / WEIGHTS).exists() and checkpoint_dirs(p):  # a run directory
            latest = latest_checkpoint(p)
            if latest is None:
                raise CheckpointError(f"{p}: run directory has no complete checkpoint")
            return latest
        if not is_complete(p):
            raise CheckpointError(f"{p}: incomplete checkpoint (needs {WEIGHTS}, {CONFIG}, {STATE})")
        return p
    bundled = BUNDLED_DIR / str(ref)
    if "/" not in str(ref) and is_complete(bundled):
        return bundled
    names = ", ".join(d.name for d in bundled_models()) or "none"
    raise CheckpointError(f"{ref}: not a checkpoint directory or a bundled model (bundled: {names})")


def announce_resume(run_name: str, checkpoint: Path) -> None:
    """Say on stderr which checkpoint a run resumes from: ``resuming run R from step N (path)``, with the
    learning-rate scale when rollbacks lowered it. A run never resumes silently (the decision is
    trainers/loop.py:resume_point)."""
    state = json.loads((checkpoint / STATE).read_text())
    scale = state.get("lr_scale", 1.0)
    say(f"resuming run {run_name} from step {state['step']} ({checkpoint})"
         + (f", lr scale {scale:g}" if scale != 1 else ""))

"""``sparsefold launch``: run a training (or a sweep) on a Ray cluster as a Ray Job.

    sparsefold launch CONFIG [key=value ...] --address http://HEAD:8265 [--follow] [--sweep] [--env NAME[=VALUE]]

The job's entrypoint is the same command as on a laptop, ``python -m sparsefold train CONFIG key=value ...``
(``sweep SPEC ...`` with ``--sweep``); it is validated here, before anything is submitted (a bad key exits 2
and submits nothing). Submission goes through ``ray.job_submission.JobSubmissionClient``; the job id is
printed on stdout, and ``--follow`` streams the job's logs to stdout and returns its exit status.

What the job's runtime_env ships (``working_dir``, a staging copy made per submission) is an ALLOWLIST,
never the whole checkout (which may hold ``.env``, ``.netrc``, ``.aws/credentials``, ``id_rsa``, runs, W&B
files):

* from the project checkout sparsefold is installed from (when it is one): :data:`ROOT_FILES` and the
  config folders :data:`CONFIG_DIRS`, so a config named by its relative path (``cluster/cscnet.yaml``)
  resolves in the job exactly as it does here;
* in every copied folder only files with a suffix in :data:`SHIP_SUFFIXES` whose path has no dotfile, no
  secret-looking name (:data:`SECRET_FILE`), no symlink and no output/cache folder (:data:`NEVER_DIRS`);
* the import package ``sparsefold/`` assembled from where Python imports it *now*: ``sparsefold/`` plus
  the top-level folders that pyproject's ``package-dir`` maps into it (``models/`` →
  ``sparsefold/models/``, ...). The checkout's own folders are left out: Ray puts ``working_dir`` first on
  ``PYTHONPATH`` (and ``python -m`` puts the cwd first on ``sys.path``), where the top-level ``datasets/`` and
  ``sweeps/`` would shadow Hugging Face's ``datasets`` and W&B's ``sweeps``, and the bare ``sparsefold/``
  would hide its mapped subpackages. So the job (driver, Train controller and workers) imports exactly the
  local code, editable install or not, and a copy installed on the cluster is ignored;
* the CONFIG/SPEC named on the command line: at its relative path when inside the checkout, else as
  ``launch/<name>``.

Everything this command prints or logs (the ``--dry-run`` plan, the submitted entrypoint, errors, the
followed logs) goes through :func:`mask_secrets`: the value of any name containing KEY, TOKEN, SECRET,
PASSWORD or CREDENTIAL reads ``***`` (the job itself receives the real values).

Not shipped: dependencies. The nodes need torch, ray[default,train,tune]==2.60.0 and the project's other
requirements (cluster/aws.yaml and gcp.yaml install them; add ``pip:`` through ``--runtime-env FILE``
otherwise). Paths in the config are resolved on the cluster: ``trainer.output_dir`` must be absolute
(a shared/NFS path) or a URL (``s3://``, ``gs://``; Ray path) -- a relative one would land in the job's
temporary working directory and is refused; relative data paths get a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml

from sparsefold.config import ConfigError, is_url, load_run_config, spec_options
from sparsefold.sweeps.spec import load_spec
from sparsefold.trainers.ray_env import RAY_TRAIN_ENV

SUBPACKAGES = ("models", "datasets", "trainers", "sweeps")  # = pyproject's packages (tests/test_launch.py)
ROOT_FILES = ("pyproject.toml", "README.md")  # from the checkout's top level
CONFIG_DIRS = ("cluster",)  # checkout folders of configs that commands name by relative path
SHIP_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".md", ".safetensors")  # code, configs, bundled models
NEVER_DIRS = {"runs", "wandb", "build", "dist", "venv", "__pycache__"}  # outputs, environments, caches
SECRET_FILE = re.compile(r"^\.|^id_(rsa|dsa|ecdsa|ed25519)|\.(pem|key|p12|pfx|crt)$|credential|secret|token|passw|netrc",
                         re.IGNORECASE)  # never shipped, whatever their suffix (dotfiles: .env, .aws/, .git/)
SECRET_NAME = re.compile(  # names whose values are masked in output: WANDB_API_KEY, apikey, HF_TOKEN (not KeyError)
    r"(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)S?(?![a-z])", re.IGNORECASE)
SECRET_ASSIGNMENT = re.compile(  # NAME=value, NAME: value, "NAME": "value" in text (the value may be quoted)
    r"\b([\w.-]*(?:" + SECRET_NAME.pattern + r")[\w.-]*)([\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;]+)", re.IGNORECASE)
JOB_ENV = {  # defaults of the job's env_vars (reach driver, Train controller and workers)
    "PYTHONUNBUFFERED": "1",  # logs stream while the job runs
    **RAY_TRAIN_ENV,
}


def package_dirs() -> dict[str, Path]:
    """Import name → source folder of ``sparsefold`` and each subpackage (follows package-dir mappings)."""
    out = {}
    for name in ("sparsefold", *(f"sparsefold.{s}" for s in SUBPACKAGES)):
        spec = find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"launch: cannot locate package {name}")
        out[name] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return out


def project_root() -> Path | None:
    """The checkout sparsefold is imported from (the folder with its pyproject.toml), or None."""
    root = package_dirs()["sparsefold"].parent
    py = root / "pyproject.toml"
    return root if py.is_file() and 'name = "sparsefold"' in py.read_text() else None


def shippable(rel: Path) -> bool:
    """Whether a file at ``rel`` (relative to a copied folder) goes into the job (module docstring)."""
    return rel.suffix in SHIP_SUFFIXES and not any(
        SECRET_FILE.search(part) or part in NEVER_DIRS or part.endswith(".egg-info") for part in rel.parts)


def _copy_allowed(src: Path, dst: Path) -> None:
    """Copy the :func:`shippable` regular files under ``src`` (never through a symlink) to ``dst``."""
    for folder, dirs, names in os.walk(src):  # os.walk does not descend into symlinked folders
        dirs[:] = [d for d in dirs if not Path(folder, d).is_symlink()]
        for name in names:
            f = Path(folder, name)
            rel = f.relative_to(src)
            if f.is_symlink() or not shippable(rel):
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(f, dst / rel)
            except FileNotFoundError:  # removed while copying (another process's temp file)
                pass


def stage(dest: Path, files: Sequence[Path] = ()) -> dict[Path, str]:
    """Fill ``dest`` with the job's working_dir (an allowlist: module docstring); returns {file given: its
    path in dest}."""
    pkgs, root = package_dirs(), project_root()
    if root is not None:
        for name in ROOT_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, dest / name)
        for name in CONFIG_DIRS:
            if (root / name).is_dir() and not (root / name).is_symlink():
                _copy_allowed(root / name, dest / name)
    top = dest / "sparsefold"
    shutil.rmtree(top, ignore_errors=True)
    _copy_allowed(pkgs["sparsefold"], top)
    for name, src in pkgs.items():
        if name != "sparsefold" and not src.is_relative_to(pkgs["sparsefold"]):  # mapped from elsewhere
            _copy_allowed(src, top / name.split(".", 1)[1])
    where = {}
    for f in files:  # named on the command line: shipped whatever the allowlist says
        f = Path(f).resolve()
        rel = f.relative_to(root).as_posix() if root is not None and f.is_relative_to(root) else f"launch/{f.name}"
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / rel)
        where[f] = rel
    return where


def _masked_assignment(m: re.Match) -> str:
    quote = m[3][0] if m[3][0] in "\"'" else ""  # keep a quoted value quoted (JSON stays JSON)
    return f"{m[1]}{m[2]}{quote}***{quote}"


def mask_secrets(obj: Any) -> Any:
    """``obj`` with secret-looking values replaced by ``***``, for anything printed or logged: in a mapping,
    the value of a key matching :data:`SECRET_NAME`; in text, ``NAME=value`` / ``NAME: value`` with such a
    NAME and the password of a URL (``https://user:***@host``). Lists and mappings are masked recursively."""
    if isinstance(obj, dict):
        return {k: "***" if SECRET_NAME.search(str(k)) and v not in (None, "") else mask_secrets(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    text = SECRET_ASSIGNMENT.sub(_masked_assignment, obj)
    return re.sub(r"(://[^/\s:@]+):[^/\s@]+@", r"\1:***@", text)


def _say(msg: str, out: Any = None) -> None:
    """Print one line (to stderr unless ``out``) through :func:`mask_secrets`: how this module prints."""
    print(mask_secrets(msg), file=out or sys.stderr, flush=True)


def _warn(msg: str) -> None:
    _say(f"[sparsefold] warning: {msg}")


def _only_relative(spec: str) -> list[str]:
    """The options of a data spec (``a|b`` fallbacks) when every one is a relative local path, else []."""
    options = spec_options(spec)
    relative = [p for p in options if p != "builtin:skimage" and not is_url(p) and not p.startswith("pipe:")
                and not os.path.isabs(os.path.expanduser(p))]
    return relative if len(relative) == len(options) else []


def check_train(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """Validate a training config as ``sparsefold train`` would, plus what a cluster needs; returns the
    config file (None: the packaged quickstart) and the overrides. Raises ConfigError."""
    if config is not None and "=" in config:
        overrides = [config, *overrides]
        config = None
    cfg = load_run_config(config, overrides)
    out = cfg.trainer.output_dir
    if not is_url(out) and not os.path.isabs(os.path.expanduser(out)):
        raise ConfigError(f"trainer.output_dir: {out!r} is relative: on the cluster it would land in the job's "
                          "temporary working directory; give an absolute path every node sees, or s3://, gs://")
    for key in ("train", "val"):
        for p in _only_relative(getattr(cfg.data, key)):
            _warn(f"data.{key}: {p!r} is relative: the job resolves it in its working directory on the cluster "
                  "(a copy of the project); use an absolute path every node sees, or s3://, gs://, https:// shards")
    if not cfg.ray.enabled:
        _warn("ray.enabled=false: the training runs inside the job's driver process (on the head node)")
    return config, overrides


def check_sweep(spec: str | None, overrides: list[str]) -> None:
    """Validate a sweep spec as ``sparsefold sweep`` would; its storage must be absolute. Raises ConfigError."""
    if spec is None or "=" in spec:
        raise ConfigError("spec: --sweep needs a sweep spec file")
    load_spec(spec, overrides)
    raw = next((o.split("=", 1)[1] for o in overrides if o.startswith("storage=")), None)
    if raw is None and Path(spec).is_file():
        raw = (yaml.safe_load(Path(spec).read_text()) or {}).get("storage")
    if not raw or not os.path.isabs(os.path.expanduser(str(raw))):
        raise ConfigError(f"storage: {raw or 'runs/sweeps (default)'!r} is relative: on the cluster it would land in "
                          "the job's temporary working directory; pass storage=/absolute/shared/path")


def runtime_env(working_dir: Path, env: list[str], extra: str | None) -> dict[str, Any]:
    """The job's runtime_env: the staged working_dir, JOB_ENV < ``--runtime-env FILE`` < ``--env``."""
    out: dict[str, Any] = {}
    if extra:
        out = yaml.safe_load(Path(extra).read_text()) or {}
        if not isinstance(out, dict):
            raise ConfigError(f"--runtime-env: {extra} must hold a mapping")
        for key in ("working_dir", "py_modules", "excludes"):
            if out.pop(key, None) is not None:
                _warn(f"--runtime-env: {key} ignored (launch ships the project itself)")
    env_vars = {**JOB_ENV, **(out.get("env_vars") or {})}
    for item in env:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise ConfigError(f"--env: {name} is not set in this shell")
            value = os.environ[name]
        env_vars[name] = value
    return {**out, "working_dir": str(working_dir), "env_vars": {k: str(v) for k, v in env_vars.items()}}


def enable_token_auth() -> None:
    """Ray 2.60 token auth: send the token when one is available (RAY_AUTH_TOKEN[_PATH], ~/.ray/auth_token)
    and RAY_AUTH_MODE is unset -- what ``ray start`` itself does. A cluster without auth ignores it."""
    import logging

    try:
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:
        return
    logging.getLogger(auth.__name__).setLevel(logging.ERROR)  # its "enabled for this cluster" is for servers
    auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def follow(client: Any, job_id: str) -> int:
    """Stream the job's logs to stdout until it ends; its exit status (0 when it SUCCEEDED)."""
    import time

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(mask_secrets(chunk))
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001  (the log stream broke: the job's status still decides)
        _warn(f"log stream of {job_id} ended early ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "waiting for the job to finish")
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(0.5)
    info = client.get_job_info(job_id)
    _say(f"[sparsefold] job {job_id}: {status.value}" + (f" ({info.message})" if info.message else ""))
    if status.value == "SUCCEEDED":
        return 0
    return info.driver_exit_code if info.driver_exit_code else 1


def main(a: argparse.Namespace) -> int:
    """``sparsefold launch`` (arguments in cli.py). Exit 2: bad config/arguments, nothing submitted;
    1: the cluster is unreachable or the followed job failed."""
    address = a.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address: the Ray dashboard / Jobs API, e.g. http://127.0.0.1:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    overrides = list(a.overrides)
    if a.sweep:
        check_sweep(a.config, overrides)
        command, target = "sweep", a.config
    else:
        command, (target, overrides) = "train", check_train(a.config, overrides)
    with tempfile.TemporaryDirectory(prefix="sparsefold-job-") as tmp:
        where = stage(Path(tmp), [Path(target)] if target else [])
        args = [where[Path(target).resolve()]] if target else []
        entrypoint = shlex.join(["python", "-m", "sparsefold", command, *args, *overrides])
        env = runtime_env(Path(tmp), a.env, a.runtime_env)
        if a.dry_run:
            files = sum(1 for p in Path(tmp).rglob("*") if p.is_file())
            plan = {"entrypoint": entrypoint, "runtime_env": {**env, "working_dir": f"<{files} files>"}}
            _say(json.dumps(mask_secrets(plan)), sys.stdout)
            return 0
        enable_token_auth()
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env,
                                       metadata={"sparsefold": command, "config": str(target or "")})
        except Exception as e:  # noqa: BLE001  (connection, auth, HTTP errors: one line, exit 1)
            _say(f"error: Ray Jobs API at {address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return 1
    print(job_id, flush=True)
    _say(f"[sparsefold] submitted {job_id} to {address}: {entrypoint}")
    if not a.follow:
        _say(f"[sparsefold] logs: ray job logs --follow --address {address} {job_id}")
        return 0
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        _say(f"\n[sparsefold] stopped following; the job keeps running (ray job stop --address {address} {job_id})")
        return 130


def add_parser(sub: Any) -> None:
    """The ``launch`` subcommand (called by cli.parser)."""
    s = sub.add_parser("launch", help="submit a training (or --sweep) to a Ray cluster as a Ray Job")
    s.add_argument("config", nargs="?", help="training config (default: the packaged quickstart), or sweep spec")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.add_argument("--address", help="Ray Jobs API, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its status")
    s.add_argument("--sweep", action="store_true", help="CONFIG is a sweep spec: run `sparsefold sweep`")
    s.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="job env var (NAME alone: copied from this shell, e.g. WANDB_API_KEY -- visible in the "
                        "job's info to anyone with cluster access)")
    s.add_argument("--runtime-env", metavar="FILE", help="YAML merged into the runtime_env (pip, env_vars, ...)")
    s.add_argument("--dry-run", action="store_true", help="print the entrypoint and runtime_env; submit nothing")
    s.set_defaults(fn=main)

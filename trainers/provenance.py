"""Where a run's numbers come from: the sparsefold version and git commit of the code, and the validation set
actually scored. Recorded in the run's ``provenance.json``, in every checkpoint's config.json (key
``provenance``) and in the W&B run config, so that two runs' numbers can be compared -- or seen not to be
comparable (another commit, or ``data.val=a|builtin:skimage`` falling back to other images on one machine).

No torch, no wandb here; ``git`` is asked once per process, with a timeout, and only when the package's
sources sit in a git checkout of this project (an installed wheel, or a checkout without ``.git`` as
synced to cluster nodes, gives ``"unknown"``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from sparsefold import __version__

SOURCE = Path(__file__).resolve().parent  # trainers/ in a checkout, sparsefold/trainers/ when installed


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=10)


@lru_cache(maxsize=1)
def git_commit() -> tuple[str, bool]:
    """(commit SHA, working tree has uncommitted changes to tracked files), or ("unknown", False) when the
    sources are not in a git checkout of sparsefold (a pyproject.toml naming it at the top) or git is
    missing. A venv inside some other repository does not count: its top must be this project."""
    try:
        top = _git("rev-parse", "--show-toplevel")
        pyproject = Path(top.stdout.strip()) / "pyproject.toml"
        if top.returncode or not pyproject.is_file() or 'name = "sparsefold"' not in pyproject.read_text():
            return "unknown", False
        head = _git("rev-parse", "HEAD")
        if head.returncode:
            return "unknown", False
        return head.stdout.strip(), _git("diff", "--quiet", "HEAD", "--").returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def code_version() -> dict[str, Any]:
    """{"sparsefold_version", "git_commit", "git_dirty"} of the running code."""
    commit, dirty = git_commit()
    return {"sparsefold_version": __version__, "git_commit": commit, "git_dirty": dirty}


def file_set(files: list[Path], spec: str) -> dict[str, Any]:
    """The validation images actually used: their folder (the common one), names relative to it, count and
    one SHA-256 over (name, content) of each in order -- not the spec string, whose ``a|b`` fallbacks
    resolve differently on different machines. ``spec`` is kept alongside."""
    if not files:
        return {"spec": spec, "dir": "", "files": [], "count": 0, "sha256": ""}
    root = Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files]))
    names = [Path(f).resolve().relative_to(root).as_posix() for f in files]
    h = hashlib.sha256()
    for name, f in zip(names, files):
        h.update(name.encode() + b"\0" + hashlib.sha256(Path(f).read_bytes()).digest())
    return {"spec": spec, "dir": str(root), "files": names, "count": len(files), "sha256": h.hexdigest()}

"""One writer per run directory: ``<run_dir>/.lock``, held for the whole run.

Two processes training the same run (the same command twice, a forgotten terminal, a resubmitted job)
would both write checkpoints into one directory and prune each other's files. The first one takes the
lock; the second stops at once with :class:`~sparsefold.errors.InputError` naming the holder.

How: the lock file is opened (created if needed) and locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``;
the holder's host, pid and start time are written into it as JSON. The kernel releases a flock when its
owner dies, however it dies (SIGKILL included), so on one machine "the owner is dead" is simply "the
flock could be taken". On NFS a flock taken on another client may not be seen here, so the JSON decides:
a lock file naming another host is taken over only by that host; one naming this host is taken over
when its pid is gone. A clean exit (also by an exception) removes the file and releases the lock.

Plain path: :func:`sparsefold.trainers.loop.train` holds it. Ray path: the driver holds it around
``TorchTrainer.fit`` (its workers write into the directory under the driver's lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparsefold.errors import InputError
from sparsefold.trainers.console import say

LOCK = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _holder(fd: int) -> dict[str, Any]:
    """The JSON the lock file holds ({} when empty or unreadable: a holder that has not written yet)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _provably_dead(holder: dict[str, Any]) -> bool:
    """Whether the process a lock file names is gone: only decidable for a process of this host."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return pid == os.getpid() or not _pid_alive(pid)  # our own pid: a leftover of a dead earlier process


def _busy(run_dir: Path, holder: dict[str, Any], remote: bool = False) -> InputError:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started', '?')})"
           if holder else "another process")
    hint = f"; if it is no longer running, delete {run_dir / LOCK}" if remote else ""
    return InputError(f"run dir {run_dir} is in use by {who}; wait for it or pick another trainer.run_name{hint}")


def _flock(fd: int) -> bool:
    """Take the kernel lock without waiting: True when taken, False when another process holds it.
    A filesystem without flock support leaves only the JSON check (True)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _acquire(run_dir: Path) -> int:
    """Open and lock ``run_dir/.lock``, write our JSON into it; returns the open descriptor."""
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd):
            holder = _holder(fd)
            os.close(fd)
            raise _busy(run_dir, holder)
        if not _same_file(fd, path):  # its owner removed it between our open and our flock: retry
            os.close(fd)
            continue
        holder = _holder(fd)
        if holder and not _provably_dead(holder):  # another host's (NFS), or a reused pid on this one
            os.close(fd)
            raise _busy(run_dir, holder, remote=True)
        if holder:
            say(f"{path}: taking over the lock of pid {holder.get('pid')} (no longer running)")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return fd


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run lock of ``run_dir`` (created if needed) for the ``with`` block; yields the lock path.

    Raises :class:`InputError` (one line) when another live process holds it or the directory cannot be
    created. Released (the file removed) on leaving the block, also by an exception."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _acquire(run_dir)
    except OSError as e:
        raise InputError(f"{run_dir}: cannot create the run directory or its lock ({e.strerror or e}); "
                         "check trainer.output_dir") from None
    try:
        yield run_dir / LOCK
    finally:
        if _same_file(fd, run_dir / LOCK):
            with contextlib.suppress(OSError):
                os.unlink(run_dir / LOCK)  # before the flock goes: a waiter then sees a new file
        os.close(fd)

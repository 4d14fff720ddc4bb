"""What a run shows on the terminal: one progress bar and ``[sparsefold]`` lines on stderr, once.

Every message of the trainers goes through :func:`say`, and the loop's progress bar through :func:`sink`'s
methods. A plain run draws them in its own process (:class:`Terminal`). Under Ray, rank 0's loop runs in a
worker whose output Ray would prefix with ``(RayTrainWorker pid=…)``, mix with its own logs and break the bar's
redraws; so the driver starts Ray with ``log_to_driver=False`` (trainers/ray_env.py), rank 0 makes a
:class:`Relay` its sink, which sends the same calls through a ``ray.util.queue.Queue``, and the driver draws
them (:func:`relayed`). The other ranks' output, and Ray's, stays in the Ray logs (copied to the run
directory). The sink is per process (module state), like ``sys.stderr`` itself.
"""

from __future__ import annotations

import contextlib
import queue as stdlib_queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

PREFIX = "[sparsefold] "
UPDATE_EVERY_S = 0.25  # a relayed bar sends at most this many updates per second (each is an actor call)


class Terminal:
    """The bar (tqdm, on stderr) and the lines of this process; a line is written above the bar."""

    def __init__(self) -> None:
        self.bar: Any = None

    def open_bar(self, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm  # the CLI's --version must not pay for it

        self.close()  # a restarted Ray worker opens it again
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def advance(self, n: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix)

    def move_to(self, step: int) -> None:
        """Set the bar to ``step`` (a rollback went back)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def line(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr) if self.bar is not None else print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Relay(Terminal):
    """A :class:`Terminal` in another process: each call becomes a ``(method, args)`` item on ``queue``.
    Bar advances are summed and sent at most every :data:`UPDATE_EVERY_S`, and before any other call."""

    def __init__(self, queue: Any) -> None:
        super().__init__()
        self.queue, self.pending, self.sent = queue, 0, 0.0
        self.postfix: dict[str, str] = {}

    def _send(self, method: str, *args: Any) -> None:
        if method != "advance":
            self._flush()
        self.queue.put((method, args))

    def _flush(self) -> None:
        if self.pending:
            n, self.pending = self.pending, 0
            self.queue.put(("advance", (n, self.postfix)))
            self.sent = time.monotonic()

    def open_bar(self, total: int, initial: int, desc: str) -> None:
        self._send("open_bar", total, initial, desc)

    def advance(self, n: int, postfix: dict[str, str]) -> None:
        self.pending, self.postfix = self.pending + n, postfix
        if time.monotonic() - self.sent >= UPDATE_EVERY_S:
            self._flush()

    def move_to(self, step: int) -> None:
        self._send("move_to", step)

    def line(self, text: str) -> None:
        self._send("line", text)

    def close(self) -> None:
        self._send("close")


_SINK: list[Terminal] = [Terminal()]


def sink() -> Terminal:
    """Where this process's bar and lines go."""
    return _SINK[0]


def use(target: Terminal) -> None:
    """Send this process's bar and lines to ``target`` from now on (a Ray worker: a :class:`Relay`)."""
    _SINK[0] = target


def say(message: str) -> None:
    """One ``[sparsefold] message`` line on stderr (above the bar), or on the driver's under Ray."""
    sink().line(PREFIX + message)


@contextlib.contextmanager
def relayed(queue: Any) -> Iterator[None]:
    """On the driver, while the body runs (``trainer.fit()``): draw what the workers' :class:`Relay` s send
    to ``queue`` (a ``ray.util.queue.Queue``; any object with ``get(timeout=)`` raising ``queue.Empty``);
    afterwards the rest of it, then close the bar."""
    done, term = threading.Event(), Terminal()

    def draw() -> None:
        while True:
            try:
                method, args = queue.get(timeout=0.1)
            except stdlib_queue.Empty:  # ray.util.queue.Empty is one
                if done.is_set():
                    break
                continue
            except Exception:  # noqa: BLE001 -- the queue's actor is gone (Ray shut down): nothing more to draw
                break
            getattr(term, method)(*args)
        term.close()

    thread = threading.Thread(target=draw, name="sparsefold-console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)

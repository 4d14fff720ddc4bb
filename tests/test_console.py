"""trainers/console.py: what a run shows on the terminal, drawn in this process or relayed from a Ray worker."""

from __future__ import annotations

import contextlib
import io
import queue
import re

import pytest

from sparsefold.trainers import console
from sparsefold.trainers.ray_env import ray_init_args


def script(target: console.Terminal) -> None:
    """What the loop does with its sink over a short run: bar, lines above it, a rollback, the end."""
    target.open_bar(6, 0, "run-a")
    for _ in range(3):
        target.advance(1, {"loss": "1.0e-01"})
    target.line("[sparsefold] step 3: val psnr 20.000 dB")
    target.move_to(2)
    for _ in range(4):
        target.advance(1, {"loss": "5.0e-02"})
    target.close()


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]


def test_a_relayed_run_draws_what_a_local_one_draws(monkeypatch) -> None:
    monkeypatch.setattr(console, "UPDATE_EVERY_S", 0.0)  # every advance sent: the same redraws as local
    with contextlib.redirect_stderr(io.StringIO()) as local:
        script(console.Terminal())
    q: queue.Queue = queue.Queue()
    with contextlib.redirect_stderr(io.StringIO()) as relayed, console.relayed(q):
        script(console.Relay(q))
    for out in (local.getvalue(), relayed.getvalue()):  # the same lines, the bar through the same counts
        assert [ln for ln in lines(out) if ln.startswith("[sparsefold]")] == ["[sparsefold] step 3: val psnr 20.000 dB"]
    counts = lambda out: [m for m in re.findall(r"(\d)/6 ", out)]
    assert counts(relayed.getvalue()) == counts(local.getvalue())
    assert "6/6" in relayed.getvalue()


def test_relay_sums_bar_updates_and_sends_them_before_a_line(monkeypatch) -> None:
    monkeypatch.setattr(console, "UPDATE_EVERY_S", 3600.0)
    q: queue.Queue = queue.Queue()
    relay = console.Relay(q)
    relay.sent = float("-inf")  # the first advance goes at once, the next ones wait
    for i in range(5):
        relay.advance(1, {"loss": str(i)})
    relay.line("hello")
    sent = [q.get_nowait() for _ in range(q.qsize())]
    assert sent == [("advance", (1, {"loss": "0"})), ("advance", (4, {"loss": "4"})), ("line", ("hello",))]


def test_say_goes_to_the_process_sink(monkeypatch) -> None:
    q: queue.Queue = queue.Queue()
    monkeypatch.setattr(console, "_SINK", [console.Relay(q)])
    console.say("resuming from step_0000010")
    assert q.get_nowait() == ("line", ("[sparsefold] resuming from step_0000010",))


@pytest.mark.parametrize(("env", "loud"), [(None, False), ("0", False), ("1", True)])
def test_ray_is_quiet_unless_verbose(monkeypatch, env, loud) -> None:
    import logging

    if env is None:
        monkeypatch.delenv("SPARSEFOLD_VERBOSE", raising=False)
    else:
        monkeypatch.setenv("SPARSEFOLD_VERBOSE", env)
    assert ray_init_args() == {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}


def test_verbose_flag_sets_the_variable(monkeypatch) -> None:
    from sparsefold.cli import main

    monkeypatch.delenv("SPARSEFOLD_VERBOSE", raising=False)
    assert main(["--verbose", "models"]) == 0
    import os

    assert os.environ.get("SPARSEFOLD_VERBOSE") == "1"
    monkeypatch.delenv("SPARSEFOLD_VERBOSE")

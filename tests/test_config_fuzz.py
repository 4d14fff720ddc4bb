"""Hypothesis over `sparsefold train` overrides: valid keys with random or hostile values, misspelled keys,
random strings, YAML specials. Every outcome is a validated config handed to the trainer (which is
replaced here by a stub, so nothing trains) or ONE stderr line with exit 2 -- never a traceback, never an
"internal error", never a non-finite number reaching the trainer."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsefold.cli import main  # noqa: E402
from sparsefold.config import SECTIONS, RunConfig  # noqa: E402
from sparsefold.models import MODELS  # noqa: E402

KEYS = sorted({f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
              | {f"model.{f.name}" for e in MODELS.values() for f in dataclasses.fields(e.config)})
YAML_SPECIALS = ["", "null", "~", "None", ".inf", "-.inf", ".nan", "1e400", "-0", "0x1F", "0o17", "1_000", "yes",
                 "off", "[1, 2", "{a: 1}", "{a: 1, a: 2}", "[]", "{}", "!!python/object/apply:os.system [ls]",
                 "!!binary aGVsbG8=", "&a 1", "*a", "&a [*a]", "'quoted'", '"\\u0000"', "a: b", "- x", "|", ">", "%YAML 1.1",
                 "---", "...", "/", "//x", "\x00", "builtin:skimage", "builtin:nope", "pipe:cat x", "s3://b/x",
                 "file:///nope", "ftp://h/x", "../x", "~/x", "cscnet", "dncnn", "lista", "true", "false"]

values = st.one_of(
    st.sampled_from(YAML_SPECIALS),
    st.integers(min_value=-10**20, max_value=10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.integers(-3, 40), max_size=4).map(lambda v: ",".join(map(str, v))),
    st.lists(st.integers(-3, 40), max_size=4).map(str),
    st.text(max_size=12),
)


def misspell(key: str, i: int) -> str:
    i %= len(key)
    return key[:i] + key[i + 1:] if key[i] != "." else key + "x"


overrides = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), values),
    st.builds(lambda k, i, v: f"{misspell(k, i)}={v}", st.sampled_from(KEYS), st.integers(0, 40), values),
    st.text(max_size=20),
), max_size=4)


@pytest.fixture
def stub_trainers(monkeypatch, tmp_path):
    """Run in an empty folder (relative output_dir / data paths land there) with training replaced by a stub
    that checks what it was handed."""
    import sparsefold.trainers.loop as loop
    import sparsefold.trainers.ray_train as ray_train

    handed: list[RunConfig] = []

    def fake(cfg: RunConfig) -> dict:
        assert isinstance(cfg, RunConfig)
        handed.append(cfg)
        return {"checkpoint": None, "steps": 0}

    monkeypatch.setattr(loop, "train", fake)
    monkeypatch.setattr(ray_train, "fit", fake)
    monkeypatch.chdir(tmp_path)
    return handed


def finite_numbers(cfg: object) -> bool:
    values = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]
    return all(finite_numbers(v) if dataclasses.is_dataclass(v) else not (isinstance(v, float) and not math.isfinite(v))
               for v in values)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=overrides)
@example(items=["model.name=[1]"])  # was: TypeError (unhashable list) with a traceback
@example(items=["optim.lr=.inf"])  # was: accepted, training on inf
@example(items=["trainer.output_dir=/dev/null/runs"])  # was: accepted, failing after the setup
@example(items=["\r"])  # was: a two-line error
def test_train_overrides_give_a_config_or_one_line_exit_2(items, stub_trainers, capsys, tmp_path):
    before = sorted(os.listdir(tmp_path))
    rc = main(["train", "--", *items])
    out, err = capsys.readouterr()
    assert rc in (0, 2), (items, rc, err)
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(("config error: ", "error: ")), (items, err)
    else:
        assert finite_numbers(stub_trainers[-1]), (items, stub_trainers[-1])
        assert '"steps": 0' in out.strip().splitlines()[-1]
    assert "Traceback" not in err and "internal error" not in err, (items, err)
    assert sorted(os.listdir(tmp_path)) == before  # validation creates nothing


def test_the_strategy_reaches_both_outcomes(stub_trainers, capsys):
    """The property above is not vacuous: valid overrides pass, invalid ones are refused."""
    assert main(["train", "--", "model.depth=3", "optim.lr=0.01", "trainer.output_dir=out"]) == 0
    assert main(["train", "--", "model.depth=.nan"]) == 2
    assert "model.depth: expected an integer" in capsys.readouterr().err
    assert Path.cwd().joinpath("out").exists() is False

"""The import layering of ``sparsefold.*`` (``[tool.importlinter]`` in pyproject.toml), enforced in CI.

import-linter (through grimp) reads a package from ONE folder, while this repository installs four top-level
folders as subpackages of ``sparsefold`` (``[tool.setuptools.package-dir]``); so the installed sources are
first copied into one tree under a tmp dir (``installed_layout`` in conftest.py) and the linter runs
there, in a subprocess (its own sys.path). Every import counts, including one inside a function: the
second test plants such imports and expects the contracts to break.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("importlinter")  # the dev extra; it needs Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT, str(PYPROJECT)], cwd=tree, capture_output=True,
                          text=True, timeout=120)


def test_the_import_contracts_hold(tmp_path: Path, package_tree: Callable[[Path], Path]) -> None:
    out = lint(package_tree(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and " kept" in out.stdout, out.stdout
    assert "Analyzed " in out.stdout and int(out.stdout.split("Analyzed ")[1].split()[0]) >= 50  # every subpackage


PLANTED = [  # (file in the installed layout, a function-level import it gains, what must break)
    ("sparsefold/models/dncnn.py", "from sparsefold.trainers import loop",
     ["sparsefold.models.dncnn -> sparsefold.trainers.loop", "models know nothing"]),
    ("sparsefold/models/prox.py", "import wandb", ["sparsefold.models.prox -> wandb"]),
    ("sparsefold/sweeps/spec.py", "from sparsefold.sweeps import runner", ["No cycles are allowed in sparsefold.sweeps"]),
    ("sparsefold/config.py", "from sparsefold import cli", ["sparsefold.config is not allowed to import sparsefold.cli"]),
]


@pytest.mark.parametrize(("path", "statement", "expected"), PLANTED, ids=[p[0].split("/", 1)[1] for p in PLANTED])
def test_a_planted_function_level_import_breaks_a_contract(tmp_path: Path, package_tree: Callable[[Path], Path],
                                                            path: str, statement: str, expected: list[str]) -> None:
    tree = package_tree(tmp_path)
    with open(tree / path, "a", encoding="utf-8") as f:
        f.write(f"\n\ndef _planted() -> None:\n    {statement}  # noqa\n")
    out = lint(tree)
    assert out.returncode == 1, out.stdout + out.stderr
    for text in expected:
        assert text in " ".join(out.stdout.split()), (text, out.stdout)

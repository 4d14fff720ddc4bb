"""mypy is clean on ``sparsefold.*`` (``[tool.mypy]`` in pyproject.toml), enforced in CI.

Like tests/test_layers.py, the installed sources are first copied into one tree (``installed_layout`` in
conftest.py: mypy, too, reads a package from one folder) and mypy runs there in a subprocess. The tests
share one mypy cache: the first run is cold (~20 CPU-s on the 2-core machine, most of it reading torch's
stubs), the next is incremental (~1 s). The second test plants a type error and expects mypy to name it, so
that a configuration that checks nothing cannot pass.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import pytest

pytest.importorskip("mypy")  # the dev extra

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's runs (mypy keys it by module and file content, not by folder)."""
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(tree: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(cache),
                           "sparsefold"], cwd=tree, capture_output=True, text=True, timeout=600)


def test_the_package_type_checks(tmp_path: Path, package_tree: Callable[[Path], Path], mypy_cache: Path) -> None:
    out = mypy(package_tree(tmp_path), mypy_cache)
    assert out.returncode == 0 and "Success: no issues found" in out.stdout, out.stdout + out.stderr
    checked = int(re.search(r"in (\d+) source files", out.stdout)[1])
    assert checked == len(list(tmp_path.rglob("*.py"))), out.stdout  # every module of every subpackage


def test_a_planted_type_error_is_reported(tmp_path: Path, package_tree: Callable[[Path], Path],
                                          mypy_cache: Path) -> None:
    planted = package_tree(tmp_path) / "sparsefold" / "errors.py"
    with open(planted, "a", encoding="utf-8") as f:
        f.write('\n\ndef _planted() -> int:\n    return "x"\n')
    line = len(planted.read_text(encoding="utf-8").splitlines())  # the `return "x"`
    out = mypy(tmp_path, mypy_cache)
    assert out.returncode == 1, out.stdout + out.stderr
    assert (f'sparsefold/errors.py:{line}: error: Incompatible return value type (got "str", expected "int")'
            in out.stdout), out.stdout


def test_no_module_the_package_imports_is_skipped(tmp_path: Path, package_tree: Callable[[Path], Path]) -> None:
    """``follow_imports = "skip"`` (speed) is only for what our dependencies import: a module sparsefold
    imports itself must be analysed, or mypy checks its calls against Any."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    overrides = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["mypy"]["overrides"]
    skipped = [m for o in overrides if o.get("follow_imports") == "skip" for m in o["module"]]
    imported = set()
    for file in package_tree(tmp_path).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    assert skipped and len(imported) > 50
    assert not [(m, p) for m in imported for p in skipped if fnmatch(m, p) or m == p.removesuffix(".*")]

"""The shape the architecture pass left the package in, kept: no function over 60 lines (the CLI's argparse
table excepted), and no comment or docstring that points at ../shared (a clone does not have it)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = [f for d in ("sparsefold", "models", "datasets", "trainers", "sweeps") for f in sorted((ROOT / d).rglob("*.py"))]
LONG_ALLOWED = {"sparsefold/cli.py": frozenset({"parser"})}  # one declarative argparse table


def long_functions(path: Path, limit: int = 60, allowed: frozenset[str] = frozenset()) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno is not None
            and n.end_lineno - n.lineno + 1 > limit and n.name not in allowed]


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_function_over_60_lines(path: Path) -> None:
    assert not long_functions(path, allowed=LONG_ALLOWED.get(path.relative_to(ROOT).as_posix(), frozenset())), path


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path / "m.py") == ["f (62 lines)"]


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a module."""
    text = path.read_text()
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
           if t.type == tokenize.COMMENT]
    for n in ast.walk(ast.parse(text)):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(n, clean=False)
            if doc:
                out.append((getattr(n, "lineno", 1), doc))
    return out


def test_no_comment_or_docstring_points_at_shared() -> None:
    hits = [f"{f.relative_to(ROOT)}:{line}" for f in PACKAGE for line, text in comments_and_docstrings(f)
            if "../shared" in text or "shared/notes" in text]
    assert not hits


def test_the_scan_sees_a_comment_and_a_docstring(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text('"""Module."""\n\n\ndef f():\n    """See ../shared/notes."""\n    return 1  # ../shared\n')
    assert [line for line, text in comments_and_docstrings(tmp_path / "m.py") if "../shared" in text] == [6, 4]

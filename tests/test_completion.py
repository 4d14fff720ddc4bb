"""Shell completion (argcomplete, the ``completion`` extra): the shell's request is answered by the real parser."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("line", "want"), [("sparsefold tr", "train"), ("sparsefold train --pr", "--print-config"),
                                            ("sparsefold evaluate --ima", "--images")])
def test_completion_answers_from_the_parser(tmp_path, line, want) -> None:
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\v", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    r = subprocess.run([sys.executable, "-m", "sparsefold"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert want in [w.strip() for w in out.read_text().split("\v")]

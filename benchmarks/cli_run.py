"""The one way the benchmark scripts call the CLI: ``python -m sparsefold ARGS`` in the repository root, its last
stdout line parsed as JSON (every command that measures prints one), a failure ending the script with the
command's stderr. Imported by scripts run as ``python benchmarks/NAME.py`` (their folder is on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sparsefold(*args: str) -> dict:
    """Run ``python -m sparsefold ARGS``; its last stdout line as a dict, plus ``wall_seconds``."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sparsefold", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"sparsefold {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out

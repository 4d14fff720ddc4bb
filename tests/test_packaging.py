"""One import package: the wheel holds only sparsefold*, and our folders never shadow `datasets`/`sweeps`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_only_sparsefold(tmp_path):
    # built from a copy: setuptools builds in the source tree (build/, a second copy of every module there)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("sparsefold-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"sparsefold", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for sub in ("models", "datasets", "trainers", "sweeps"):
        assert f"sparsefold/{sub}/__init__.py" in names
    assert "sparsefold/configs/quickstart.yaml" in names
    assert "sparsefold/configs/papers/cscnet.yaml" in names  # the paper recipes ship too


def test_top_level_names_do_not_resolve_to_our_folders(tmp_path):
    code = ("import importlib.util, json; print(json.dumps({n: (importlib.util.find_spec(n).origin "
            "if importlib.util.find_spec(n) else None) for n in ['datasets', 'models', 'sweeps', 'trainers']}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    for name, origin in __import__("json").loads(out.stdout).items():
        assert origin is None or not origin.startswith(str(ROOT)), (name, origin)
    import sparsefold.datasets

    assert Path(sparsefold.datasets.__file__).resolve().parent == ROOT / "datasets"

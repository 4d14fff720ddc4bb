"""The model registry is plain data: reading it, validating a config's other sections and listing the
models (``sparsefold models``) import no torch; a model's classes are resolved on first use.

(That each entry's ``params`` equals a built model's count is tests/test_models.py's
``test_default_config_has_the_documented_parameter_count``.)"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import sparsefold.models
from sparsefold.models import MODELS, ModelEntry

# Runs a snippet in a fresh interpreter, then prints JSON: the snippet's output and whether torch got imported.
WRAPPER = """
import contextlib, io, json, sys
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = {call}
print(json.dumps({{"rc": rc, "torch": "torch" in sys.modules, "out": out.getvalue()}}))
"""


def run_fresh(call: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", WRAPPER.format(call=call)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_models_command_imports_no_torch() -> None:
    """``sparsefold models --json`` lists every architecture and bundled model without importing torch
    (importing torch alone costs seconds)."""
    res = run_fresh("__import__('sparsefold.cli').cli.main(['models', '--json'])")
    assert res["rc"] == 0
    assert res["torch"] is False, "sparsefold models imported torch"
    listed = json.loads(res["out"].strip().splitlines()[-1])
    assert [a["name"] for a in listed["architectures"]] == list(MODELS)
    assert [a["params"] for a in listed["architectures"]] == [e.params for e in MODELS.values()]
    assert all(b["model"] in MODELS for b in listed["bundled"])


def test_registry_and_config_import_no_torch() -> None:
    """The registry and the config module load without torch; resolving an entry's class imports it."""
    res = run_fresh("len(__import__('sparsefold.config').config.MODELS)")
    assert res == {"rc": len(MODELS), "torch": False, "out": ""}
    res = run_fresh("__import__('sparsefold.models').models.MODELS['cscnet'].module.__name__")
    assert res["rc"] == "CSCNet" and res["torch"] is True


def test_entries_are_plain_data() -> None:
    for name, entry in MODELS.items():
        assert isinstance(entry, ModelEntry)
        assert all(isinstance(v, str) and v for v in (entry.file, entry.class_name, entry.config_name, entry.summary))
        assert isinstance(entry.params, int) and entry.params > 0, name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_entries_resolve_to_the_classes_of_their_file(name: str) -> None:
    entry = MODELS[name]
    file = importlib.import_module(f"sparsefold.models.{entry.file}")
    assert entry.module is getattr(file, entry.class_name)
    assert entry.config is getattr(file, entry.config_name)
    assert entry.config().name == name


def test_package_exports_the_model_classes_lazily() -> None:
    from sparsefold.models import CSCNet, DCEAUCConfig, likelihoods
    from sparsefold.models.cscnet import CSCNet as direct
    from sparsefold.models.dcea import DCEAUCConfig as direct_cfg

    assert CSCNet is direct and DCEAUCConfig is direct_cfg
    assert likelihoods.__name__ == "sparsefold.models.likelihoods"  # submodules still import normally
    assert {"CSCNet", "DCEAUCConfig", "LIDIA"} <= set(sparsefold.models.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sparsefold.models.Nope  # noqa: B018

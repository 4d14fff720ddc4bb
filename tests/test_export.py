"""``sparsefold export`` (trainers/export.py): every bundled model exported to ONNX runs in onnxruntime at
two image sizes and batch sizes (dynamic B, H, W) with the PyTorch eval output to 1e-4; TorchScript where a
trace generalizes; a model that cannot export is refused with one line saying why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsefold.cli import main
from sparsefold.errors import InputError
from sparsefold.models.contract import Deepening
from sparsefold.trainers import export as ex
from sparsefold.trainers.checkpoint import load_model

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TOLERANCE = 1e-4
SIZES = ((2, 40, 48), (3, 56, 64))  # (B, H, W): neither the export example's batch and size only


def max_differences(wrapped: ex.Exported, run) -> list[float]:
    """max |run(inputs) − PyTorch| at each of SIZES (other inputs than the export's example)."""
    diffs = []
    for seed, (b, h, w) in enumerate(SIZES, start=1):
        args = ex.example_inputs(wrapped, h, w, batch=b, seed=seed)
        with torch.no_grad():
            ref = wrapped(*args).numpy()
        diffs.append(float(np.abs(run(args) - ref).max()))
    return diffs


def onnx_runner(path: Path, names: list[str]):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    return lambda args: session.run(None, {k: a.numpy() for k, a in zip(names, args)})[0]


def test_onnx_equals_pytorch(bundled_name: str, tmp_path: Path) -> None:
    """Each bundled model's weights and configuration, at 2 unfoldings (export time grows with the unrolled
    graph: ~10 CPU-s for CDLNet's 20 layers; the unfoldings repeat the same operations, and the full depth
    goes through the same path in test_full_depth_through_the_checkpoint_path)."""
    model = load_model(bundled_name)[0]
    name, out = model.config.name, tmp_path / "model.onnx"
    if name in ex.NOT_EXPORTABLE:
        with pytest.raises(InputError, match=f"cannot export {name} to ONNX: ") as e:
            ex.export_model(model, out)
        assert "\n" not in str(e.value) and not out.exists()
        return
    if isinstance(model, Deepening):
        model.set_depth(min(2, model.depth))
    info = ex.export_model(model, out)
    assert info["exporter"] == "dynamo" and info["outputs"] == ["denoised"]
    diffs = max_differences(ex.Exported(model), onnx_runner(out, info["inputs"]))
    assert max(diffs) <= TOLERANCE, diffs


def test_full_depth_through_the_checkpoint_path(tmp_path: Path) -> None:
    info = ex.export_checkpoint("lista", tmp_path / "lista.onnx")  # 5 unfoldings
    assert info["checkpoint"].endswith("lista") and info["inputs"] == ["noisy"]
    diffs = max_differences(ex.Exported(load_model("lista")[0]), onnx_runner(tmp_path / "lista.onnx", ["noisy"]))
    assert max(diffs) <= TOLERANCE, diffs


@pytest.mark.parametrize("bundled", ["dncnn", "lista"])
def test_torchscript_equals_pytorch(bundled: str, tmp_path: Path) -> None:
    info = ex.export_checkpoint(bundled, tmp_path / "model.pt")
    loaded = torch.jit.load(info["output"])
    diffs = max_differences(ex.Exported(load_model(bundled)[0]), lambda args: loaded(*args).detach().numpy())
    assert max(diffs) <= TOLERANCE, diffs


def test_torchscript_refused_where_a_trace_cannot_follow_the_size(tmp_path: Path, capsys) -> None:
    assert main(["export", "cscnet", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot export cscnet to TorchScript:") and "\n" not in err
    assert not (tmp_path / "m.pt").exists()


def test_cli_export_and_bad_output(tmp_path: Path, capsys) -> None:
    assert main(["export", "dncnn", str(tmp_path / "d.pt")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "dncnn" and out["format"] == "pt" and (tmp_path / "d.pt").is_file()
    assert main(["export", "dncnn", str(tmp_path / "d.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_sigma_is_an_input_of_noise_adaptive_models() -> None:
    assert ex.Exported(load_model("cdlnet")[0]).sigma and not ex.Exported(load_model("cscnet")[0]).sigma

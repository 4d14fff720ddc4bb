"""``sparsefold export CKPT OUT``: a checkpoint -> an ONNX graph (``OUT.onnx``) or a TorchScript module
(``OUT.pt``) that runs without sparsefold, for any image size and batch.

Inputs of the exported graph: ``noisy`` (B, C, H, W) float32 in [0, 1], and ``sigma`` (B,) in 0..255 for
the noise-adaptive models (``noise_adaptive=True``: their thresholds depend on σ), which the caller must
then give (a blind caller estimates it first; see ``models/noise_level.py``). Output: ``denoised``
(B, C, H, W), the eval-mode forward (no clipping). B, H and W are dynamic.

ONNX: torch.onnx.export with the dynamo exporter first, the TorchScript-based one if that fails; opset 18
(the first with Col2Im, i.e. ``F.fold``, which every unfolded model uses). TorchScript: ``torch.jit.trace``,
checked on a second size and batch: a trace records Python control flow and integer arithmetic once, so a
model whose padding depends on H×W would replay the example's; it is refused instead of exported wrong.

What cannot export is refused with one line saying why (:data:`NOT_EXPORTABLE`).
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from sparsefold.errors import InputError
from sparsefold.trainers.checkpoint import load_model

OPSET = 18  # both exporters: Col2Im (F.fold) needs 18
CHECK_SIZES = ((40, 48), (56, 64))  # H, W of the export checks: two sizes, so dynamic H×W is exercised

# model name -> why it cannot be exported to ONNX (one line each, shown by the error and the README);
# refused at once: the dynamo exporter takes about a minute to fail on LIDIA (torch 2.13)
NOT_EXPORTABLE: dict[str, str] = {
    "lidia": "its neighbour search (models/neighbours.py: strided windows of every offset, sizes that depend on "
             "H×W) traces in torch.export but fails ONNX decomposition (a view with symbolic strides), and the "
             "TorchScript-based exporter has no Unfold of dynamic size; run it in PyTorch",
}


def takes_sigma(model: nn.Module) -> bool:
    """Whether the model's output depends on σ: the noise-adaptive thresholds of CSCNet and CDLNet."""
    return bool(getattr(model.config, "noise_adaptive", False))


class Exported(nn.Module):
    """The eval-mode forward with the exported signature: ``(noisy)`` or ``(noisy, sigma)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.sigma = takes_sigma(model)

    def forward(self, noisy: Tensor, sigma: Tensor | None = None) -> Tensor:
        return self.model(noisy, sigma) if self.sigma else self.model(noisy)


def example_inputs(wrapped: Exported, h: int, w: int, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    """A noisy batch (B, C, h, w) in [0, 1] (and σ (B,) when the model takes it), seeded."""
    g = torch.Generator().manual_seed(seed)
    c = getattr(cast(Any, wrapped.model).config, "channels", 1)
    y = (torch.rand(batch, c, h, w, generator=g) * 0.8 + 0.1 + 0.1 * torch.randn(batch, c, h, w, generator=g))
    return (y, torch.linspace(15.0, 35.0, batch)) if wrapped.sigma else (y,)


def _names(wrapped: Exported) -> list[str]:
    return ["noisy", "sigma"] if wrapped.sigma else ["noisy"]


def _export_dynamo(wrapped: Exported, args: tuple[Tensor, ...], out: Path) -> None:
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    shapes: dict[str, Any] = {"noisy": dims}
    if wrapped.sigma:
        shapes["sigma"] = {0: torch.export.Dim.DYNAMIC}
    prog = torch.onnx.export(wrapped, args, dynamo=True, opset_version=OPSET, input_names=_names(wrapped),
                             output_names=["denoised"], dynamic_shapes=shapes, external_data=False,
                             optimize=True, verbose=False)
    prog.save(str(out))


def _export_legacy(wrapped: Exported, args: tuple[Tensor, ...], out: Path) -> None:
    axes = {"noisy": {0: "batch", 2: "height", 3: "width"}, "denoised": {0: "batch", 2: "height", 3: "width"}}
    if wrapped.sigma:
        axes["sigma"] = {0: "batch"}
    torch.onnx.export(wrapped, args, str(out), dynamo=False, opset_version=OPSET,
                      input_names=_names(wrapped), output_names=["denoised"], dynamic_axes=axes)


def export_onnx(wrapped: Exported, out: Path) -> str:
    """Write ``out`` (.onnx); returns the exporter used ("dynamo" or "torchscript")."""
    args = example_inputs(wrapped, *CHECK_SIZES[0])
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), _quiet(log):
            warnings.simplefilter("ignore")
            _export_dynamo(wrapped, args, out)
        return "dynamo"
    except Exception as first:  # noqa: BLE001  (any exporter failure: try the other one)
        try:
            with warnings.catch_warnings(), _quiet(log):
                warnings.simplefilter("ignore")
                _export_legacy(wrapped, args, out)
            return "torchscript"
        except Exception as second:  # noqa: BLE001
            raise InputError(f"cannot export {cast(Any, wrapped.model).config.name} to ONNX: dynamo exporter: "
                             f"{_first_line(first)}; TorchScript exporter: {_first_line(second)}") from None


def export_torchscript(wrapped: Exported, out: Path) -> str:
    """Trace to ``out`` (.pt), then check the trace on the second size; returns "trace"."""
    args = example_inputs(wrapped, *CHECK_SIZES[0])
    name: str = cast(Any, wrapped.model).config.name
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(wrapped, args, check_trace=False)
            other = example_inputs(wrapped, *CHECK_SIZES[1], batch=3, seed=1)
            diff = (traced(*other) - wrapped(*other)).abs().max().item()
        except Exception as e:  # noqa: BLE001  (the tracer's failures have no common type)
            raise InputError(f"cannot export {name} to TorchScript: tracing failed ({_first_line(e)}); "
                             "export to .onnx instead") from None
    if not diff <= 1e-4:
        raise InputError(f"cannot export {name} to TorchScript: the trace does not generalize to another image "
                         f"size (max difference {diff:.3g}: its padding arithmetic was recorded as constants); "
                         "export to .onnx instead")
    torch.jit.save(traced, str(out))
    return "trace"


def export_model(model: nn.Module, out: Path) -> dict[str, Any]:
    """Export ``model`` (eval mode from now on) to ``out``: ONNX for ``.onnx``, TorchScript for ``.pt``."""
    name: str = cast(Any, model).config.name
    if name in NOT_EXPORTABLE and out.suffix == ".onnx":
        raise InputError(f"cannot export {name} to ONNX: {NOT_EXPORTABLE[name]}")
    wrapped = Exported(model)
    how = export_onnx(wrapped, out) if out.suffix == ".onnx" else export_torchscript(wrapped, out)
    return {"model": name, "output": str(out), "format": out.suffix[1:], "exporter": how,
            "inputs": _names(wrapped), "outputs": ["denoised"]}


def export_checkpoint(ref: str | Path, out: str | Path) -> dict[str, Any]:
    """Export the model of checkpoint ``ref`` (a directory, a run, a bundled name) to ``out`` (``.onnx`` or
    ``.pt``); returns what was written (model, checkpoint, output, format, exporter, inputs, outputs)."""
    out = Path(out)
    if out.suffix not in (".onnx", ".pt"):
        raise InputError(f"{out}: the output must end in .onnx (ONNX) or .pt (TorchScript)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory")
    model, meta = load_model(ref)
    return {"checkpoint": meta["path"], **export_model(model, out)}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


class _quiet:
    """Redirect stdout and stderr (the exporters print progress and diagnostics) into ``log``."""

    def __init__(self, log: io.StringIO) -> None:
        self.log = log

    def __enter__(self) -> None:
        self.saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.log

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self.saved

"""Proximal operators of the unfolded models: the soft threshold S_θ, prox of θ‖·‖₁, with a memory-lean backward.

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _shrink(v: Tensor, th: Tensor) -> Tensor:
    """S_θ(v) for θ ≥ 0 (broadcast): v − clip(v, −θ, θ), two memory passes instead of sign·relu(|v|−θ)'s five."""
    return v - torch.clamp(v, -th, th)


def _shrink_backward(grad: Tensor, out: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """∂S/∂v = 1{S ≠ 0}; ∂S/∂θ = −sign(v)·1{|v| > θ} for θ > 0 (sign(S) is 0 elsewhere), 0 for θ < 0,
    summed over the axes θ was broadcast along."""
    grad_v = torch.where(out != 0, grad, 0.0)
    return grad_v, -(grad_v * torch.sign(out)).sum_to_size(theta.shape) * (theta > 0)


# Fused kernels: on the K-channel code maps of the unfolded models the soft threshold's elementwise passes
# cost as much as the GEMMs (forward 2 passes, backward 5 in eager mode). torch.compile fuses each into one
# pass (measured on a (256, 175, 18, 18) map, 1 thread: forward 72 -> 25 ms, backward 137 -> 37 ms; a CSCNet
# training step 4.3 -> 3.6 CPU-s, its inference on a BSD68 image 3.1 -> 2.5 CPU-s). Only for
# maps of at least FUSE_MIN_NUMEL elements (small ones are not worth a compilation), only when
# :func:`use_fused` switched it on (sparsefold/runtime.py does, per ``runtime.fused``), and falling back to the
# eager functions for good, with one warning, when compiling fails (no C++ compiler, an unsupported backend).
FUSE_MIN_NUMEL = 1 << 20
_FUSED: dict[str, Any] = {"on": False, "failed": None}


def use_fused(on: bool) -> None:
    """Switch the compiled soft-threshold kernels on or off for this process."""
    _FUSED["on"] = bool(on)


def _tracing() -> bool:
    """Inside an export or a trace (ONNX, torch.export, TorchScript, an outer torch.compile) or under a dispatch
    mode (FLOP counting, the tile planner's memory probe, which torch.compile would refuse): the eager ops."""
    return bool(torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export() or _get_current_dispatch_mode() is not None)


def _run(name: str, eager: Callable[..., Any], *args: Tensor) -> Any:
    """``eager(*args)``, or its compiled version when fusion is on and the map is large."""
    if not _FUSED["on"] or _FUSED["failed"] or _tracing() or args[0].numel() < FUSE_MIN_NUMEL:
        return eager(*args)
    if name not in _FUSED:  # training's maps keep one shape: static kernels first (the backward's reduction is
        # 2.6x faster than its dynamic-shape one), dynamic after a shape change (dynamic=None); inference sees every
        # image size (dynamic from the start: no recompilation). Dynamo keeps compiled graphs, and counts
        # recompilations against config.recompile_limit, per code object: each kernel compiles its own copy.
        code = eager.__code__.replace()
        _FUSED[name] = torch.compile(types.FunctionType(code, eager.__globals__, f"{eager.__name__}_{name}"),
                                     dynamic=True if name == "inference" else None, fullgraph=True)
    try:
        return _FUSED[name](*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:  # yet another dtype/rank/shape: this call eager, the
        return eager(*args)  # kernels compiled so far stay in use
    except Exception as e:  # noqa: BLE001 -- any backend failure (compiler missing, unsupported device) means eager
        _FUSED["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"fused soft threshold unavailable ({_FUSED['failed']}); using the eager one", stacklevel=2)
        return eager(*args)


class _SoftThreshold(torch.autograd.Function):
    """S_θ(v) = v − clip(v, −θ⁺, θ⁺) with θ⁺ = max(θ, 0) (a negative threshold means no shrinkage).

    Backward saves only the output: the mask is S ≠ 0 and sign(S) = sign(v) there.
    """

    @staticmethod
    def forward(ctx, v: Tensor, theta: Tensor) -> Tensor:
        out = _run("forward", _shrink, v, theta.clamp_min(0))
        ctx.save_for_backward(out, theta)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        out, theta = ctx.saved_tensors
        grad_v, grad_theta = _run("backward", _shrink_backward, grad, out, theta)
        return grad_v, grad_theta if ctx.needs_input_grad[1] else None


def soft_threshold(v: Tensor, theta: Tensor | float) -> Tensor:
    """S_θ(v) = sign(v)·max(|v| − θ, 0), the proximal operator of θ‖·‖₁ (θ ≥ 0, broadcast to v)."""
    if not isinstance(theta, Tensor):
        theta = torch.tensor(float(theta), dtype=v.dtype, device=v.device)
    if not torch.is_grad_enabled():  # no backward: the same arithmetic without the Function (TorchScript can trace it)
        return _run("inference", _shrink, v, theta.to(v.dtype).clamp_min(0))
    return _SoftThreshold.apply(v, theta.to(v.dtype))


def soft_threshold_masks(v: Tensor, theta: Tensor) -> Tensor:
    """The soft threshold as the official CSCNet code writes it: 1{v > θ}·(v − θ) + 1{v < −θ}·(v + θ).

    Equal to :func:`soft_threshold` for θ ≥ 0; for θ < 0 both masks hold on (θ, −θ), so a code there is
    doubled and one outside moves away from zero by |θ| (the released CSCNet weights have such filters).
    Plain autograd: used to reproduce imported weights exactly, and to fine-tune them."""
    return (v > theta) * (v - theta) + (v < -theta) * (v + theta)

"""Proximal operators of the unfolded models: the soft threshold S_θ, prox of θ‖·‖₁, with a memory-lean backward.

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _SoftThreshold(torch.autograd.Function):
    """S_θ(v) = v − clip(v, −θ⁺, θ⁺) with θ⁺ = max(θ, 0) (a negative threshold means no shrinkage).

    Backward saves only the output: the mask is S ≠ 0 and sign(S) = sign(v) there.
    """

    @staticmethod
    def forward(ctx, v: Tensor, theta: Tensor) -> Tensor:
        th = theta.clamp_min(0)
        out = v - torch.clamp(v, -th, th)  # two memory passes instead of sign·relu(|v|−θ)'s five
        ctx.save_for_backward(out, theta)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        out, theta = ctx.saved_tensors
        grad_v = grad * (out != 0)
        grad_theta = None
        if ctx.needs_input_grad[1]:
            # ∂S/∂θ = −sign(v)·1{|v| > θ} for θ > 0 (sign(S) is 0 elsewhere), 0 for θ < 0;
            # summed over the axes θ was broadcast along.
            grad_theta = -(grad * torch.sign(out)).sum_to_size(theta.shape) * (theta > 0)
        return grad_v, grad_theta


def soft_threshold(v: Tensor, theta: Tensor | float) -> Tensor:
    """S_θ(v) = sign(v)·max(|v| − θ, 0), the proximal operator of θ‖·‖₁ (θ ≥ 0, broadcast to v)."""
    if not isinstance(theta, Tensor):
        theta = torch.tensor(float(theta), dtype=v.dtype, device=v.device)
    if not torch.is_grad_enabled():  # no backward: the same arithmetic without the Function (TorchScript can trace it)
        th = theta.to(v.dtype).clamp_min(0)
        return v - torch.clamp(v, -th, th)
    return _SoftThreshold.apply(v, theta.to(v.dtype))


def soft_threshold_masks(v: Tensor, theta: Tensor) -> Tensor:
    """The soft threshold as the official CSCNet code writes it: 1{v > θ}·(v − θ) + 1{v < −θ}·(v + θ).

    Equal to :func:`soft_threshold` for θ ≥ 0; for θ < 0 both masks hold on (θ, −θ), so a code there is
    doubled and one outside moves away from zero by |θ| (the released CSCNet weights have such filters).
    Plain autograd: used to reproduce imported weights exactly, and to fine-tune them."""
    return (v > theta) * (v - theta) + (v < -theta) * (v + theta)

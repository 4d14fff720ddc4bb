r"""VDSR: the very deep residual CNN super-resolution baseline (Kim, Lee & Lee, "Accurate Image
Super-Resolution Using Very Deep Convolutional Networks", CVPR 2016), for restoration with a known linear
operator A (:mod:`.operators`); its home task is super-resolution, A = :class:`~.operators.Downsample`.

Problem: recover the high-resolution x from y = A x + n. VDSR unfolds no iteration: it interpolates y onto the
image grid and learns the missing detail, the residual r = x − u ("residual learning"). It is the black-box
reference the unfolded restorers (PGNet) are measured against on the same task, data and budget.

Classical estimate (nothing learned): the interpolation u of y on the image grid,

    u = bicubic(y, f)    for A = Downsample(f)   (:func:`.classical.bicubic_upsample`, clamped to [0, 1])
    u = y                for A = I (op None)     (then VDSR is a DnCNN-like residual denoiser)
    u = Aᵀy              for any other A         (inpainting, deblurring, MRI: the back-projection)

so that VDSR is a residual CNN on the operator's back-projection when A is not a down-sampling.

Learned estimate (D = ``depth`` convolutions, all 3×3 with zero padding 1, so every map is H×W):

    h_1 = ReLU(W_1 ∗ u + b_1)                          C → F                    (Eq. 1)
    h_l = ReLU(W_l ∗ h_{l−1} + b_l),  l = 2..D−1       F → F                    (Eq. 2)
    x̂   = u + W_D ∗ h_{D−1} + b_D                      F → C, the residual r̂    (Eq. 3)

The residual branch f (Eqs. 1–3 less u) has the receptive field 2D + 1: an output pixel depends on the
pixels of u at most D away along either axis (the tests perturb one pixel and check it).

Init: He (MSRA) normal weights, std √(2 / (9·fan_in channels)), as the paper; zero biases; seeded by
``config.init_seed``, so the weights depend on the config only.

Symbol → attribute:

    ==========  =============================  ===========================================
    W_l, b_l    ``self.body[2(l−1)]``          Conv2d (F, C or F, 3, 3) and (F,); layer D: (C, F, 3, 3)
    f           ``self.body``                  nn.Sequential, Eqs. 1–3 without the skip u
    u           :meth:`interpolate`            (B, C, H, W) from y and ``op``
    D, F, C     ``depth, features, channels``  conv layers (20), width (64), image channels
    ==========  =============================  ===========================================

Parameters: C·F·9 + F + (D − 2)(F²·9 + F) + F·C·9 + C; default D=20, F=64, C=1 → 640 + 18·36,928 + 577
= 665,921 (the paper's "665k").

Differences from the paper and its release:

* The interpolation is PyTorch's bicubic (Keys' a = −0.75, pixel centres); the paper's is MATLAB's
  ``imresize`` (a = −0.5). The LR images are our ``Downsample`` operator's (periodic boundary, box or
  bicubic anti-alias filter), not MATLAB's down-scaling.
* The paper trains one network for ×2, ×3 and ×4 together (multi-scale); a run here trains at one
  ``task.factor``. The network itself is scale-agnostic: it reads f from the operator at every call.
* The paper works on the Y channel of YCbCr; ``channels=1`` trains on gray images (luma), ``channels=3``
  on RGB directly.
* σ is accepted and unused (the paper's LR images are noise-free; our tasks may add noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models.classical import bicubic_upsample
from sparsefold.models.operators import Downsample, Identity, Operator
from sparsefold.models.tiling import Tiling


@dataclass(frozen=True, kw_only=True)
class VDSRConfig:
    """Hyperparameters of :class:`VDSR` (defaults: the paper's 20 layers of 64 channels)."""

    name: str = "vdsr"
    channels: int = 1
    features: int = 64
    depth: int = 20
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        check(self.features >= 1, "features", f"must be >= 1, got {self.features}")
        check(self.depth >= 2, "depth", f"must be >= 2 (a first and a last convolution), got {self.depth}")


class VDSR(nn.Module):
    """Interpolation plus a learned residual, x̂ = u + f(u). See the module docstring."""

    takes_operator = True  # the Restorer contract (models/contract.py): forward(y, sigma, op)

    def __init__(self, config: VDSRConfig, init: bool = True) -> None:
        """``init=False``: no He init (a state dict fills the layers)."""
        super().__init__()
        self.config = config
        c, f = config.channels, config.features
        layers: list[nn.Module] = [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(inplace=True)]  # Eq. (1)
        for _ in range(config.depth - 2):
            layers += [nn.Conv2d(f, f, 3, padding=1), nn.ReLU(inplace=True)]  # Eq. (2)
        layers.append(nn.Conv2d(f, c, 3, padding=1))  # W_D, b_D of Eq. (3)
        self.body = nn.Sequential(*layers)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """He normal weights (fan in, ReLU gain √2) seeded by ``config.init_seed``, zero biases."""
        g = torch.Generator().manual_seed(self.config.init_seed)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=g)
                assert m.bias is not None  # every layer has one (Eqs. 1–3)
                nn.init.zeros_(m.bias)

    @property
    def tiling(self) -> Tiling:
        """``depth`` 3×3 convolutions: halo = depth (for A = I, where u = y; other operators run whole)."""
        return Tiling(self.config.depth, 1)

    @staticmethod
    def interpolate(y: Tensor, op: Operator | None) -> Tensor:
        """u on the image grid (module docstring): y (measurement shape) -> (B, C, H, W)."""
        if op is None or isinstance(op, Identity):
            return y
        if isinstance(op, Downsample):
            return bicubic_upsample(y, op.factor)  # (B, C, f·h, f·w)
        return op.A_adjoint(y)  # Aᵀy, real (MRI too)

    def forward(self, y: Tensor, sigma: Tensor | None = None, op: Operator | None = None) -> Tensor:
        """y of ``op``'s measurement shape (complex for MRI), σ unused, op None = Identity -> x̂ (B, C, H, W)."""
        u = self.interpolate(y, op)
        check(u.dim() == 4 and u.shape[1] == self.config.channels, "y",
              f"the interpolated y must be (B, {self.config.channels}, H, W), got shape {tuple(u.shape)}")
        return u + self.body(u)  # Eqs. (1)–(3)

    def dictionary(self) -> Tensor:
        """First-layer filters W_1 (F, C, 3, 3), for visualization."""
        first = self.body[0]
        assert isinstance(first, nn.Conv2d)  # Eq. (1), built in __init__
        return first.weight.detach()

r"""DnCNN: the black-box residual CNN baseline (Zhang, Zuo, Chen, Meng & Zhang, IEEE TIP 2017).

Problem: learn the noise map. With y = x + v, the network f predicts v and returns x̂ = y − f(y)
("residual learning"). No iteration is unfolded; it is the reference every unfolded model is
measured against (same data, same noise, same budget).

Architecture (DnCNN-S, 17 layers, 64 channels):

    layer 1      : Conv 3×3 C→64 + ReLU
    layers 2..16 : Conv 3×3 64→64 (no bias) + BatchNorm + ReLU
    layer 17     : Conv 3×3 64→C (no bias)
    x̂ = y − f(y)

Symbol → attribute: f ↔ ``self.body`` (nn.Sequential); depth D ↔ ``config.depth`` (17); width ↔
``config.features`` (64); the BatchNorm ε ↔ ``config.bn_eps`` (PyTorch's 1e-5; the authors' release
uses 1e-4, which ``sparsefold import dncnn`` sets). Parameters for C=1: 640 + 15·(36,864 + 128) + 576 = 556,096.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparsefold.errors import check
from sparsefold.models.tiling import Tiling


@dataclass(frozen=True, kw_only=True)
class DnCNNConfig:
    """Hyperparameters of :class:`DnCNN` (defaults: DnCNN-S)."""

    name: str = "dncnn"
    depth: int = 17
    features: int = 64
    channels: int = 1
    bn_eps: float = field(default=1e-5, metadata={"run_name": "if_set"})  # added in 0.1: see storage
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.depth >= 2, "depth", f"must be >= 2, got {self.depth}")
        check(self.bn_eps > 0, "bn_eps", f"must be > 0, got {self.bn_eps}")
        check(self.features >= 1, "features", f"must be >= 1, got {self.features}")
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")


class DnCNN(nn.Module):
    """Residual denoising CNN. See the module docstring."""

    def __init__(self, config: DnCNNConfig, init: bool = True) -> None:
        """``init=False``: no orthogonal init (a state dict fills the layers)."""
        super().__init__()
        self.config = config
        c, f = config.channels, config.features
        layers: list[nn.Module] = [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(inplace=True)]  # layer 1
        for _ in range(config.depth - 2):  # layers 2..D−1
            layers += [nn.Conv2d(f, f, 3, padding=1, bias=False), nn.BatchNorm2d(f, eps=config.bn_eps), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(f, c, 3, padding=1, bias=False))  # layer D
        self.body = nn.Sequential(*layers)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal convolution weights seeded by ``config.init_seed`` (weights depend on the config only)."""
        g = torch.Generator().manual_seed(self.config.init_seed)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight, generator=g)  # as the official PyTorch port
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def tiling(self) -> Tiling:
        """``depth`` 3×3 convolutions: halo = depth."""
        return Tiling(self.config.depth, 1)

    def forward(self, y: Tensor, sigma: Tensor | None = None) -> Tensor:
        """y (B, C, H, W) -> x̂ = y − f(y), (B, C, H, W). ``sigma`` is ignored (DnCNN-S is trained per σ)."""
        return y - self.body(y)

    def dictionary(self) -> Tensor:
        """First-layer filters (64, C, 3, 3), for visualization."""
        first = self.body[0]
        assert isinstance(first, nn.Conv2d)  # layer 1, built in __init__
        return first.weight.detach()

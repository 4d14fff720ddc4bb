"""Test-time instance adaptation (LIDIA, Vaksman et al. 2020, "internal adaptation"): fine-tune a
trained denoiser on the single noisy image it is about to denoise.

There is no clean target, so the model's own first estimate x̃ = f(y) stands in for it: each step draws
random crops of x̃, adds fresh synthetic noise of the image's level σ (given, or estimated from y by the
MAD of its finest Haar band) and takes one Adam step on ‖f(x̃ + σ/255·n) − x̃‖². The network learns the
image's own structures (repeated textures, edges) at the price of a few forward/backward passes; the
trained model is not modified (a copy is adapted). Gaussian noise only.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from sparsefold.models.contract import Projected
from sparsefold.models.noise_level import estimate_sigma


def adapt_to_image(model: nn.Module, noisy: Tensor, sigma: float | None = None, steps: int = 20,
                   lr: float = 1e-4, crop: int = 96, batch: int = 4, seed: int = 0) -> nn.Module:
    """A copy of ``model`` fine-tuned for ``steps`` Adam steps on the noisy image ``noisy`` (C, H, W)."""
    if steps <= 0:
        return model
    device = next(model.parameters()).device
    y = noisy.unsqueeze(0).to(device)  # (1, C, H, W)
    s = float(estimate_sigma(y)[0]) if sigma is None else float(sigma)
    adapted = copy.deepcopy(model).train()
    for m in adapted.modules():  # keep BatchNorm statistics of the training set (batch of crops of one image)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    with torch.no_grad():
        target = model.eval()(y, torch.tensor([s], device=device)).clamp(0, 1)  # x̃ = f(y): (1, C, H, W)
    g = torch.Generator().manual_seed(seed)
    h, w = target.shape[-2:]
    ch, cw = min(crop, h), min(crop, w)
    opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=lr)
    sig = torch.full((batch,), s, device=device)
    for _ in range(steps):
        r = torch.randint(0, h - ch + 1, (batch,), generator=g)
        c = torch.randint(0, w - cw + 1, (batch,), generator=g)
        x = torch.cat([target[..., i:i + ch, j:j + cw] for i, j in zip(r.tolist(), c.tolist())])  # (B, C, ch, cw)
        n = torch.randn(x.shape, generator=g).to(device)
        loss = torch.mean((adapted(x + s / 255.0 * n, sig) - x) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if isinstance(adapted, Projected):
            adapted.project_()
    return adapted.eval()

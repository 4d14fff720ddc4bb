"""``load_model`` hands back a model ready for inference: eval mode (BatchNorm on its running statistics)."""

from __future__ import annotations

import torch

from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import denoise


def test_load_model_returns_eval_mode() -> None:
    model, _ = load_model("dncnn")  # the bundled DnCNN has BatchNorm: train mode would use a batch's statistics
    assert not model.training and not any(m.training for m in model.modules())
    y = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(0))
    a = denoise(model, y, sigma=25)
    model.train()  # what it was before: batch statistics of this one image, a different output
    assert (denoise(model, y, sigma=25) - a).abs().max() > 1e-3

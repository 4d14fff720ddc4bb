"""Losses, incremental depth, noise-adaptive thresholds, cross-section config checks and test-time
adaptation (issue 3's "unfolding training tricks"), on tiny CSCNets through the plain trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsefold.config import ConfigError, LossConfig, NoiseConfig, load_config
from sparsefold.models import CSCNet, CSCNetConfig, build_model
from sparsefold.models.noise_level import estimate_sigma
from sparsefold.trainers.losses import Objective, multilayer_weights, ssim_map_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(**kw) -> CSCNetConfig:
    return CSCNetConfig(**{"depth": 3, "filters": 8, "kernel_size": 5, "stride": 2, **kw})


def test_multilayer_weights_sum_to_one_and_favour_the_last_layer():
    w = multilayer_weights(4, 0.5)
    assert sum(w) == pytest.approx(1.0)
    assert w == sorted(w) and w[-1] == pytest.approx(8 / 15)
    assert multilayer_weights(3, 1.0) == pytest.approx([1 / 3] * 3)


def test_objective_losses_agree_with_their_definitions():
    torch.manual_seed(0)
    model = build_model(tiny())
    for p in model.parameters():
        p.requires_grad_(False)
    y, x = torch.rand(2, 1, 20, 20), torch.rand(2, 1, 20, 20)
    out = model(y)
    noise = NoiseConfig()
    mse = Objective(model, LossConfig(kind="mse"), noise)(y, x)
    assert mse == pytest.approx(float(torch.mean((out - x) ** 2)), rel=1e-5)
    assert Objective(model, LossConfig(kind="l1"), noise)(y, x) == pytest.approx(float((out - x).abs().mean()), rel=1e-5)
    # multi-layer with decay → 0 weighs only the last layer: equals the MSE of forward
    ml = Objective(model, LossConfig(kind="multilayer", layer_decay=1e-9), noise)(y, x)
    assert ml == pytest.approx(float(mse), rel=1e-4)
    ml_flat = Objective(model, LossConfig(kind="multilayer", layer_decay=1.0), noise)(y, x)
    recs = model.reconstructions(y)
    assert len(recs) == 3 and torch.allclose(recs[-1], out, atol=1e-6)
    assert ml_flat == pytest.approx(sum(float(torch.mean((r - x) ** 2)) for r in recs) / 3, rel=1e-5)
    # ssim_mixed = a·(1 − SSIM) + (1 − a)·L1; 1 − SSIM is 0 for a perfect reconstruction and grows with the error
    one_minus_ssim = float(ssim_map_loss(out, x))
    for a in (0.0, 0.84, 1.0):
        mixed = Objective(model, LossConfig(kind="ssim_mixed", ssim_weight=a), noise)(y, x)
        assert mixed.shape == () and float(mixed) == pytest.approx(
            a * one_minus_ssim + (1 - a) * float((out - x).abs().mean()), rel=1e-5)
    assert float(ssim_map_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    near, far = (float(ssim_map_loss((x + s * torch.randn_like(x)).clamp(0, 1), x)) for s in (0.05, 0.3))
    assert 0 < near < far < 2


def test_cross_section_checks_name_the_field():
    with pytest.raises(ConfigError, match=r"^loss\.kind: multilayer"):
        load_config(None, ["model.name=dncnn", "loss.kind=multilayer"])
    with pytest.raises(ConfigError, match=r"^loss\.kind: nll"):
        load_config(None, ["model.name=cscnet", "loss.kind=nll"])
    with pytest.raises(ConfigError, match=r"^trainer\.depth_stages: the last stage"):
        load_config(None, ["model.depth=6", "trainer.depth_stages=[2,4]"])
    with pytest.raises(ConfigError, match=r"^trainer\.depth_stages: model 'dncnn'"):
        load_config(None, ["model.name=dncnn", "trainer.depth_stages=[2,4]"])
    with pytest.raises(ConfigError, match=r"^trainer\.depth_stages: must be increasing"):
        load_config(None, ["model.depth=4", "trainer.depth_stages=[4,2]"])
    with pytest.raises(ConfigError, match=r"^loss\.kind: unknown loss"):
        load_config(None, ["loss.kind=huber"])
    cfg = load_config(None, ["model.depth=4", "trainer.depth_stages=2,4", "loss.kind=multilayer"])
    assert cfg.trainer.depth_stages == (2, 4)


def test_tied_set_depth_is_an_exact_warm_start():
    model = build_model(tiny(depth=5)).eval()
    y = torch.rand(1, 1, 24, 24)
    with torch.no_grad():
        full = model.reconstructions(y)
        model.set_depth(2)
        short = model(y)
    assert torch.allclose(short, full[1], atol=1e-6)  # the 2-unfolding model is the prefix of the 5-unfolding one


def test_noise_adaptive_thresholds_scale_with_sigma():
    torch.manual_seed(0)
    model = build_model(tiny(noise_adaptive=True, threshold_init=0.05)).eval()
    y = torch.rand(1, 1, 32, 32)
    lo = model.theta(torch.tensor([10.0]), y)
    hi = model.theta(torch.tensor([50.0]), y)
    assert lo.shape == (4, 8, 1, 1) and (hi > lo).all()
    assert torch.allclose(model.theta(torch.tensor([25.0]), y), torch.full_like(lo, 0.05))  # init: θ(25) = θ_init
    with torch.no_grad():  # larger σ → larger thresholds → sparser codes
        ys = model.theta(torch.tensor([5.0]), y), model.theta(torch.tensor([80.0]), y)
    from sparsefold.models.convops import shift_stack

    stacked = shift_stack(y, 5, 2)
    nz = [float((model.sparse_code(stacked, th)[-1] != 0).float().mean()) for th in ys]
    assert nz[1] < nz[0]
    # unknown σ: the MAD estimate is used
    with torch.no_grad():
        blind = model(y)
        told = model(y, estimate_sigma(y))
    assert torch.equal(blind, told)


def input_psnr(out: dict) -> float:
    """The noisy input's PSNR on the run's validation images (recorded with the last checkpoint)."""
    return json.loads((Path(out["checkpoint"]) / "state.json").read_text())["metrics"]["val/input_psnr"]


def test_losses_and_depth_stages_train_through_the_loop(tiny_overrides, monkeypatch):
    """Each loss trains a tiny CSCNet through the loop in two depth stages (2 then 4 unfoldings, switched by
    the loop) to beat the noisy input (measured after 24 steps: l1 +0.8 dB, ssim_mixed +4.3, multilayer +4.0)."""
    from sparsefold.trainers.loop import train

    depths: list[int] = []
    set_depth = CSCNet.set_depth
    monkeypatch.setattr(CSCNet, "set_depth", lambda self, d: (depths.append(d), set_depth(self, d))[1])
    for kind in ("l1", "ssim_mixed", "multilayer"):
        depths.clear()
        cfg = load_config(None, tiny_overrides + [
            f"loss.kind={kind}", "trainer.max_steps=24", "trainer.val_every=24", "trainer.ckpt_every=24",
            f"trainer.run_name=loss-{kind}", "trainer.depth_stages=[2,4]", "data.val_images=1",
        ])
        out = train(cfg)
        assert out["steps"] == 24 and out["nonfinite_steps"] == 0
        assert depths == [2, 4], (kind, depths)  # both stages happened, in order
        assert out["val_psnr"] > input_psnr(out) + 0.3, (kind, out["val_psnr"], input_psnr(out))


def test_test_time_adaptation_fits_the_image_and_leaves_the_model_alone():
    from sparsefold.trainers.adapt import adapt_to_image

    torch.manual_seed(0)
    model = build_model(tiny(depth=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(1, 40, 40, generator=g)
    noisy = clean + 25 / 255 * torch.randn(clean.shape, generator=g)
    adapted = adapt_to_image(model, noisy, sigma=25.0, steps=5, lr=1e-3, crop=32, batch=2)
    assert adapted is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in the original model"
    assert any(not torch.equal(v, before[k]) for k, v in adapted.state_dict().items())
    assert adapt_to_image(model, noisy, steps=0) is model


def test_cpu_budget_stops_the_run_and_drives_the_schedule(tiny_overrides):
    from sparsefold.trainers.loop import lr_at, train

    cfg = load_config(None, tiny_overrides + [
        "trainer.max_steps=100000", "trainer.budget_cpu_seconds=3", "trainer.val_every=100000",
        "trainer.ckpt_every=100000", "trainer.run_name=budget", "data.val_images=1", "optim.schedule=cosine",
    ])
    out = train(cfg)
    assert 1 <= out["steps"] < 100000 and out["checkpoint"] and out["val_psnr"] is not None
    assert lr_at(10, cfg, progress=1.0) == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)
    assert lr_at(10, cfg, progress=0.0) == pytest.approx(cfg.optim.lr)


@pytest.mark.parametrize("kind", ["poisson", "binomial"])
def test_unsupervised_nll_trains_dcea_through_the_loop(kind, tiny_overrides):
    """loss.kind=nll: no clean target; DCEA-C trains on the data's own likelihood and still denoises."""
    from sparsefold.trainers.loop import train

    over = [o for o in tiny_overrides if not o.startswith("model.")] + [
        "model.name=dcea_c", f"model.likelihood={kind}", "model.depth=3", "model.filters=8", "model.kernel_size=5",
        "model.stride=2", f"noise.kind={kind}", "model.peak=4", "noise.peak=4", "model.trials=4", "noise.trials=4",
        "loss.kind=nll", "trainer.max_steps=12", "trainer.val_every=12", "trainer.ckpt_every=12",
        "data.val_images=1", f"trainer.run_name=nll-{kind}",
    ]
    out = train(load_config(None, over))
    assert out["steps"] == 12 and out["nonfinite_steps"] == 0
    # it denoises: measured +3.3 dB (poisson, input 9.5 dB) and +3.4 dB (binomial, input 14.0 dB)
    assert out["val_psnr"] > input_psnr(out) + 1.0, (kind, out["val_psnr"], input_psnr(out))
    with pytest.raises(ConfigError, match=r"^model\.likelihood"):
        load_config(None, over[:-1] + ["noise.kind=gaussian"])

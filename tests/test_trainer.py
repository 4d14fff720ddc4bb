"""The plain training loop: learning on real photos, checkpoints, resume, config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsefold.config import ConfigError, load_config
from sparsefold.trainers.checkpoint import load_model, save_checkpoint
from sparsefold.trainers.loop import lr_at, train
from sparsefold.trainers.storage import CheckpointError, latest_checkpoint


def test_loss_falls_on_real_images(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["trainer.max_steps=60", "trainer.val_every=60", "trainer.run_name=learn",
                                             "wandb.mode=offline"])
    out = train(cfg)
    assert out["steps"] == 60 and out["skipped"] == 0
    # sigma=25 noisy input scores ~20.2 dB; a model that learned nothing stays near it.
    assert out["val_psnr"] > 23.0, out
    model, meta = load_model(out["checkpoint"])
    assert meta["state"]["step"] == 60 and meta["model"]["filters"] == 16
    assert any(Path(out["run_dir"]).glob("wandb/offline-run-*")), "W&B offline run not written"


def test_resume_equals_uninterrupted(tiny_overrides):
    common = tiny_overrides + ["trainer.val_every=1000", "trainer.ckpt_every=5", "data.num_workers=1"]
    full = train(load_config(None, common + ["trainer.max_steps=12", "trainer.run_name=full"]))
    part = train(load_config(None, common + ["trainer.max_steps=7", "trainer.run_name=split"]))
    assert part["steps"] == 7
    resumed = train(load_config(None, common + ["trainer.max_steps=12", "trainer.run_name=split"]))
    assert resumed["steps"] == 12
    a = load_file(f"{full['checkpoint']}/model.safetensors")
    b = load_file(f"{resumed['checkpoint']}/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_new_run_name_without_resume_refuses_to_overwrite(tiny_overrides):
    base = tiny_overrides + ["trainer.max_steps=2", "trainer.val_every=1000", "trainer.run_name=once"]
    train(load_config(None, base))
    with pytest.raises(FileExistsError, match="run_name"):
        train(load_config(None, base + ["trainer.resume=false"]))


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.stride=12", "model.stride"),
        ("noise.sigma=-1", "noise.sigma"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("model.depht=3", "model.depht"),
        ("optimizer.lr=1", "optimizer"),
        ("data.train=pipe:cat x.tar", "data.train"),
        ("ray.workers=2", "ray.workers"),
        ("model.name=nope", "model.name"),
    ],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(field) and "\n" not in msg


def test_lr_schedule():
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", "trainer.max_steps=110"])
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(109, cfg) == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_atomic_and_tamper_refused(tmp_path):
    from sparsefold.models import build_model

    cfg = load_config(None, ["model.depth=2", "model.filters=4", "model.kernel_size=5", "model.stride=1"])
    model = build_model(cfg.model)
    d = save_checkpoint(tmp_path / "checkpoints" / "step_0000001", model, cfg, {"step": 1})
    (tmp_path / "checkpoints" / "step_0000009.tmp-123").mkdir()  # a half-written one
    assert latest_checkpoint(tmp_path / "checkpoints") == d
    load_model(d)
    (d / "model.safetensors").write_bytes(b"\x80\x04garbage-pickle")
    with pytest.raises(CheckpointError):
        load_model(d)
    cfg_json = json.loads((d / "config.json").read_text())
    cfg_json["format"] = 99
    (d / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(CheckpointError):
        load_model(d)

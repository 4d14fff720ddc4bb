"""Colour end to end: a model's ``channels`` and ``data.gray`` must agree (one config error naming data.gray),
and a colour model trains on colour data, is scored on colour images and denoises a colour file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparsefold.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("over, wanted", [
    (["model.channels=3"], "data.gray=false"),                  # colour model, gray data (the default)
    (["data.gray=false"], "data.gray=true"),                    # gray model, colour data
])
def test_channels_and_gray_must_agree(over, wanted):
    with pytest.raises(ConfigError, match=r"^data\.gray: ") as e:
        load_config(None, ["model.name=cscnet", *over])
    assert wanted in str(e.value) and "\n" not in str(e.value)


def test_colour_cscnet_trains_scores_and_denoises_in_colour(tiny_overrides, tmp_path):
    """Three-channel data all the way: training patches, validation images and the denoised file; the saved
    checkpoint scores on colour images what training reported, and beats the noisy input it was given."""
    from sparsefold.datasets import load_image, val_files
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import denoise_path, evaluate_images
    from sparsefold.trainers.loop import train

    cfg = load_config(None, tiny_overrides + [
        "model.channels=3", "data.gray=false", "trainer.max_steps=30", "trainer.val_every=30",
        "trainer.ckpt_every=30", "data.val_images=1", "data.patch_size=40"])
    out = train(cfg)
    model, meta = load_model(out["checkpoint"])
    assert meta["model"]["channels"] == 3
    files = val_files(cfg.data)[:1]
    assert load_image(files[0], gray=False).shape[0] == 3
    res = evaluate_images(model, files, cfg.noise, gray=False)
    assert res["psnr"] == pytest.approx(out["val_psnr"], abs=1e-3)
    assert res["psnr"] > res["input_psnr"] + 1.0, res  # σ=25 input ≈ 20.2 dB; 30 steps: 23.6 dB

    rng = np.random.default_rng(0)
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(src)
    written, failed = denoise_path(model, [(src, dst)], gray=False)
    assert not failed and np.asarray(Image.open(dst)).shape == (37, 45, 3)

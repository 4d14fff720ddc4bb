"""``sparsefold denoise IN OUT`` with no model and no ``--sigma`` (issue 16, item 8): the default is the bundled
blind CDLNet, which estimates σ from each image, so a clean photo comes back nearly unchanged and a strongly or
weakly noisy one is denoised at its own level. Through ``sparsefold.cli.main``, as a user runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsefold.cli import DEFAULT_MODEL, main
from sparsefold.datasets import gaussian_eval_noise, load_image, save_image
from sparsefold.trainers.evaluate import psnr
from sparsefold.trainers.storage import read_config, resolve_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "set12" / "02.png"  # a photo with its own fine detail (house)


def test_the_default_model_is_blind() -> None:
    noise = read_config(resolve_checkpoint(DEFAULT_MODEL))["run"]["noise"]
    assert (noise["kind"], noise["sigma"], noise["sigma_max"]) == ("gaussian", 0.0, 55.0)


def denoised(src: Path, tmp_path: Path) -> torch.Tensor:
    out = tmp_path / ("out_" + src.name)
    assert main(["denoise", str(src), str(out), "--quiet"]) == 0
    return load_image(out)


@pytest.mark.skipif(not IMAGE.is_file(), reason="needs ../shared/data/set12")
def test_clean_photo_comes_back_nearly_unchanged(tmp_path: Path) -> None:
    clean = load_image(IMAGE)
    assert psnr(denoised(IMAGE, tmp_path), clean) >= 40.0  # the σ=25-only default gave 29.95 dB


@pytest.mark.skipif(not IMAGE.is_file(), reason="needs ../shared/data/set12")
@pytest.mark.parametrize("sigma,gain", [(10, 4.0), (50, 11.0)])
def test_noise_of_unknown_level_is_removed_at_its_level(tmp_path: Path, sigma: float, gain: float) -> None:
    clean = load_image(IMAGE)
    noisy = gaussian_eval_noise([clean], sigma)[0].clamp(0, 1)  # a saved 8-bit photo is clipped
    src = tmp_path / f"noisy{sigma}.png"
    save_image(noisy, src)
    noisy = load_image(src)
    assert psnr(denoised(src, tmp_path), clean) >= psnr(noisy, clean) + gain

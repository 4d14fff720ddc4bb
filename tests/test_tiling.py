"""Tiled inference (trainers/tiling.py): every bundled model gives the whole image's output from tiles,
the tile size follows the memory budget, and the CLI takes --max-memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsefold.cli import main
from sparsefold.errors import InputError
from sparsefold.trainers import evaluate, tiling
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import denoise, psnr

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _photos() -> list[torch.Tensor]:
    """Two clean gray photos in [0, 1]: BSD68 test001/test002 when ../shared is there, else skimage's."""
    if (SHARED / "bsd68").is_dir():
        files = sorted((SHARED / "bsd68").glob("*.png"))[:2]
        arrays = [np.asarray(Image.open(f).convert("L")) for f in files]
    else:
        from skimage import data

        arrays = [data.camera(), data.moon()]
    return [torch.from_numpy(a.astype(np.float32) / 255)[None] for a in arrays]


PHOTOS = _photos()


def _strip(photo: torch.Tensor, long: int, short: int, tall: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (clean, noisy σ=25) long×short crop, tall or wide (the photo transposed when it is too narrow, and
    mirrored onto itself when it is still too short: models with a large halo need long strips)."""
    x = photo if photo.shape[1] >= long else photo.transpose(1, 2)
    while x.shape[1] < long:
        x = torch.cat([x, x.flip(1)], dim=1)
    x = x[:, :long, :short].contiguous()
    x = x if tall else x.transpose(1, 2).contiguous()
    g = torch.Generator().manual_seed(seed)
    return x, x + 25 / 255 * torch.randn(x.shape, generator=g)


def test_tiled_equals_whole_for_every_bundled_model(bundled_name):
    name = bundled_name
    """Tiles cut through the image (windows that stop short of the border on both sides) and the stitched
    output equals the whole image's to 1e-4, PSNR to 0.01 dB; blind (σ=None): σ and the image mean come
    from the whole image. Sizes are not multiples of the stride (alignment)."""
    model, _ = load_model(name)
    model.eval()
    halo, align = model.tiling
    core = -(-max(halo + 16, tiling.MIN_CORE) // align) * align
    for i, tall in enumerate((True, False)):  # cuts across rows, then across columns
        clean, noisy = _strip(PHOTOS[i], 3 * core - 1, 24, tall, seed=i)
        max_pixels = 24 * (core + 2 * halo + 2 * align)
        tiles = tiling.tile_grid(*noisy.shape[-2:], model.tiling, max_pixels)
        windows = [t.rows if tall else t.cols for t in tiles]
        assert len(tiles) >= 3 and any(w.start > 0 and w.stop < 3 * core - 1 for w in windows)
        whole = denoise(model, noisy, sigma=None, max_memory=1 << 40)
        tiled = tiling.denoise_tiled(model, noisy, "cpu", None, max_pixels)
        assert (tiled - whole).abs().max().item() <= 1e-4, name
        assert abs(psnr(tiled, clean) - psnr(whole, clean)) < 0.01


def test_tile_size_shrinks_with_the_budget():
    """The memory model picks fewer pixels per tile (more tiles) for a smaller budget, the whole image when
    it fits, and refuses a budget that holds no tile."""
    model, _ = load_model("cscnet")
    model.eval()
    big = torch.zeros(1, 1000, 1000)
    assert tiling.tile_pixels(model, big, "cpu", 1 << 40) is None
    sizes = [tiling.tile_pixels(model, big, "cpu", mib << 20) for mib in (1024, 256, 128)]
    assert sizes[0] > sizes[1] > sizes[2] > 0
    counts = [len(tiling.tile_grid(1000, 1000, model.tiling, p)) for p in sizes]
    assert 1 < counts[0] < counts[1] < counts[2]
    with pytest.raises(InputError, match="--max-memory"):
        denoise(model, big, max_memory=1 << 20)


def test_denoise_tiles_under_a_budget_and_matches(monkeypatch):
    """evaluate.denoise goes through the tiler when the image does not fit, with the same result."""
    model, _ = load_model("dncnn")
    model.eval()
    _, noisy = _strip(PHOTOS[0], 200, 200, True, seed=3)
    calls = []
    real = evaluate.denoise_tiled
    monkeypatch.setattr(evaluate, "denoise_tiled", lambda *a: calls.append(a[4]) or real(*a))  # a[4]: max_pixels
    whole = denoise(model, noisy, sigma=25, max_memory=1 << 40)
    assert not calls
    tiled = denoise(model, noisy, sigma=25, max_memory=8 << 20)
    assert calls and len(tiling.tile_grid(200, 200, model.tiling, calls[0])) > 1
    assert (tiled - whole).abs().max().item() <= 1e-4


def test_cli_max_memory(tmp_path, capsys):
    """`denoise --max-memory 8M` writes the same image as without a limit, up to float rounding (a tile's
    convolutions may sum in another order: a value on a .5 boundary rounds to the next uint8 level, seen once
    in CI under load); a bad size exits 2."""
    _, noisy = _strip(PHOTOS[1], 200, 200, True, seed=4)
    src = tmp_path / "in.png"
    Image.fromarray((noisy[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(src)
    assert main(["denoise", "dncnn", str(src), str(tmp_path / "whole.png"), "--sigma", "25"]) == 0
    assert main(["denoise", "dncnn", str(src), str(tmp_path / "tiled.png"), "--sigma", "25",
                 "--max-memory", "8M"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f)).astype(int) for f in ("whole.png", "tiled.png"))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3  # a seam error would differ by far more
    with pytest.raises(SystemExit) as e:
        main(["denoise", "dncnn", str(src), str(tmp_path / "x.png"), "--max-memory", "12X"])
    assert e.value.code == 2 and "--max-memory" in capsys.readouterr().err

"""Inputs as users have them (issue 13, items 6 and 7): every PIL mode read correctly or refused in one
line, images smaller than the model's kernel, bad files skipped and counted while sharding, and a
hypothesis test of ``sparsefold denoise`` over generated images (modes, sizes, corrupt bytes)."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import sparsefold.trainers.checkpoint as checkpoint
from sparsefold.cli import main
from sparsefold.config import DataConfig
from sparsefold.datasets import load_image, read_index, train_urls
from sparsefold.datasets.images import list_images
from sparsefold.errors import InputError

WHITE = 255


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gray_palette(g: np.ndarray) -> Image.Image:
    im = Image.frombytes("P", (g.shape[1], g.shape[0]), g.tobytes())
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    return im


def _exif_rotated(g: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image is shown rotated 90° clockwise
    return _save(Image.fromarray(g).convert("RGB"), "JPEG", quality=95, exif=exif)


def _composite(g: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Gray g with alpha a over white, in [0, 1] (the documented rule, computed independently of PIL)."""
    return (g.astype(np.float64) * a + WHITE * (255.0 - a)) / 255.0 / 255.0


# mode -> (encoder(gray levels, alpha) -> (bytes, suffix), expected(gray, alpha) -> displayed values in [0, 1],
#          tolerance of the decoded values). Alpha is used by the transparent modes only.
Encoder = Callable[[np.ndarray, np.ndarray], tuple[bytes, str]]
MODES: dict[str, tuple[Encoder, Callable[[np.ndarray, np.ndarray], np.ndarray], float]] = {
    "L": (lambda g, a: (_save(Image.fromarray(g), "PNG"), ".png"), lambda g, a: g / 255.0, 1e-6),
    "RGB": (lambda g, a: (_save(Image.fromarray(np.dstack([g] * 3)), "PNG"), ".png"), lambda g, a: g / 255.0, 1e-6),
    "1": (lambda g, a: (_save(Image.fromarray(g >= 128), "PNG"), ".png"), lambda g, a: (g >= 128) * 1.0, 1e-6),
    "P": (lambda g, a: (_save(_gray_palette(g), "PNG"), ".png"), lambda g, a: g / 255.0, 1e-6),
    "P+transparency": (lambda g, a: (_save(_gray_palette(g), "PNG", transparency=int(g.flat[0])), ".png"),
                       lambda g, a: np.where(g == g.flat[0], 1.0, g / 255.0), 1e-6),
    "LA": (lambda g, a: (_save(Image.fromarray(np.dstack([g, a]), "LA"), "PNG"), ".png"), _composite, 1.5 / 255),
    "RGBA": (lambda g, a: (_save(Image.fromarray(np.dstack([g, g, g, a]), "RGBA"), "PNG"), ".png"),
             _composite, 1.5 / 255),
    "CMYK": (lambda g, a: (_save(Image.fromarray(np.dstack([g] * 3)).convert("CMYK"), "TIFF"), ".tif"),
             lambda g, a: g / 255.0, 1e-6),
    "CMYK-JPEG": (lambda g, a: (_save(Image.fromarray(np.dstack([g] * 3)).convert("CMYK"), "JPEG", quality=95),
                                ".jpg"), lambda g, a: g / 255.0, 0.1),
    "I;16": (lambda g, a: (_save(Image.fromarray(g.astype(np.uint16) * 257), "PNG"), ".png"), lambda g, a: g / 255.0,
             1e-6),
    "I;16B": (lambda g, a: (_save(Image.frombytes("I;16B", g.shape[::-1], (g.astype(">u2") * 257).tobytes()),
                                  "TIFF"), ".tif"), lambda g, a: g / 255.0, 1e-6),
    "I": (lambda g, a: (_save(Image.fromarray(g.astype(np.int32) * 257), "TIFF"), ".tiff"), lambda g, a: g / 255.0,
          1e-6),
    "F": (lambda g, a: (_save(Image.fromarray((g / 255.0).astype(np.float32)), "TIFF"), ".tif"),
          lambda g, a: g / 255.0, 1e-6),
    "EXIF-JPEG": (lambda g, a: (_exif_rotated(g), ".jpg"), lambda g, a: np.rot90(g, k=-1) / 255.0, 0.1),
}


def gray_levels(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Mid-gray levels (90..166) and an alpha channel (0..255) of an h×w image."""
    return (rng.normal(128, 15, (h, w)).clip(90, 166).astype(np.uint8),
            rng.integers(0, 256, (h, w)).astype(np.uint8))


# --------------------------------------------------------------------------------------- modes
def test_every_mode_reads_as_what_it_shows(tmp_path):
    """Original: 16-bit and 32-bit PNG/TIFF read as white (``convert("L")`` clips at 255), float TIFF as
    black, transparent pixels as the colour under them, and an EXIF-rotated JPEG sideways."""
    g, a = gray_levels(np.random.default_rng(0), 6, 10)
    g[0, 0] = 100  # one palette index is transparent (P+transparency); a few pixels share it
    for mode, (encode, expected, tol) in MODES.items():
        data, suffix = encode(g, a)
        path = tmp_path / f"{mode}{suffix}"
        path.write_bytes(data)
        want = expected(g, a)
        for gray in (True, False):
            x = load_image(path, gray=gray)
            assert x.dtype == torch.float32 and x.shape == (1 if gray else 3, *want.shape), (mode, x.shape)
            err = (x - torch.from_numpy(want).float()).abs()
            assert (err.mean() if "JPEG" in mode else err.max()) <= tol, (mode, gray, float(err.max()))


@pytest.mark.parametrize("mode, arr, why", [
    ("F", np.full((4, 4), 2.5, np.float32), r"outside \[0, 1\]"),
    ("F", np.full((4, 4), np.nan, np.float32), r"outside \[0, 1\]"),
    ("I", np.full((4, 4), 70000, np.int32), "outside 16-bit"),
])
def test_out_of_range_pixels_are_refused_in_one_line(tmp_path, mode, arr, why):
    """Original: a float TIFF of 0..255 read as black (or NaN), a 32-bit image clipped to white, rc 0."""
    path = tmp_path / "x.tif"
    Image.fromarray(arr).save(path)
    with pytest.raises(InputError, match=why) as e:
        load_image(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("side", [12, 16])  # 144 px: over MAX_IMAGE_PIXELS (warning); 256: over 2x (error)
def test_decompression_bomb_is_a_bad_file(tmp_path, monkeypatch, side):
    """Original: PIL's DecompressionBombError escaped as a traceback and its warning let the image through."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((side, side), np.uint8)).save(path)
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(path)


def test_list_images_of_a_file_is_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="not a folder"):
        list_images(tmp_path / "x.png")


# ------------------------------------------------------------------------------------ denoise
@pytest.fixture(scope="module")
def bundled_once():
    """The bundled models loaded once per module: ``load_model`` is served from a cache."""
    real, cache = checkpoint.load_model, {}

    def cached(ref, device="cpu"):
        if (str(ref), str(device)) not in cache:
            cache[str(ref), str(device)] = real(ref, device)
        model, meta = cache[str(ref), str(device)]
        return model, {**meta, "model": dict(meta["model"])}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "load_model", cached)
        yield


def run_denoise(capsys, *args: str) -> tuple[int, list[str]]:
    rc = main(["denoise", *args])
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("model", ["cscnet", "lista"])
@pytest.mark.parametrize("size", [(1, 1), (3, 3), (2, 9)])
def test_images_smaller_than_the_kernel(tmp_path, capsys, bundled_once, model, size):
    """Original: a traceback from torch for cscnet (1×1) and a refusal for lista (below its 8×8 patch);
    now padded to the kernel/patch size, denoised and cropped back."""
    src = tmp_path / "x.png"
    Image.fromarray(np.full(size, 128, np.uint8)).save(src)
    rc, err = run_denoise(capsys, model, str(src), str(tmp_path / "y.png"), "--sigma", "25")
    assert rc == 0 and err == [], err
    out = np.asarray(Image.open(tmp_path / "y.png"))
    assert out.shape == size and abs(out.mean() - 128) < 20


def test_16bit_png_is_not_white(tmp_path, capsys, bundled_once):
    """Original: a mid-gray 16-bit PNG came out pure white (255 everywhere), rc 0."""
    src = tmp_path / "x16.png"
    g, _ = gray_levels(np.random.default_rng(1), 24, 24)
    Image.fromarray(g.astype(np.uint16) * 257).save(src)
    rc, err = run_denoise(capsys, str(src), str(tmp_path / "y.png"), "--sigma", "25")
    out = np.asarray(Image.open(tmp_path / "y.png"))
    assert rc == 0 and out.dtype == np.uint8 and abs(out.mean() - g.mean()) < 10


CORRUPTIONS = ("none", "truncate", "flip", "empty", "garbage")


def corrupt(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    if how == "truncate":
        return data[: int(rng.integers(0, len(data)))]
    if how == "flip":
        b = bytearray(data)
        for i in rng.integers(0, len(b), int(rng.integers(1, 8))):
            b[i] ^= int(rng.integers(1, 256))
        return bytes(b)
    if how == "empty":
        return b""
    if how == "garbage":
        return rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
    return data


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(sorted(MODES)), h=st.integers(1, 12), w=st.integers(1, 12),
       how=st.sampled_from(CORRUPTIONS), seed=st.integers(0, 2**32 - 1))
def test_denoise_any_generated_image(capsys, bundled_once, mode, h, w, how, seed):
    """rc 0 with a sane image (the input's size, its mean level) or rc 2 with exactly one line; never a
    traceback, never rc 0 with garbage. Original: 16-bit/float images came out white/black, small images
    raised torch errors, corrupt files gave tracebacks."""
    rng = np.random.default_rng(seed)
    g, a = gray_levels(rng, h, w)
    encode, expected, _ = MODES[mode]
    data, suffix = encode(g, a)
    data = corrupt(data, how, rng)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / f"in{suffix}", Path(tmp) / "out.png"
        src.write_bytes(data)
        capsys.readouterr()
        rc, err = run_denoise(capsys, str(src), str(dst), "--sigma", "25")
        assert rc in (0, 2), (rc, err)
        if rc == 2:
            assert len(err) == 1 and err[0].startswith("error: ") and not dst.exists(), err
            assert how != "none", err  # every generated mode is supported
            return
        assert err == [] and dst.is_file()
        out = np.asarray(Image.open(dst), dtype=np.float64) / 255
        if how == "none":
            want = expected(g, a)
            assert out.shape == want.shape and abs(out.mean() - want.mean()) < 0.08, (out.mean(), want.mean())
        else:  # a corrupt file that still decodes: the output matches what was decoded
            assert out.shape == tuple(load_image(src).shape[-2:])


# ---------------------------------------------------------------------------------------- shards
def photos_with_two_bad(folder: Path, side: int, rng: np.random.Generator) -> Path:
    """``folder`` with three good side×side PNGs, an empty file and a truncated PNG."""
    folder.mkdir()
    for i in range(3):
        Image.fromarray(gray_levels(rng, side, side)[0]).save(folder / f"good{i}.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes((folder / "good0.png").read_bytes()[:60])
    return folder


def test_training_folder_skips_and_counts_bad_images(tmp_path, capsys):
    """Original: sharding an image folder for training died at the first unreadable image."""
    folder = photos_with_two_bad(tmp_path / "photos", 32, np.random.default_rng(0))
    urls = train_urls(DataConfig(train=str(folder), cache_dir=str(tmp_path / "cache"), shard_size=2))
    index = read_index(Path(urls[0]).parent)
    assert index["total"] == 3 and len(urls) == 2
    assert sorted(Path(s["source"]).name for s in index["skipped"]) == ["cut.png", "empty.png"]
    err = capsys.readouterr().err
    assert "2 of 5 images skipped" in err and "index.json" in err
    # the CLI's shard writer says the same
    assert main(["shards", str(folder), str(tmp_path / "sh")]) == 0
    err = capsys.readouterr().err
    assert "wrote 3 images" in err and "skipped 2" in err
    assert json.loads((tmp_path / "sh" / "index.json").read_text())["total"] == 3


def test_training_on_a_folder_with_bad_images_runs_and_counts_them(tmp_path, tiny_overrides, capsys):
    """Original: the run died while sharding; now it trains on the good images and its data/skipped (the
    final JSON's ``skipped``) counts the two unreadable ones."""
    rng = np.random.default_rng(1)
    folder = photos_with_two_bad(tmp_path / "photos", 64, rng)
    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(gray_levels(rng, 64, 64)[0]).save(val / "v.png")
    args = tiny_overrides + ["model.name=dncnn", "model.depth=3", "model.features=8", f"data.train={folder}",
                             f"data.val={val}", "data.val_images=1", "data.shard_size=1", "data.batch_size=2",
                             "trainer.max_steps=2", "trainer.val_every=2", "wandb.mode=disabled"]
    assert main(["train", *args]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and out["skipped"] == 2

"""``sparsefold denoise`` never destroys what the user had (issue 13, items 1, 7 and 9).

Never over an input (same path, a symlink to it, ``DIR DIR``), never over an existing file without
``--overwrite``, name clashes (``x.png``, ``x.jpg``, ``X.PNG``) refused before anything is written,
atomic writes, a folder job that goes on past unreadable images, and ``--sigma`` range checked like
``evaluate``. In-process through ``sparsefold.cli.main`` with the bundled cscnet.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsefold.cli import main
from sparsefold.datasets.images import save_image


def gray_png(path: Path, seed: int = 0, size: tuple[int, int] = (16, 20)) -> Path:
    arr = np.random.default_rng(seed).normal(128, 20, size).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its SHA-256."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def denoise(capsys, *args: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of ``sparsefold denoise ARGS`` run in this process."""
    rc = main(["denoise", *args])
    out, err = capsys.readouterr()
    return rc, out, [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize("same", ["x.png", "./x.png", "link.png"])
def test_never_writes_over_its_input_file(tmp_path, capsys, monkeypatch, same):
    """Original: ``denoise x.png x.png`` replaced the photo with rc 0 (and a symlink was written through)."""
    monkeypatch.chdir(tmp_path)
    x = gray_png(tmp_path / "x.png")
    (tmp_path / "link.png").symlink_to(x)
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):  # not even with --overwrite
        rc, out, err = denoise(capsys, "x.png", same, "--sigma", "25", *extra)
        assert rc == 2 and out == "" and len(err) == 1 and "is an input image" in err[0], err
    assert tree(tmp_path) == before


def test_never_writes_over_its_input_folder(tmp_path, capsys):
    """Original: ``denoise DIR DIR`` replaced every image of the folder with rc 0."""
    for i, name in enumerate(("a.png", "b.png")):
        gray_png(tmp_path / "d" / name, seed=i)
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, out, err = denoise(capsys, str(tmp_path / "d"), str(tmp_path / "d"), *extra)
        assert rc == 2 and out == "" and len(err) == 1 and "is an input image" in err[0], err
    assert tree(tmp_path) == before


def test_name_clash_is_refused_before_anything_is_written(tmp_path, capsys):
    """Original: x.png, x.jpg and X.PNG were all written (to x.png twice), one result silently lost."""
    for i, name in enumerate(("x.png", "x.jpg", "X.PNG", "y.png")):
        gray_png(tmp_path / "in" / name, seed=i)
    rc, out, err = denoise(capsys, str(tmp_path / "in"), str(tmp_path / "out"), "--sigma", "25")
    assert rc == 2 and out == "" and len(err) == 1, err
    assert all(name in err[0] for name in ("x.png", "x.jpg", "X.PNG")) and "y.png" not in err[0]
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == {}  # not even y.png


def test_existing_output_needs_overwrite(tmp_path, capsys):
    """Original: an existing output was replaced without a word (and there was no --overwrite)."""
    x = gray_png(tmp_path / "x.png")
    y = gray_png(tmp_path / "y.png", seed=1)
    old = digest(y)
    rc, out, err = denoise(capsys, str(x), str(y), "--sigma", "25")
    assert rc == 2 and out == "" and len(err) == 1 and "--overwrite" in err[0] and str(y) in err[0], err
    assert digest(y) == old
    rc, out, err = denoise(capsys, str(x), str(y), "--sigma", "25", "--overwrite")
    assert rc == 0 and out.split() == [str(y)] and err == []
    assert digest(y) != old and Image.open(y).size == Image.open(x).size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y.png"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """Original: save_image wrote straight into the target, so a failure mid-write (disk full, a crash)
    left half an image where the old one was."""
    target = gray_png(tmp_path / "out.png")
    old = digest(target)
    real_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        buf = io.BytesIO()
        real_save(self, buf, *args, **kwargs)
        with open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp as fh:
            fh.write(buf.getvalue()[:40])  # half an image
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_image(torch.full((1, 8, 8), 0.5), target)
    assert digest(target) == old
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # the temp file is gone too


def test_folder_job_goes_on_past_bad_files(tmp_path, capsys):
    """Original: the first unreadable image ended the job with a traceback; later images were never done."""
    src = tmp_path / "in"
    gray_png(src / "a.png")
    (src / "b.png").write_bytes(b"")  # zero bytes
    good = io.BytesIO()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(good, format="PNG")
    (src / "c.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # truncated
    (src / "d.jpg").write_bytes(b"not an image at all")
    gray_png(src / "e.png", seed=3)
    rc, out, err = denoise(capsys, str(src), str(tmp_path / "out"), "--sigma", "25")
    assert rc == 2
    assert out.split() == [str(tmp_path / "out" / n) for n in ("a.png", "e.png")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "e.png"]
    assert len(err) == 4 and all(ln.startswith("error: ") for ln in err), err
    for line, name in zip(err, ("b.png", "c.png", "d.jpg")):
        assert name in line
    assert "3 of 5" in err[-1]


def test_unreadable_single_input_is_one_line(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc, out, err = denoise(capsys, str(tmp_path / "x.png"), str(tmp_path / "y.png"))
    assert rc == 2 and out == "" and len(err) == 1 and "x.png" in err[0], err
    assert not (tmp_path / "y.png").exists()


@pytest.mark.parametrize("sigma", ["-5", "256", "nan", "inf"])
def test_sigma_out_of_range_is_refused_like_evaluate(tmp_path, capsys, sigma):
    """Original: ``denoise --sigma -5`` ran (rc 0) while ``evaluate --sigma -5`` was refused."""
    x = gray_png(tmp_path / "x.png")
    rc, out, err = denoise(capsys, str(x), str(tmp_path / "y.png"), "--sigma", sigma)
    assert rc == 2 and out == "" and len(err) == 1 and "--sigma" in err[0], err
    assert not (tmp_path / "y.png").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused_first(tmp_path, capsys):
    x = gray_png(tmp_path / "x.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, out, err = denoise(capsys, str(x), str(ro / "y.png"))
    finally:
        ro.chmod(0o700)
    assert rc == 2 and len(err) == 1 and "not writable" in err[0], err

"""Image folders: listing, loading, saving, and scikit-image's bundled photos as a default set.

Images are ``torch.float32`` tensors of shape (C, H, W) in [0, 1]; gray images have C = 1
(PIL ``convert("L")``, ITU-R 601 luma), colour images C = 3 (``convert("RGB")``).

``builtin:skimage`` is a small offline image set: the natural photographs bundled inside the
scikit-image wheel (no pooch download), written once as PNGs into ``<cache_dir>/skimage-gray/``
(or ``skimage-rgb/``).  :func:`split_builtin` holds out ``camera``, ``astronaut`` and ``coins``
for validation and trains on the other 13 photos.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BUILTIN_PHOTOS",
    "BUILTIN_VAL",
    "IMAGE_SUFFIXES",
    "builtin_skimage_dir",
    "default_cache_dir",
    "list_images",
    "load_image",
    "resolve_image_dir",
    "save_image",
    "split_builtin",
    "uint8_to_tensor",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Natural photographs shipped inside scikit-image (skimage/data/*), loadable with no network.
# Left out on purpose: synthetic/binary images (horse, logo, checkerboard, colorwheel, binary_blobs),
# `cat` (same photo as chelsea), `microaneurysms` (102x102, smaller than a patch), `retina` (1411^2,
# mostly black background), and everything that needs a pooch download (eagle, lily, kidney, ...).
BUILTIN_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
)
# Held out for validation by split_builtin: a classic gray test photo, a colour portrait, and a
# textured object photo.
BUILTIN_VAL = ("astronaut", "camera", "coins")


def default_cache_dir() -> Path:
    """``$SPARSEFOLD_CACHE`` if set, else ``~/.cache/sparsefold`` (used when data.cache_dir is "")."""
    env = os.environ.get("SPARSEFOLD_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsefold"


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (png/jpg/jpeg/bmp/tif, any case), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path, gray: bool = True) -> Tensor:
    """Read an image as float32 (C, H, W) in [0, 1]: C = 1 when ``gray``, else 3."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
    return uint8_to_tensor(arr)


def uint8_to_tensor(arr: np.ndarray) -> Tensor:
    """(H, W) or (H, W, C) uint8 array -> float32 (C, H, W) tensor in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return (
        torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)
    )  # copy: PIL arrays are read-only


def save_image(tensor: Tensor, path: str | Path) -> None:
    """Write a (C, H, W) / (H, W) tensor in [0, 1] as an 8-bit PNG (clipped, rounded)."""
    x = tensor.detach().float().cpu()
    if x.dim() == 3:
        x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    elif x.dim() != 2:
        raise ValueError(f"save_image: expected (C,H,W) or (H,W), got shape {tuple(tensor.shape)}")
    arr = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def _skimage_photo(name: str, gray: bool) -> np.ndarray:
    """One bundled scikit-image photo as uint8 (H, W) or (H, W, 3), converted like load_image."""
    import skimage.data
    from PIL import Image

    arr = np.asarray(getattr(skimage.data, name)())
    im = Image.fromarray(arr.astype(np.uint8))
    return np.asarray(im.convert("L" if gray else "RGB"))


def builtin_skimage_dir(cache_dir: str | Path, gray: bool = True) -> Path:
    """Write scikit-image's bundled photos once into ``cache_dir/skimage-{gray,rgb}/``; return it.

    Safe against concurrent callers (several ranks): the PNGs are written into a temporary folder
    that is renamed into place; a complete folder is reused as is.
    """
    from PIL import Image

    out = Path(cache_dir).expanduser().resolve() / ("skimage-gray" if gray else "skimage-rgb")
    if out.is_dir() and all((out / f"{n}.png").is_file() for n in BUILTIN_PHOTOS):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name in BUILTIN_PHOTOS:
            Image.fromarray(_skimage_photo(name, gray)).save(tmp / f"{name}.png", format="PNG")
        if out.exists():  # an incomplete folder from an interrupted run, or another rank won
            if all((out / f"{n}.png").is_file() for n in BUILTIN_PHOTOS):
                return out
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:  # another process renamed its copy first
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def split_builtin(files: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, val) split of the builtin photos: val = stems in :data:`BUILTIN_VAL`.

    Both lists are sorted by name.  Raises ValueError when none of the validation photos is present.
    """
    paths = sorted(Path(f) for f in files)
    val = [p for p in paths if p.stem in BUILTIN_VAL]
    if not val:
        raise ValueError(f"split_builtin: none of {', '.join(BUILTIN_VAL)} among {len(paths)} files")
    train = [p for p in paths if p.stem not in BUILTIN_VAL]
    return train, val


def resolve_image_dir(spec: str | Path, cache_dir: str | Path | None = None, gray: bool = True) -> Path:
    """Map ``builtin:skimage`` to the cached photo folder; otherwise check ``spec`` is an image folder.

    ``cache_dir`` empty/None means :func:`default_cache_dir`.  Raises ValueError naming the path and
    the fix when the folder is missing or holds no images.
    """
    if str(spec) == "builtin:skimage":
        return builtin_skimage_dir(Path(cache_dir) if cache_dir else default_cache_dir(), gray=gray)
    if str(spec).startswith("builtin:"):
        raise ValueError(f"{spec}: unknown builtin image set (only builtin:skimage exists)")
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"{folder}: no such image folder; pass an existing folder of png/jpg/bmp/tif images or builtin:skimage"
        )
    if not list_images(folder):
        raise ValueError(
            f"{folder}: folder holds no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}); "
            "point it at an image folder or use builtin:skimage"
        )
    return folder.resolve()

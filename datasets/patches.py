"""Seeded patch extraction: decoding shard images, random crops, and the 8 dihedral transforms.

Everything random takes an explicit :class:`torch.Generator`; :func:`stable_seed` derives the
per-(seed, rank, worker, epoch) seeds from a cryptographic hash, so they do not depend on Python's
hash randomization, the process id or the clock.
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["decode_image", "dihedral", "random_crops", "stable_seed"]

IMAGE_FIELDS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "ppm", "pgm")


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (same value in every process and run)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def decode_image(sample: dict, gray: bool) -> np.ndarray:
    """Decode the image field of a WebDataset sample to uint8 (H, W, C) (C = 1 gray, 3 RGB).

    Raises ValueError when the sample has no image field; PIL errors propagate for bad bytes.
    """
    from PIL import Image

    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample {sample.get('__key__')!r} has no image field (fields: {fields})")
    with Image.open(io.BytesIO(sample[field])) as im:
        arr = np.array(im.convert("L" if gray else "RGB"), dtype=np.uint8)  # a writable copy
    return arr[:, :, None] if arr.ndim == 2 else arr


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (H, W, C) so both sides are >= size (centred; repeats the reflection if needed)."""
    ph, pw = max(0, size - arr.shape[0]), max(0, size - arr.shape[1])
    if ph == 0 and pw == 0:
        return arr
    mode: Literal["reflect", "edge"] = "reflect" if min(arr.shape[:2]) > 1 else "edge"  # reflect needs 2 px
    return np.pad(arr, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode=mode)


def dihedral(x: Tensor, d: int) -> Tensor:
    """Transform ``d`` in 0..7 of the dihedral group on the last two dims: rot90 ``d % 4``, then a
    horizontal flip when ``d >= 4``."""
    x = torch.rot90(x, d % 4, dims=(-2, -1))
    return x.flip(-1) if d >= 4 else x


def random_crops(img: np.ndarray, count: int, size: int, generator: torch.Generator) -> Tensor:
    """``count`` random ``size``x``size`` crops of a uint8 (H, W, C) image, each under a random
    dihedral transform; returns float32 (count, C, size, size) in [0, 1]."""
    arr = _pad_to(img, size)
    h, w = arr.shape[:2]
    crops = []
    for _ in range(count):
        i = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        j = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        d = int(torch.randint(0, 8, (1,), generator=generator))
        patch = torch.from_numpy(np.ascontiguousarray(arr[i : i + size, j : j + size]))
        crops.append(dihedral(patch.permute(2, 0, 1), d))
    return torch.stack(crops).float().div_(255.0)

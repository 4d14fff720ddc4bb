"""Image folders: listing, loading, saving, and scikit-image's bundled photos as a default set.

Images are ``torch.float32`` tensors of shape (C, H, W) in [0, 1]; gray images have C = 1
(PIL ``convert("L")``, ITU-R 601 luma), colour images C = 3 (``convert("RGB")``).  :func:`read_pixels`
says how 16-bit, float, palette, transparent, CMYK and EXIF-rotated files are read, and which are refused
(one-line :class:`~sparsefold.errors.InputError`).

``builtin:skimage`` is a small offline image set: the natural photographs bundled inside the
scikit-image wheel (no pooch download), written once as PNGs into ``<cache_dir>/skimage-gray/``
(or ``skimage-rgb/``).  :func:`split_builtin` holds out ``camera``, ``astronaut`` and ``coins``
for validation and trains on the other 13 photos.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sparsefold.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "BUILTIN_PHOTOS",
    "BUILTIN_VAL",
    "IMAGE_SUFFIXES",
    "builtin_skimage_dir",
    "default_cache_dir",
    "list_images",
    "load_image",
    "plan_outputs",
    "read_pixels",
    "resolve_image_dir",
    "save_image",
    "split_builtin",
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
    """Image files directly inside ``folder`` (png/jpg/jpeg/bmp/tif, any case), sorted by name.

    Raises InputError (one line) when ``folder`` is missing, not a folder, or cannot be listed."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        raise InputError(f"{folder}: no such folder") from None
    except NotADirectoryError:
        raise InputError(f"{folder}: not a folder") from None
    except OSError as e:
        raise InputError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    return sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(path: str | Path, gray: bool = True) -> Tensor:
    """Read an image as float32 (C, H, W) in [0, 1]: C = 1 when ``gray``, else 3 (see :func:`read_pixels`)."""
    return torch.from_numpy(read_pixels(path, gray).transpose(2, 0, 1).copy())


def read_pixels(path: str | Path, gray: bool = True) -> np.ndarray:
    """Decode any image a user may have into float32 (H, W, C) in [0, 1], C = 1 when ``gray`` else 3.

    * 8-bit modes (L, RGB, 1, P, CMYK, YCbCr, ...) go through PIL's ``convert`` (gray: ITU-R 601 luma)
      and are divided by 255, exactly as before.
    * Transparency (RGBA, LA, PA, palette or gray/RGB with a transparent colour) is composited on
      WHITE, then converted: a transparent pixel reads as white, an opaque one as itself.
    * 16-bit gray (``I;16``, ``I;16B``, ...) is divided by 65535; 32-bit integer ``I`` is read as
      16-bit and refused when a value falls outside 0..65535; float ``F`` (TIFF) is taken as is and
      refused unless every value is finite and in [0, 1].  Gray from these is replicated for C = 3.
    * The EXIF orientation is applied (a phone's rotated JPEG comes out upright).

    Anything else (unreadable, zero bytes, truncated, a mode with no gray/RGB conversion, more pixels
    than PIL's ``Image.MAX_IMAGE_PIXELS``: a possible decompression bomb) raises InputError, one line
    naming the file.
    """
    path = Path(path)
    im = _decode(path)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = _high_depth(im, path)
        return np.repeat(arr, 1 if gray else 3, axis=2)
    return np.asarray(_to_8bit(im, path, gray), dtype=np.float32).reshape(im.height, im.width, -1) / 255


def _decode(path: Path) -> Image.Image:
    """Open ``path``, decode every pixel and apply the EXIF orientation; any failure is InputError."""
    from PIL import Image, ImageOps

    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("error", message="Truncated File Read")  # TIFF: else a half-black image
            with Image.open(path) as im:
                im.load()  # PIL decodes lazily: a truncated or corrupt file fails here, not later
                return ImageOps.exif_transpose(im)  # a copy, valid after the file is closed
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except OSError as e:
        if e.filename is not None:  # the file itself: missing, a folder, no permission
            raise InputError(f"{path}: cannot open ({e.strerror or e})") from None
        raise InputError(f"{path}: cannot read the image ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001  (decoders raise SyntaxError, zlib.error, struct.error, ...)
        raise InputError(f"{path}: cannot read the image ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _high_depth(im: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit / 32-bit integer / float single-channel image as float32 (H, W, 1) in [0, 1]."""
    raw = np.asarray(im)
    arr = raw.astype(np.float32)
    if im.mode == "F":
        if not np.isfinite(arr).all() or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
            raise InputError(f"{path}: float image with values outside [0, 1] (or NaN/inf); rescale it to 0..1 "
                             "or save it as 8- or 16-bit")
    else:
        lo, hi = int(raw.min(initial=0)), int(raw.max(initial=0))
        if lo < 0 or hi > 65535:
            raise InputError(f"{path}: 32-bit integer pixels in {lo}..{hi}, outside 16-bit 0..65535; "
                             "save it as 8- or 16-bit")
        arr /= 65535
    return arr.reshape(im.height, im.width, 1)


def _to_8bit(im: Image.Image, path: Path, gray: bool) -> Image.Image:
    """An 8-bit PIL image as L or RGB, transparency composited on white."""
    from PIL import Image

    try:
        if im.has_transparency_data:
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im.convert("RGBA"))
        return im.convert("L" if gray else "RGB")
    except ValueError as e:
        raise InputError(f"{path}: image mode {im.mode} cannot be converted ({e}); save it as RGB or gray") from None


def save_image(tensor: Tensor, path: str | Path) -> None:
    """Write a (C, H, W) / (H, W) tensor in [0, 1] as an 8-bit image (clipped, rounded), atomically.

    The format follows the suffix (PNG for ``.png`` and for unknown suffixes; JPEG is lossy). Output is
    always 8-bit: a 16-bit input comes back as an 8-bit image of the same brightness. The file is
    encoded into a temporary file in the target folder and renamed over ``path`` (``os.replace``), so
    a crash leaves the old file or the complete new one, never half an image. Refusing to replace an
    existing file is the caller's decision (see :func:`plan_outputs`)."""
    from PIL import Image

    x = tensor.detach().float().cpu()
    if x.dim() == 3:
        x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    elif x.dim() != 2:
        raise ValueError(f"save_image: expected (C,H,W) or (H,W), got shape {tuple(tensor.shape)}")
    arr = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:  # O_EXCL, permissions from the umask like any new file
            Image.fromarray(arr).save(fh, format=fmt)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plan_outputs(src: str | Path, dst: str | Path, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input, output) pairs for denoising ``src`` (an image or a folder) into ``dst``; writes nothing.

    A folder maps every image ``f`` to ``dst / (f.stem + ".png")``; a file maps to ``dst`` itself when it
    has a suffix and is not a folder, else to ``dst / (stem + ".png")``.  Every name is resolved and
    checked before anything is written; one InputError line refuses the job when
      * two inputs map to one output (``x.png``, ``x.jpg``, ``X.PNG`` -> ``x.png``; compared
        case-insensitively, so the answer does not depend on the filesystem): rename all but one;
      * an output is one of the inputs (``denoise x.png x.png``, ``denoise DIR DIR``; ``os.stat``
        identity, so ``X.PNG`` on a case-insensitive disk counts too) -- refused even with ``overwrite``;
      * an output exists (unless ``overwrite``) or is a folder, or a folder would be written into a file.
    """
    src, dst = Path(src), Path(dst)
    if src.is_file():
        pairs = [(src, dst / f"{src.stem}.png" if dst.is_dir() or not dst.suffix else dst)]
    elif src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise InputError(f"{dst}: is a file, but INPUT {src} is a folder; give an output folder")
        pairs = [(f, dst / f"{f.stem}.png") for f in list_images(src)]
        if not pairs:
            raise InputError(f"{src}: folder holds no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
    else:
        raise InputError(f"{src}: no such file or folder")
    _refuse_name_clashes(pairs)
    _refuse_existing(pairs, overwrite)
    return pairs


def _refuse_name_clashes(pairs: list[tuple[Path, Path]]) -> None:
    """InputError when two inputs share one output name (case-insensitively)."""
    seen: dict[str, list[Path]] = {}
    for f, target in pairs:
        seen.setdefault(str(target.absolute()).casefold(), []).append(f)
    clash = next((fs for fs in seen.values() if len(fs) > 1), None)
    if clash:
        target = dict(pairs)[clash[0]]
        raise InputError(f"{', '.join(f.name for f in clash)} would all be written to {target}; rename all but "
                         "one of them (denoise never drops or renames a result)")


def _refuse_existing(pairs: list[tuple[Path, Path]], overwrite: bool) -> None:
    """InputError when an output is an input, a folder, or (without ``overwrite``) an existing file."""
    inputs = {(st.st_dev, st.st_ino) for st in (f.stat() for f, _ in pairs)}
    existing = []
    for _, target in pairs:
        if not target.exists():
            continue
        st = target.stat()
        if (st.st_dev, st.st_ino) in inputs:
            raise InputError(f"{target}: is an input image; denoise never writes over its input, choose "
                             "another OUTPUT")
        if target.is_dir():
            raise InputError(f"{target}: is a folder; choose another OUTPUT name")
        existing.append(target)
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(f"{existing[0]}: exists{more}; pass --overwrite to replace, or choose another OUTPUT")


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

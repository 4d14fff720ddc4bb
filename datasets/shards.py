"""WebDataset shards: writing image folders into tar shards, and turning URL specs into shard lists.

Each sample of a shard written by :func:`write_shards` holds ``<key>.png`` (lossless 8-bit PNG, gray
or RGB) and ``<key>.json`` (``{"source", "height", "width", "mode"}``); keys contain no dots.
The output folder also gets an ``index.json``::

    {"pattern": "train-{000000..000004}.tar", "shards": [...], "counts": [...], "total": N, "gray": true}

which is written last, so a folder without it is an incomplete write.  An image that cannot be read
(corrupt, truncated, empty, a decompression bomb, an unsupported mode: see ``images.read_pixels``) is
skipped, said on stderr, and listed in the index as ``"skipped": [{"source", "reason"}, ...]`` (the key
is present only when something was skipped); the other images are written.

:func:`expand_urls` accepts brace patterns, ``,``/``::`` separated lists, a local folder (its
``index.json``), ``file://``, fsspec cloud URLs (``s3://``, ``gs://``, ``gcs://``, ``az://``,
``abfs://``: call :func:`register_fsspec_schemes` first), ``http(s)://``, and ``pipe:`` only when
explicitly allowed.  Local shards are returned as absolute paths (Ray workers change directory).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparsefold.config import split_spec
from sparsefold.datasets.images import list_images, read_pixels
from sparsefold.errors import InputError

__all__ = [
    "FSSPEC_SCHEMES",
    "ensure_url_schemes",
    "expand_urls",
    "read_index",
    "register_fsspec_schemes",
    "write_shards",
]

FSSPEC_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _sanitize_key(stem: str) -> str:
    """A WebDataset-safe key part: letters, digits, ``_`` and ``-`` only (no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "img"


def _png_record(path: Path, gray: bool) -> tuple[bytes, dict[str, Any]]:
    """8-bit PNG bytes of the gray/RGB image at ``path`` (read like every image: ``read_pixels``; lossless
    for 8-bit sources) and its metadata.  Raises InputError for an unreadable image."""
    from PIL import Image

    arr = (read_pixels(path, gray) * 255).round().astype(np.uint8)
    im = Image.fromarray(arr[:, :, 0] if gray else arr)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), {"source": path.name, "height": im.height, "width": im.width, "mode": im.mode}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _remove_shards(out: Path, prefix: str) -> None:
    """Delete ``<prefix>-NNNNNN.tar`` files in ``out`` (stale shards of an earlier write)."""
    for old in out.glob(f"{prefix}-*.tar"):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", old.name):
            old.unlink()


def write_shards(
    image_dir_or_files: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    shard_size: int = 100,
    gray: bool = True,
    prefix: str = "train",
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> str:
    """Write images into ``out_dir/<prefix>-%06d.tar`` shards of ``shard_size`` samples.

    ``image_dir_or_files`` is an image folder (all its images, sorted) or a list of image files (kept
    in the given order).  Stale ``<prefix>-NNNNNN.tar`` files in ``out_dir`` are removed first.
    Unreadable images are skipped (one stderr line each, listed under ``skipped`` in index.json); when
    none is readable, InputError.  Returns the absolute brace pattern of the written shards.  ``progress``
    wraps the per-image loop (the CLI's progress bar).
    """
    import webdataset as wds

    if isinstance(image_dir_or_files, (str, Path)):
        files = list_images(image_dir_or_files)
    else:
        files = [Path(f) for f in image_dir_or_files]
    if not files:
        raise ValueError(f"write_shards: no images in {image_dir_or_files}")
    if shard_size < 1:
        raise ValueError(f"write_shards: shard_size must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"write_shards: prefix must be letters, digits, '_' or '-', got {prefix!r}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    _remove_shards(out, prefix)

    counts: list[int] = []
    skipped: list[dict[str, str]] = []
    pattern = str(out).replace("%", "%%") + f"/{prefix}-%06d.tar"
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=1e15, verbose=0) as sink:
        for i, path in enumerate((progress or iter)(files)):
            try:
                png, meta = _png_record(path, gray)
            except InputError as e:
                print(f"[sparsefold] skipped: {e}", file=sys.stderr)
                skipped.append({"source": str(path), "reason": str(e)})
                continue
            key = f"{_sanitize_key(path.stem)}-{i:06d}"
            sink.write({"__key__": key, "png": png, "json": json.dumps(meta).encode()})
            shard = sink.shard - 1  # index of the shard this sample went to
            counts.extend([0] * (shard + 1 - len(counts)))
            counts[shard] += 1
    if not counts:
        _remove_shards(out, prefix)  # the empty shard ShardWriter opened
        raise InputError(f"none of the {len(files)} images is readable; first: {skipped[0]['reason']}")
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(counts))]
    rel = f"{prefix}-{{{0:06d}..{len(names) - 1:06d}}}.tar"
    index = {"pattern": rel, "shards": names, "counts": counts, "total": sum(counts), "gray": bool(gray)}
    if skipped:
        index["skipped"] = skipped
    _write_json_atomic(out / "index.json", index)
    return str(out / rel)


def read_index(folder: str | Path) -> dict[str, Any]:
    """The ``index.json`` of a shard folder written by :func:`write_shards`."""
    path = Path(folder) / "index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read shard index ({e})") from None


def _local_shards(part: str, name: str) -> list[str]:
    """Absolute shard paths for a local folder (index.json or *.tar) or a (brace) path pattern."""
    from braceexpand import braceexpand

    folder = Path(part).expanduser()
    if folder.is_dir():
        if (folder / "index.json").is_file():
            shards = [str((folder / s).resolve()) for s in read_index(folder)["shards"]]
        else:
            shards = [str(p.resolve()) for p in sorted(folder.glob("*.tar"))]
        if not shards:
            raise ValueError(
                f"{name}: {folder} holds no index.json and no .tar shards; write shards into it first"
            )
    else:
        shards = [str(Path(u).expanduser().resolve()) for u in braceexpand(part)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise ValueError(f"{name}: shard not found: {missing[0]} ({len(missing)} of {len(shards)} missing)")
    return shards


def _known_schemes() -> set[str]:
    gopen = importlib.import_module("webdataset.gopen")
    return set(gopen.gopen_schemes) - {"__default__"} | set(FSSPEC_SCHEMES) | {"file"}


def expand_urls(spec: str | Iterable[str], allow_pipe: bool = False, name: str = "data.train") -> list[str]:
    """Expand a shard spec into a flat list of shard URLs (see the module docstring for the forms).

    Raises a one-line ValueError (prefixed with ``name``) for ``pipe:`` URLs unless ``allow_pipe``,
    an unknown URL scheme, a missing local shard, or an empty result.
    """
    from braceexpand import braceexpand

    parts = split_spec(spec) if isinstance(spec, str) else [p for s in spec for p in split_spec(s)]
    urls: list[str] = []
    for part in parts:
        if part.startswith("pipe:"):
            if not allow_pipe:
                raise ValueError(
                    f"{name}: pipe: URLs run a shell command; set data.allow_pipe=true to allow them"
                )
            urls.extend(braceexpand(part))
            continue
        m = _SCHEME.match(part)
        if m is None:
            urls.extend(_local_shards(part, name))
        elif m.group(1).lower() == "file":
            urls.extend(_local_shards(part[len("file://") :], name))
        elif m.group(1).lower() in _known_schemes():
            urls.extend(braceexpand(part))
        else:
            raise ValueError(f"{name}: unsupported URL scheme {m.group(1)!r} in {part!r}")
    if not urls:
        raise ValueError(f"{name}: no shards in {spec!r}")
    return urls


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset gopen handler: open ``url`` through fsspec (s3fs, gcsfs, adlfs, memory, ...)."""
    import fsspec

    return fsspec.open(url, mode).open()


def register_fsspec_schemes(schemes: Iterable[str] = FSSPEC_SCHEMES) -> list[str]:
    """Route ``schemes`` (default s3, gs, gcs, az, abfs) in webdataset's gopen through fsspec.

    Idempotent.  fsspec is imported only when a URL is opened; the cloud backend (``s3fs``,
    ``gcsfs``, ``adlfs``) must be installed in the process that reads.  Returns the schemes set.
    Call it in every process that opens shards (it runs in each DataLoader worker via PatchStream).
    """
    gopen = importlib.import_module("webdataset.gopen")  # wds.gopen is the function, not the module
    schemes = list(schemes)
    for s in schemes:
        gopen.gopen_schemes[s] = _fsspec_open
    return schemes


def ensure_url_schemes(urls: Iterable[str]) -> list[str]:
    """Register :data:`FSSPEC_SCHEMES` plus any scheme of ``urls`` that webdataset cannot open but
    fsspec knows (e.g. ``memory``), so spawned DataLoader workers can read them.  Returns them."""
    gopen = importlib.import_module("webdataset.gopen")
    extra = set()
    for u in urls:
        m = _SCHEME.match(u)
        if m and m.group(1) != "file" and m.group(1) not in gopen.gopen_schemes:
            extra.add(m.group(1))
    if extra:
        from fsspec.registry import known_implementations, registry

        extra = {s for s in extra if s in known_implementations or s in registry}
    return register_fsspec_schemes([*FSSPEC_SCHEMES, *sorted(extra)])

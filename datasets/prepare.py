"""From a :class:`DataConfig` to what the trainer reads: training shard URLs and validation files.

``data.train`` may be a shard spec (see :func:`expand_urls`), an image folder, or
``builtin:skimage``.  Image folders and the builtin set are written into shards once, under
``<cache_dir>/shards/<name>-<fingerprint>-<gray|rgb>-s<shard_size>/``; the fingerprint covers the
file names, sizes and modification times, so an edited folder gets fresh shards.  The builtin
training photos (13) are written one image per shard, so up to 13 ranks × workers can read them.
Several ranks may call these functions at once: shards are built in a temporary folder that is
renamed into place.  Unreadable images of a folder are skipped while sharding and counted: listed in the
shard folder's ``index.json`` and said on stderr each time the shards are used (the run goes on).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from sparsefold.config import DataConfig, is_url, spec_options
from sparsefold.datasets.images import (
    builtin_skimage_dir,
    default_cache_dir,
    list_images,
    resolve_image_dir,
    split_builtin,
)
from sparsefold.datasets.shards import expand_urls, read_index, write_shards

__all__ = ["cache_root", "skipped_while_sharding", "train_urls", "val_files"]


def cache_root(data: DataConfig) -> Path:
    """``data.cache_dir``, or :func:`default_cache_dir` when it is empty."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:10]


def _shards_once(files: list[Path], out: Path, shard_size: int, gray: bool) -> list[str]:
    """Write ``files`` into shards at ``out`` unless a complete write (index.json) is there."""
    if not (out / "index.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            write_shards(files, tmp, shard_size=shard_size, gray=gray, prefix="train")
            if out.exists() and not (out / "index.json").is_file():
                shutil.rmtree(out, ignore_errors=True)  # leftover of an interrupted build
            try:
                tmp.rename(out)
            except OSError:  # another rank finished first
                if not (out / "index.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _report_skipped(out)
    return expand_urls(str(out), allow_pipe=False)


def _report_skipped(out: Path) -> None:
    """Say on stderr how many images of the folder were skipped while sharding (from its index.json)."""
    index = read_index(out)
    skipped = index.get("skipped", [])
    if skipped:
        total = index["total"] + len(skipped)
        print(f"[sparsefold] data.train: {len(skipped)} of {total} images skipped as unreadable while sharding "
              f"(first: {skipped[0]['reason']}); all are listed in {out / 'index.json'}", file=sys.stderr)


def skipped_while_sharding(urls: list[str]) -> int:
    """How many images were left out as unreadable when these shards were written: the ``skipped`` lists
    of the local shard folders' index.json (0 for remote shards and folders without an index). The
    trainer adds it to ``data/skipped``."""
    folders = {Path(u).parent for u in urls if not is_url(u) and not u.startswith("pipe:")}
    return sum(len(read_index(f).get("skipped", [])) for f in folders if (f / "index.json").is_file())


def _is_image_folder(spec: str) -> bool:
    p = Path(spec).expanduser()
    return (
        p.is_dir() and not (p / "index.json").is_file() and not any(p.glob("*.tar")) and bool(list_images(p))
    )


def train_urls(data: DataConfig) -> list[str]:
    """Absolute shard URLs for ``data.train`` (building shards in the cache when needed)."""
    mode = "gray" if data.gray else "rgb"
    if data.train == "builtin:skimage":
        folder = builtin_skimage_dir(cache_root(data), gray=data.gray)
        files = split_builtin(list_images(folder))[0]
        return _shards_once(files, cache_root(data) / "shards" / f"skimage-{mode}-s1", 1, data.gray)
    if _is_image_folder(data.train):
        folder = Path(data.train).expanduser().resolve()
        files = list_images(folder)
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", folder.name) or "images"
        out = cache_root(data) / "shards" / f"{name}-{_fingerprint(files)}-{mode}-s{data.shard_size}"
        return _shards_once(files, out, data.shard_size, data.gray)
    return expand_urls(data.train, allow_pipe=data.allow_pipe, name="data.train")


def val_files(data: DataConfig) -> list[Path]:
    """Sorted validation image files of ``data.val`` (for ``builtin:skimage``: the held-out photos
    of :func:`split_builtin`).  All of them; the caller applies ``data.val_images``.
    ``A|B`` names fallbacks: the first folder that exists is used (``data/set12|builtin:skimage``)."""
    options = spec_options(data.val)
    if options and options != [data.val]:  # fallbacks (or stray separators)
        for o in options[:-1]:
            if o == "builtin:skimage" or (Path(o).expanduser().is_dir() and list_images(Path(o).expanduser())):
                return val_files(replace(data, val=o))
        return val_files(replace(data, val=options[-1]))
    if data.val == "builtin:skimage":
        folder = builtin_skimage_dir(cache_root(data), gray=data.gray)
        return split_builtin(list_images(folder))[1]
    try:
        return list_images(resolve_image_dir(data.val, cache_root(data), gray=data.gray))
    except ValueError as e:
        raise ValueError(f"data.val: {e}") from None

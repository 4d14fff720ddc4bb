"""Streaming training reader: WebDataset shards -> seeded noisy/clean patch batches.

Per DataLoader worker, :class:`PatchStream` runs this ``wds.DataPipeline``::

    shard source -> tarfile_to_samples(counting handler) -> sample shuffle -> decode + crops +
    dihedral + noise -> [crop shuffle if crops_per_image > 1] -> batches (partial=False)

Shard source, ``resampled=False``: the shard list is shuffled with a seed of (seed, epoch) that is
the same on every rank, then split by *rank* (``[rank::world_size]``) and by DataLoader worker.  The
rank and world size are the ones passed to the constructor, NOT webdataset's ``split_by_node``
(which reads ``RANK``/``WORLD_SIZE`` from the environment or ``torch.distributed`` inside the worker
and silently sees world size 1 in spawned workers without those variables).  So each epoch is an
exact partition of the shards over ranks x workers, with a new assignment every epoch; each worker
drops its last partial batch.  ``resampled=True``: each (rank, worker) draws shards with
replacement from its own seeded stream (infinite; bound epochs with ``data.epoch_batches``).

All randomness (shard order, sample shuffle, crops, flips, noise) is seeded by
``stable_seed(seed, rank, worker, epoch)``, so a run is reproducible for a fixed worker count.
A corrupt tar member, an unreadable shard or an undecodable image is skipped, counted in the next
batch's ``skipped`` field, and logged once per worker.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sparsefold.config import DataConfig, NoiseConfig, TaskConfig
from sparsefold.datasets.degrade import degrade, join, split
from sparsefold.datasets.noise import add_noise
from sparsefold.datasets.patches import decode_image, random_crops, stable_seed
from sparsefold.datasets.shards import ensure_url_schemes

__all__ = ["PatchStream", "check_shard_count", "iterate_forever", "make_loader"]

log = logging.getLogger(__name__)
Batch = dict[str, Any]


class PatchStream(IterableDataset):
    """Seeded stream of ``{"noisy", "clean", "sigma", "skipped", "keys"}`` batches (see module doc)."""

    def __init__(
        self,
        urls: list[str],
        data: DataConfig,
        noise: NoiseConfig,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        task: TaskConfig | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("data.train: empty shard list")
        if not 0 <= rank < world_size:
            raise ValueError(f"PatchStream: rank {rank} outside world size {world_size}")
        self.urls, self.data, self.noise = list(urls), data, noise
        self.task = task or TaskConfig()  # not denoising: batches also carry "op" (datasets/degrade.py)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.skipped_total = 0  # skipped in this process (a worker's copy counts its own)
        self._skipped = 0  # skipped since the last yielded batch
        self._bad_streak = 0  # consecutive failures without a good sample (resampled guard)
        self._warned = False
        self._shard_failed = False  # the current shard already counted a tar error

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: changes the shard order and all seeds (call before iterating)."""
        self.epoch = int(epoch)

    def shard_urls(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """Shards read by DataLoader worker ``worker`` of this rank in the current epoch
        (``resampled=False``)."""
        order = list(self.urls)
        random.Random(stable_seed("shards", self.seed, self.epoch)).shuffle(order)
        return order[self.rank :: self.world_size][worker :: max(1, num_workers)]

    def _resampled_urls(self, rng: random.Random) -> Iterator[dict[str, str]]:
        while True:
            yield {"url": rng.choice(self.urls)}

    def _count(self, exn: BaseException) -> None:
        """Count one skipped sample/shard, warn once, raise if nothing at all is readable."""
        self._skipped += 1
        self.skipped_total += 1
        self._bad_streak += 1
        if not self._warned:
            self._warned = True
            log.warning("data: skipping unreadable sample/shard (counted in batch['skipped']): %r", exn)
        if self._bad_streak > max(100, 10 * len(self.urls)):
            raise RuntimeError(
                f"data.train: {self._bad_streak} consecutive unreadable samples; last: {exn!r}"
            )

    def _on_tar_error(self, exn: BaseException) -> bool:
        """webdataset handler (open/tar/grouping errors): count at most once per shard, keep going.

        A truncated tar raises twice (member read, then next header); only the first is counted.
        """
        if not self._shard_failed:
            self._shard_failed = True
            self._count(exn)
        return True

    def _track_shards(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        for s in shards:
            self._shard_failed = False
            yield s

    def _patches(self, samples: Iterable[dict], gen: torch.Generator) -> Iterator[dict]:
        d = self.data
        for sample in samples:
            try:
                img = decode_image(sample, gray=d.gray)
            except Exception as exn:  # noqa: BLE001  (any undecodable bytes or missing field is skipped)
                self._count(exn)
                continue
            self._bad_streak = 0
            clean = random_crops(img, d.crops_per_image, d.patch_size, gen)
            if self.task.kind == "denoise":
                noisy, sigma = add_noise(clean, self.noise, gen)
                for k in range(clean.shape[0]):
                    yield {"clean": clean[k], "noisy": noisy[k], "sigma": sigma[k], "key": sample["__key__"]}
                continue
            noisy, sigma, op = degrade(clean, self.task, self.noise, gen)  # y = A x + n, op drawn per crop
            for k, params in enumerate(split(op, len(clean))):
                yield {"clean": clean[k], "noisy": noisy[k], "sigma": sigma[k], "key": sample["__key__"],
                       "op": (op.name, params)}

    def _batches(self, items: Iterable[dict]) -> Iterator[Batch]:
        bs = self.data.batch_size
        while True:
            chunk = list(itertools.islice(items, bs))
            if len(chunk) < bs:  # partial=False: drop the remainder
                break
            skipped, self._skipped = self._skipped, 0
            batch = {
                "noisy": torch.stack([c["noisy"] for c in chunk]),
                "clean": torch.stack([c["clean"] for c in chunk]),
                "sigma": torch.stack([c["sigma"] for c in chunk]),
                "skipped": skipped,
                "keys": [c["key"] for c in chunk],
            }
            if "op" in chunk[0]:  # a restoration task: the operator of each sample, as one batch operator
                name = chunk[0]["op"][0]
                batch["op"] = (name, join(name, [c["op"][1] for c in chunk]))
            yield batch
        if self._skipped and get_worker_info() is not None:
            log.warning(
                "data: %d skipped samples after this worker's last batch (not in any batch)", self._skipped
            )

    def __iter__(self) -> Iterator[Batch]:
        import webdataset as wds

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ensure_url_schemes(self.urls)
        seed = stable_seed(self.seed, self.rank, worker, self.epoch)
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        if self.data.resampled:
            shards = self._resampled_urls(random.Random(stable_seed("resample", seed)))
        else:
            shards = iter([{"url": u} for u in self.shard_urls(worker, num_workers)])
        buf = self.data.shuffle_buffer
        shuffle = (lambda: wds.shuffle(buf, initial=buf, rng=rng)) if buf > 1 else (lambda: None)
        pipeline = wds.DataPipeline(  # a list argument would be spliced into stages: pass a callable
            lambda: self._track_shards(shards),
            wds.tarfile_to_samples(handler=self._on_tar_error),
            shuffle(),
            lambda samples: self._patches(samples, gen),
            shuffle() if self.data.crops_per_image > 1 else None,
            self._batches,
        )
        return iter(pipeline)


def check_shard_count(urls: list[str], world_size: int, num_workers: int, resampled: bool = False) -> None:
    """Raise a one-line ValueError when some (rank, worker) would get no shard (``resampled=False``)."""
    need = world_size * max(1, num_workers)
    if not resampled and len(urls) < need:
        raise ValueError(
            f"data.train: {len(urls)} shards < ranks × workers ({world_size} × {max(1, num_workers)}); "
            "write more shards with `sparsefold shards --shard-size ...` or lower data.num_workers"
        )


class _EpochLoader:
    """A DataLoader cut to exactly ``n`` batches per epoch (for infinite resampled streams)."""

    def __init__(self, loader: DataLoader, n: int) -> None:
        self.loader, self.n, self.dataset = loader, n, loader.dataset

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        try:
            yield from itertools.islice(it, self.n)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_loader(ds: PatchStream, data: DataConfig) -> Iterable[Batch]:
    """DataLoader over ``ds`` (batches come pre-built: ``batch_size=None``, non-persistent workers so
    :meth:`PatchStream.set_epoch` reaches them).  With ``data.resampled`` and ``data.epoch_batches > 0``
    each epoch is exactly ``epoch_batches`` batches on every rank (equal counts for DDP)."""
    loader = DataLoader(
        ds, batch_size=None, num_workers=data.num_workers, persistent_workers=False, pin_memory=False
    )
    if data.resampled and data.epoch_batches > 0:
        return _EpochLoader(loader, data.epoch_batches)
    return loader


def iterate_forever(ds: PatchStream, loader: Iterable[Batch], start_epoch: int = 0) -> Iterator[Batch]:
    """Batches over epochs ``start_epoch, start_epoch + 1, ...`` (``ds.set_epoch`` before each), for
    step-based trainers.  Raises RuntimeError if an epoch yields no batch (instead of spinning)."""
    epoch = start_epoch
    while True:
        ds.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(
                f"data.train: epoch {epoch} produced no batch on rank {ds.rank}; "
                "need more images per rank × worker than data.batch_size"
            )
        epoch += 1

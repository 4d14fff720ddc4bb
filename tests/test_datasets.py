"""Tests of sparsefold.datasets: noise, images, shards, URL specs and the patch stream (CPU, fast)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsefold.config import DataConfig, NoiseConfig
from sparsefold.datasets import (
    PatchStream,
    add_noise,
    check_shard_count,
    dihedral,
    expand_urls,
    gaussian_eval_noise,
    iterate_forever,
    list_images,
    load_image,
    make_loader,
    random_crops,
    read_index,
    register_fsspec_schemes,
    resolve_image_dir,
    save_image,
    split_builtin,
    train_urls,
    write_shards,
)

N_IMAGES, H, W = 40, 40, 48


def make_images(folder: Path, n: int = N_IMAGES, rgb: bool = False) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        arr = rng.integers(0, 256, (H, W, 3) if rgb else (H, W), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img.{i:02d}.png")  # a dot in the stem: keys must drop it
        arrays.append(arr)
    return arrays


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("shards")
    arrays = make_images(root / "img")
    pattern = write_shards(root / "img", root / "sh", shard_size=5)
    return root, pattern, arrays


def read_samples(urls: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def cfg(**kw) -> DataConfig:
    base = {"patch_size": 16, "batch_size": 5, "num_workers": 0, "shuffle_buffer": 8, "crops_per_image": 1}
    return DataConfig(**{**base, **kw})


def epoch_keys(ds: PatchStream, data: DataConfig, epoch: int) -> list[str]:
    ds.set_epoch(epoch)
    return [k for b in make_loader(ds, data) for k in b["keys"]]


# ----------------------------------------------------------------------------------------- shards
def test_shard_roundtrip(shard_dir):
    root, pattern, arrays = shard_dir
    assert pattern == f"{(root / 'sh').resolve()}/train-{{000000..000007}}.tar"
    index = read_index(root / "sh")
    assert index == {
        "pattern": "train-{000000..000007}.tar",
        "shards": [f"train-{i:06d}.tar" for i in range(8)],
        "counts": [5] * 8,
        "total": 40,
        "gray": True,
    }
    samples = read_samples(expand_urls(pattern, allow_pipe=False))
    assert len(samples) == N_IMAGES
    for i, s in enumerate(samples):
        assert s["__key__"] == f"img_{i:02d}-{i:06d}" and "." not in s["__key__"]
        meta = json.loads(s["json"])
        assert meta == {"source": f"img.{i:02d}.png", "height": H, "width": W, "mode": "L"}
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), arrays[i])


def test_rgb_shards_and_load_save(tmp_path):
    arrays = make_images(tmp_path / "img", n=3, rgb=True)
    write_shards(list_images(tmp_path / "img"), tmp_path / "sh", shard_size=2, gray=False, prefix="val")
    index = read_index(tmp_path / "sh")
    assert index["counts"] == [2, 1] and index["gray"] is False and index["shards"][0] == "val-000000.tar"
    s = read_samples(expand_urls(str(tmp_path / "sh"), False))[2]
    assert json.loads(s["json"])["mode"] == "RGB"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), arrays[2])
    x = load_image(tmp_path / "img" / "img.00.png", gray=False)
    assert x.shape == (3, H, W) and x.dtype == torch.float32
    save_image(x, tmp_path / "out.png")
    assert torch.equal(load_image(tmp_path / "out.png", gray=False), x)
    assert load_image(tmp_path / "out.png").shape == (1, H, W)


# ------------------------------------------------------------------------------------ url specs
def test_expand_urls_forms(shard_dir, tmp_path):
    root, pattern, _ = shard_dir
    shards = expand_urls(pattern, False)
    assert len(shards) == 8 and all(Path(s).is_absolute() for s in shards)
    assert expand_urls(str(root / "sh"), False) == shards
    assert expand_urls("file://" + pattern, False) == shards
    assert expand_urls(f"{shards[0]},{shards[1]}::{shards[2]}", False) == shards[:3]
    assert expand_urls("s3://bucket/a-{0..2}.tar", False) == [f"s3://bucket/a-{i}.tar" for i in range(3)]
    assert expand_urls("https://h/x-{a,b}.tar", False) == ["https://h/x-a.tar", "https://h/x-b.tar"]
    with pytest.raises(ValueError, match=r"shard not found: .*train-000008.tar \(2 of 10 missing\)"):
        expand_urls(str(root / "sh" / "train-{000000..000009}.tar"), False)
    with pytest.raises(ValueError, match="no shards"):
        expand_urls(" , ", False)
    with pytest.raises(ValueError, match="unsupported URL scheme 'nope'"):
        expand_urls("nope://x.tar", False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no index.json and no .tar"):
        expand_urls(str(tmp_path / "empty"), False)


def test_pipe_refused_unless_allowed():
    with pytest.raises(ValueError, match="set data.allow_pipe=true") as err:
        expand_urls("pipe:cat /x/train-{0..1}.tar", allow_pipe=False)
    assert "\n" not in str(err.value)
    assert expand_urls("pipe:cat /x/train-{0..1}.tar", allow_pipe=True) == [
        "pipe:cat /x/train-0.tar",
        "pipe:cat /x/train-1.tar",
    ]


def test_fsspec_memory_scheme(shard_dir):
    import fsspec

    _, pattern, _ = shard_dir
    fs = fsspec.filesystem("memory")
    for i, path in enumerate(expand_urls(pattern, False)[:2]):
        fs.pipe(f"/sfbucket/train-{i:06d}.tar", Path(path).read_bytes())
    assert register_fsspec_schemes(["memory"]) == ["memory"]
    assert register_fsspec_schemes(["memory"]) == ["memory"]  # idempotent
    urls = expand_urls("memory://sfbucket/train-{000000..000001}.tar", False)
    assert len(read_samples(urls)) == 10
    data = cfg()
    keys = [k for b in PatchStream(urls, data, NoiseConfig(), seed=0) for k in b["keys"]]
    assert sorted(keys) == [f"img_{i:02d}-{i:06d}" for i in range(10)]


def test_check_shard_count():
    urls = [f"s{i}.tar" for i in range(3)]
    with pytest.raises(
        ValueError, match=r"data.train: 3 shards < ranks × workers \(2 × 2\); write more shards"
    ):
        check_shard_count(urls, world_size=2, num_workers=2)
    check_shard_count(urls, world_size=2, num_workers=2, resampled=True)
    check_shard_count(urls, world_size=3, num_workers=0)


# --------------------------------------------------------------------------------------- stream
def test_rank_worker_partition_two_epochs(shard_dir):
    _, pattern, _ = shard_dir
    urls = expand_urls(pattern, False)
    data = cfg(num_workers=2)  # 8 shards over 2 ranks x 2 workers: 10 samples = 2 batches per worker
    full = {f"img_{i:02d}-{i:06d}" for i in range(N_IMAGES)}
    per_rank_sets = []
    for epoch in range(2):
        keys = []
        for rank in range(2):
            ds = PatchStream(urls, data, NoiseConfig(), seed=3, rank=rank, world_size=2)
            rank_keys = epoch_keys(ds, data, epoch)
            assert len(rank_keys) == 20
            per_rank_sets.append(set(rank_keys))
            keys += rank_keys
        assert len(keys) == len(set(keys)) == N_IMAGES and set(keys) == full
    assert per_rank_sets[0] != per_rank_sets[2]  # shard assignment changes with the epoch


def test_determinism_and_batch_format(shard_dir):
    _, pattern, _ = shard_dir
    urls = expand_urls(pattern, False)
    data = cfg(crops_per_image=2)
    noise = NoiseConfig(sigma=10, sigma_max=40)

    def run(seed: int, epoch: int = 0) -> list[dict]:
        ds = PatchStream(urls, data, noise, seed=seed)
        ds.set_epoch(epoch)
        return list(make_loader(ds, data))

    a, b = run(0), run(0)
    assert len(a) == 16  # 40 images x 2 crops / 5
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["skipped"] == 0
        for k in ("noisy", "clean", "sigma"):
            assert torch.equal(x[k], y[k])
    batch = a[0]
    assert batch["noisy"].shape == batch["clean"].shape == (5, 1, 16, 16) and batch["sigma"].shape == (5,)
    assert batch["noisy"].dtype == torch.float32 and ((batch["sigma"] >= 10) & (batch["sigma"] <= 40)).all()
    assert 0 <= batch["clean"].min() and batch["clean"].max() <= 1
    assert not torch.equal(run(1)[0]["clean"], a[0]["clean"])
    assert not torch.equal(run(0, epoch=1)[0]["clean"], a[0]["clean"])


def test_corrupt_member_and_truncated_tar_are_skipped(tmp_path, caplog):
    make_images(tmp_path / "img", n=10)
    write_shards(tmp_path / "img", tmp_path / "good", shard_size=5)
    good = expand_urls(str(tmp_path / "good"), False)
    bad = tmp_path / "bad-member.tar"  # 3 samples, the middle png is garbage
    with tarfile.open(bad, "w") as tar:
        for i, payload in enumerate(
            [
                Path(tmp_path / "img" / "img.00.png").read_bytes(),
                b"garbage!" * 9,
                Path(tmp_path / "img" / "img.01.png").read_bytes(),
            ]
        ):
            info = tarfile.TarInfo(f"bad{i}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    raw = Path(good[1]).read_bytes()
    trunc = tmp_path / "truncated.tar"
    trunc.write_bytes(raw[: len(raw) // 2 + 100])  # cut inside a member
    data = cfg(batch_size=1, shuffle_buffer=0)
    ds = PatchStream([good[0], str(bad), str(trunc)], data, NoiseConfig(), seed=0)
    with caplog.at_level(logging.WARNING, logger="sparsefold.datasets.stream"):
        first = list(make_loader(ds, data))
        second = list(make_loader(ds, data))  # num_workers=0: unreported skips carry over
    keys = {k for b in first for k in b["keys"]}
    assert {f"img_{i:02d}-{i:06d}" for i in range(5)} <= keys and {"bad0", "bad2"} <= keys
    assert "bad1" not in keys
    # skipped: garbage png (1) + truncated tar error (1) + the sample cut in half (1)
    assert ds.skipped_total == 2 * 3
    assert sum(b["skipped"] for b in first + second) + ds._skipped == 6
    assert sum("skipping unreadable" in r.message for r in caplog.records) == 1  # once per worker


def test_resampled_epoch_batches_and_forever(shard_dir):
    _, pattern, _ = shard_dir
    urls = expand_urls(pattern, False)
    data = cfg(resampled=True, epoch_batches=3, num_workers=1)
    ds = PatchStream(urls, data, NoiseConfig(kind="poisson", peak=8.0), seed=0, rank=1, world_size=2)
    loader = make_loader(ds, data)
    assert len(loader) == 3 and len(list(loader)) == 3
    it = iterate_forever(ds, loader, start_epoch=5)
    batches = [next(it) for _ in range(7)]  # crosses two epoch boundaries
    assert ds.epoch == 7 and all(b["noisy"].shape == (5, 1, 16, 16) for b in batches)
    assert all(torch.equal(b["sigma"], torch.zeros(5)) for b in batches)


def test_iterate_forever_refuses_empty_epochs(shard_dir):
    _, pattern, _ = shard_dir
    data = cfg(batch_size=6)  # one shard of 5 images never fills a batch
    ds = PatchStream(expand_urls(pattern, False)[:1], data, NoiseConfig(), seed=0)
    with pytest.raises(RuntimeError, match="produced no batch"):
        next(iterate_forever(ds, make_loader(ds, data)))


def test_crops_pad_small_images_and_dihedral():
    g = torch.Generator().manual_seed(0)
    img = np.arange(10 * 12, dtype=np.uint8).reshape(10, 12, 1)
    crops = random_crops(img, 4, 16, g)
    assert crops.shape == (4, 1, 16, 16) and crops.dtype == torch.float32
    x = torch.arange(9.0).view(1, 3, 3)
    outs = {tuple(dihedral(x, d).flatten().tolist()) for d in range(8)}
    assert len(outs) == 8


# ---------------------------------------------------------------------------------------- noise
def test_gaussian_noise_statistics():
    g = torch.Generator().manual_seed(0)
    clean = torch.full((4, 1, 64, 64), 0.9)
    noisy, sigma = add_noise(clean, NoiseConfig(sigma=25), g)
    assert noisy.dtype == torch.float32 and torch.equal(sigma, torch.full((4,), 25.0))
    assert abs((noisy - clean).std().item() - 25 / 255) < 0.003 and noisy.max() > 1  # not clipped
    noisy, sigma = add_noise(clean, NoiseConfig(sigma=5, sigma_max=50), g)
    assert ((sigma >= 5) & (sigma <= 50)).all() and sigma.unique().numel() == 4
    for i in range(4):
        assert abs((noisy[i] - clean[i]).std().item() - sigma[i].item() / 255) < 0.15 * sigma[i].item() / 255
    single, s1 = add_noise(clean[0], NoiseConfig(), g)
    assert single.shape == (1, 64, 64) and s1.shape == (1,)


def test_poisson_and_binomial_noise():
    g = torch.Generator().manual_seed(0)
    clean = torch.full((2, 1, 100, 100), 0.3)
    noisy, sigma = add_noise(clean, NoiseConfig(kind="poisson", peak=10.0), g)
    counts = noisy * 10
    assert torch.equal(sigma, torch.zeros(2)) and torch.allclose(counts, counts.round(), atol=1e-4)
    assert abs(counts.mean().item() - 3.0) < 0.1 and abs(counts.var().item() - 3.0) < 0.2
    noisy, _ = add_noise(clean, NoiseConfig(kind="binomial", trials=4), g)
    assert torch.allclose(noisy * 4, (noisy * 4).round()) and noisy.min() >= 0 and noisy.max() <= 1
    assert abs(noisy.mean().item() - 0.3) < 0.01
    assert abs((noisy * 4).var().item() - 4 * 0.3 * 0.7) < 0.05
    a, _ = add_noise(clean, NoiseConfig(kind="binomial", trials=3), torch.Generator().manual_seed(1))
    b, _ = add_noise(clean, NoiseConfig(kind="binomial", trials=3), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_eval_noise_convention():
    imgs = [torch.rand(1, 8, 9), torch.rand(1, 5, 4)]
    out = gaussian_eval_noise(imgs, sigma=25)
    g = torch.Generator().manual_seed(0)
    n0 = torch.randn(1, 8, 9, generator=g)
    n1 = torch.randn(1, 5, 4, generator=g)
    assert torch.equal(out[0], imgs[0] + 25 / 255 * n0) and torch.equal(out[1], imgs[1] + 25 / 255 * n1)
    assert not torch.equal(gaussian_eval_noise(imgs[::-1], sigma=25)[0], out[1])  # order matters
    assert torch.equal(gaussian_eval_noise(imgs, 25)[1], out[1])


# --------------------------------------------------------------------------------- image folders
def test_resolve_image_dir_and_builtin_split(tmp_path):
    with pytest.raises(ValueError, match="no such image folder"):
        resolve_image_dir(tmp_path / "missing", tmp_path)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        resolve_image_dir(tmp_path / "txt", tmp_path)
    files = [Path(f"/c/{n}.png") for n in ("moon", "camera", "coins", "brick", "astronaut")]
    train, val = split_builtin(files)
    assert [p.stem for p in val] == ["astronaut", "camera", "coins"]
    assert [p.stem for p in train] == ["brick", "moon"]


def test_builtin_skimage_and_train_urls(tmp_path):
    folder = resolve_image_dir("builtin:skimage", tmp_path)
    assert folder == (tmp_path / "skimage-gray").resolve() and len(list_images(folder)) == 16
    assert load_image(folder / "camera.png").shape == (1, 512, 512)
    data = DataConfig(cache_dir=str(tmp_path))
    urls = train_urls(data)
    assert len(urls) == 13 and train_urls(data) == urls  # built once, reused
    make_images(tmp_path / "mine", n=7)
    mine = train_urls(DataConfig(train=str(tmp_path / "mine"), cache_dir=str(tmp_path), shard_size=3))
    assert len(mine) == 3 and all(u.startswith(str(tmp_path.resolve() / "shards")) for u in mine)

"""Data loader throughput against the model's consumption: is the training loop ever waiting for data?

    python benchmarks/bench_loader.py --data ../shared/data/bsd432 --out benchmarks/results/loader_throughput.json

Loader: ``PatchStream`` + ``make_loader`` exactly as the trainer builds them (WebDataset shards of the image
folder, built once into --cache-dir; sample shuffle; ``--crops`` random crops per decoded image, the 8
flips/rotations, Gaussian noise σ=--sigma drawn per patch), for every patch size × loader workers; samples/s
(one sample = one noisy/clean patch pair) over --batches batches after the first one (time to the first
batch, i.e. worker start-up and shuffle-buffer fill, is reported separately), and for 0 workers the samples
per CPU-second of the process.

Model consumption: one Adam step (forward, MSE, backward, step) on a random noisy/clean batch of the
model's training shape, median of --model-steps after 1 warm-up, for the quickstart CSCNet
(sparsefold/configs/quickstart.yaml: T=10, 64 filters 7×7, stride 2, 8 × 64² patches) and the paper's
CSCNet (T=12, 175 filters 11×11, stride 8, 4 × 128² patches); samples/s = batch / step time, with
--threads intra-op threads (the per-worker budget of a DDP worker).

Ratio = loader samples/s at the model's patch size / model samples/s; the goal is >= 10 (the loader never
limits training). With 0 loader workers the loader shares the trainer's core, so that column is the
conservative one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

MODELS = {  # name -> (overrides on the packaged quickstart / on the defaults, source)
    "quickstart": "quickstart",
    "paper": ["data.patch_size=128", "data.batch_size=4"],  # CSCNetConfig defaults = the paper's σ=25 model
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/bsd432", help="training image folder (or a shard spec)")
    p.add_argument("--cache-dir", default="", help="where shards of an image folder are built (default: ~/.cache/sparsefold)")
    p.add_argument("--patch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    p.add_argument("--batch", type=int, default=16, help="loader batch size")
    p.add_argument("--crops", type=int, default=4, help="crops per decoded image (data.crops_per_image)")
    p.add_argument("--shard-size", type=int, default=36, help="images per shard when sharding a folder")
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--batches", type=int, default=60, help="timed loader batches per setting (after the first)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--model-steps", type=int, default=5, help="timed Adam steps per model (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the model steps")
    p.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    return p.parse_args(argv)


def bench_loader(urls: list[str], data: Any, noise: Any, batches: int) -> dict[str, Any]:
    from sparsefold.datasets import PatchStream, iterate_forever, make_loader

    ds = PatchStream(urls, data, noise, seed=0)
    t0 = time.perf_counter()
    it = iterate_forever(ds, make_loader(ds, data))
    next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    skipped = 0
    for _ in range(batches):
        skipped += int(next(it)["skipped"])
    t2, c2 = time.perf_counter(), time.process_time()
    it.close()
    n = batches * data.batch_size
    out = {"patch": data.patch_size, "workers": data.num_workers, "batch": data.batch_size,
           "crops_per_image": data.crops_per_image, "samples": n, "first_batch_s": round(t1 - t0, 3),
           "seconds": round(t2 - t1, 3), "samples_per_s": round(n / (t2 - t1), 1), "skipped": skipped}
    if data.num_workers == 0:  # all the work is in this process: its CPU time is the loader's
        out["samples_per_cpu_s"] = round(n / max(c2 - c1, 1e-9), 1)
    return out


def bench_model(name: str, steps: int) -> dict[str, Any]:
    import torch

    from sparsefold.config import load_config, load_run_config, to_dict
    from sparsefold.models import build_model, count_parameters

    spec = MODELS[name]
    cfg = load_run_config(None, []) if spec == "quickstart" else load_config(None, list(spec))
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b, p = cfg.data.batch_size, cfg.data.patch_size
    clean = torch.rand(b, cfg.model.channels, p, p, generator=g)
    noisy = clean + cfg.noise.sigma / 255 * torch.randn(clean.shape, generator=g)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(noisy), clean).backward()
        opt.step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"model": name, "config": to_dict(cfg.model), "params": count_parameters(model), "patch": p,
            "batch": b, "threads": torch.get_num_threads(), "step_s_median": round(step, 4),
            "step_s_all": [round(t, 4) for t in times], "samples_per_s": round(b / step, 2)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    load_start = os.getloadavg()
    from sparsefold.runtime import configure_cpu_allocator

    configure_cpu_allocator()
    import torch

    from sparsefold.config import DataConfig, NoiseConfig
    from sparsefold.datasets import train_urls

    cache = a.cache_dir or ""
    base = DataConfig(train=a.data, shard_size=a.shard_size, cache_dir=cache, crops_per_image=a.crops,
                      batch_size=a.batch, shuffle_buffer=256)
    t0 = time.perf_counter()
    urls = train_urls(base)  # builds the shards once (cached)
    shards_s = time.perf_counter() - t0
    print(f"{len(urls)} shards ({shards_s:.1f} s to list/build)", file=sys.stderr)
    noise = NoiseConfig(sigma=a.sigma)

    loader = []
    torch.set_num_threads(1)  # the loader itself is single-threaded per process; keep torch from spreading
    for patch in a.patch:
        for workers in a.workers:
            data = dataclasses.replace(base, patch_size=patch, num_workers=workers)
            row = bench_loader(urls, data, noise, a.batches)
            loader.append(row)
            print(f"loader patch {patch:>3} workers {workers}: {row['samples_per_s']:>8.1f} samples/s "
                  f"(first batch {row['first_batch_s']:.2f} s)", file=sys.stderr)

    torch.set_num_threads(a.threads)
    models = []
    for name in a.models:
        row = bench_model(name, a.model_steps)
        models.append(row)
        print(f"model {name:<10} {row['batch']} x {row['patch']}²: {row['step_s_median']:.3f} s/step = "
              f"{row['samples_per_s']:.1f} samples/s ({row['threads']} threads)", file=sys.stderr)

    ratios = []
    for m in models:
        for row in (r for r in loader if r["patch"] == m["patch"]):
            ratios.append({"model": m["model"], "patch": m["patch"], "workers": row["workers"],
                           "loader_over_model": round(row["samples_per_s"] / m["samples_per_s"], 1)})
            print(f"ratio {m['model']:<10} workers {row['workers']}: {ratios[-1]['loader_over_model']:>8.1f}x "
                  "(goal >= 10x)", file=sys.stderr)
    load_end = os.getloadavg()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": cpu_name(), "cpus": os.cpu_count(),
        "loadavg_start": list(load_start), "loadavg_end": list(load_end), "args": vars(a),
        "shards": {"count": len(urls), "list_or_build_s": round(shards_s, 2)},
        "loader": loader, "model": models, "ratio": ratios,
        "goal": "loader_over_model >= 10 at the model's patch size",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average: start {load_start[0]:.2f} / end {load_end[0]:.2f} on {os.cpu_count()} CPUs "
          "(> ~0.5 at the start means contended numbers)", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

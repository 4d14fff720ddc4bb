"""Quality vs compute of one training run: score every checkpoint of a run directory on a test folder
(BSD68 by default, the shared convention: seed 0, sorted files, clipped output, PSNR peak 1) and plot
PSNR against CPU-minutes.

    python benchmarks/training_curve.py RUN_DIR [--data ../shared/data/bsd68] [--every 2] \\
        [--cores 2] [--out benchmarks/results/cscnet_bsd432_curve]

CPU-minutes: ``state.json``'s ``cpu_seconds`` (process + loader-worker CPU time) when present, else
wall seconds × ``--cores`` (an upper bound: the whole machine for the whole run) — used for all points
unless every checkpoint has ``cpu_seconds``.
Writes OUT.json (rows) and OUT.png (the curve).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsefold.config import NoiseConfig
from sparsefold.datasets import list_images
from sparsefold.runtime import configure_cpu_allocator
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import evaluate_images
from sparsefold.trainers.storage import checkpoint_dirs, checkpoint_step, is_complete


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/bsd68"))
    ap.add_argument("--sigma", type=float, default=25.0)
    ap.add_argument("--every", type=int, default=1, help="score every N-th checkpoint (the last always)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/training_curve"))
    ap.add_argument("--replot", action="store_true", help="only redraw OUT.png from OUT.json (no scoring)")
    ap.add_argument("--goal", type=float, default=None, help="a target PSNR drawn as a line (e.g. 28.90)")
    a = ap.parse_args()
    name = json.loads((a.run_dir / "config.json").read_text())["model"]["name"]  # the run's config
    if a.replot:
        plot(json.loads(a.out.with_suffix(".json").read_text())["rows"], a, name)
        return
    configure_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpts = sorted((p for p in checkpoint_dirs(a.run_dir) if is_complete(p)), key=checkpoint_step)
    ckpts = [c for i, c in enumerate(ckpts) if i % a.every == a.every - 1 or c == ckpts[-1]]
    files = list_images(a.data)
    # Measured CPU time only when every checkpoint carries it from the run's start (older ones did not).
    measured = all("cpu_seconds" in json.loads((c / "state.json").read_text()) for c in ckpts)
    rows = []
    for c in ckpts:
        model, meta = load_model(c)
        st = meta["state"]
        cpu_s = st["cpu_seconds"] if measured else st["seconds"] * a.cores
        t0 = time.perf_counter()
        res = evaluate_images(model, files, NoiseConfig(sigma=a.sigma), with_ssim=True)
        rows.append({"step": st["step"], "wall_min": st["seconds"] / 60, "cpu_min": cpu_s / 60,
                     "cpu_min_measured": measured, "psnr": res["psnr"], "ssim": res["ssim"],
                     "images": res["images"], "checkpoint": str(c), "eval_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"data": str(a.data), "sigma": a.sigma, "model": name,
                                                      "rows": rows}, indent=1))
    plot(rows, a, name)


def plot(rows: list[dict], a: argparse.Namespace, name: str) -> None:
    """PSNR against CPU-minutes, with BM3D, DnCNN-S (published weights) and ``--goal`` for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["cpu_min"] for r in rows], [r["psnr"] for r in rows], "o-", label=f"{name} (this run)")
    ax.axhline(28.62, color="gray", ls="--", label="BM3D 28.62")
    ax.axhline(29.23, color="black", ls="-.", label="DnCNN-S (published) 29.23")
    if a.goal is not None:
        ax.axhline(a.goal, color="red", ls=":", label=f"goal {a.goal:.2f}")
    ax.set_xlabel("CPU-minutes")
    ax.set_ylabel(f"{a.data.name} PSNR (dB), σ={a.sigma:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

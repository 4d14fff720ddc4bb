"""Peak RSS and seconds of ``sparsefold denoise`` vs image size: tiled (default --max-memory) vs whole image.

Every measurement is one fresh process running ``sparsefold denoise MODEL in.png out.png``, run alone; its
peak RSS is the ``VmHWM`` it reads from /proc/self/status as it exits (not ``ru_maxrss``: Linux carries the
parent's RSS at fork over into the child's), its wall and CPU (user + system, ``os.wait4``) seconds.
"whole" is the same command with ``--max-memory 1T`` (the path before tiling); it runs only where the memory
model (``trainers/tiling.footprint``) predicts it fits ``--whole-limit`` (default 8 GB) and is recorded as
"skipped" beyond, rather than swapping the machine. ``baseline`` is the peak RSS of the same command on a
64² image (Python, torch, the model), so ``peak − baseline`` is what the image costs. Where both ran, the
two output PNGs are compared (max abs difference in 8-bit levels).

The test image: BSD68 test001 (or scikit-image's camera without ../shared) resized bicubically to N
megapixels, plus Gaussian noise σ=25 (seed 0), saved as an 8-bit PNG. Results are merged into
``benchmarks/results/memory.json`` (one entry per model and size; rerun parts with ``--models``/``--sizes``)
and printed as a Markdown table::

    python benchmarks/bench_memory.py --models cscnet --sizes 1 4 16
    python benchmarks/bench_memory.py --sizes 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory.json"
SOURCE = ROOT.parent / "shared" / "data" / "bsd68" / "test001.png"
MB = 1 << 20
CHILD = ("import sys\nfrom sparsefold.cli import main\ncode = main(sys.argv[1:])\n"
         "hwm = next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
         "print('VmHWM', hwm, file=sys.stderr)\nsys.exit(code)")


def test_image(megapixels: float, folder: Path) -> Path:
    """The noisy σ=25 test image of ``megapixels`` (aspect of the source photo), written once."""
    path = folder / f"noisy_{megapixels:g}mp.png"
    if path.exists():
        return path
    if SOURCE.exists():
        src = Image.open(SOURCE).convert("L")
    else:
        from skimage import data

        src = Image.fromarray(data.camera())
    scale = (megapixels * 1e6 / (src.width * src.height)) ** 0.5
    big = np.asarray(src.resize((round(src.width * scale), round(src.height * scale)), Image.BICUBIC), np.float32)
    noisy = big + np.random.default_rng(0).normal(0.0, 25.0, big.shape).astype(np.float32)
    Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)).save(path)
    return path


def measure(model: str, src: Path, dst: Path, max_memory: str | None) -> dict:
    """One ``sparsefold denoise`` process: peak RSS (MB), wall and CPU seconds, exit code."""
    cmd = [sys.executable, "-c", CHILD, "denoise", model, str(src), str(dst), "--overwrite"]
    cmd += ["--max-memory", max_memory] if max_memory else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
    rc = os.waitstatus_to_exitcode(status)
    hwm = [int(line.split()[1]) for line in err if line.startswith("VmHWM")]
    err = [line for line in err if not line.startswith("VmHWM")]
    out = {"peak_rss_mb": round(hwm[-1] / 1024) if hwm else None, "wall_s": round(wall, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "rc": rc}
    if rc:
        out["error"] = err[-1] if err else ""
    return out


def predicted_whole_mb(model: str, pixels: int) -> float:
    """The memory model's peak working set of the whole-image forward (MB)."""
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.tiling import SLACK, footprint

    m, _ = load_model(model)
    fp = footprint(m.eval())
    return SLACK * (fp.fixed + fp.per_pixel * pixels) / MB


def max_abs_diff(a: Path, b: Path) -> int:
    return int(np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max())


def run(model: str, mp: float, folder: Path, whole_limit_mb: float) -> dict:
    """Baseline, tiled and (where it fits) whole-image runs of one model at one size."""
    src = test_image(mp, folder)
    pixels = Image.open(src).width * Image.open(src).height
    entry = {"model": model, "megapixels": mp, "pixels": pixels,
             "baseline": measure(model, test_image(64 * 64 / 1e6, folder), folder / "base.png", None),
             "tiled": measure(model, src, folder / "tiled.png", None)}
    need = predicted_whole_mb(model, pixels)
    if need > whole_limit_mb:
        entry["whole"] = {"skipped": f"predicted {need / 1024:.1f} GB > {whole_limit_mb / 1024:.0f} GB"}
    else:
        entry["whole"] = measure(model, src, folder / "whole.png", "1T")
        if entry["whole"]["rc"] == 0 and entry["tiled"]["rc"] == 0:
            entry["max_abs_diff_8bit"] = max_abs_diff(folder / "tiled.png", folder / "whole.png")
    return entry


def _cell(m: dict) -> str:
    if "skipped" in m:
        return "skipped"
    if m["rc"]:
        return f"failed (rc {m['rc']})"
    return f"{m['peak_rss_mb'] / 1024:.2f} GB, {m['wall_s']:.0f} s ({m['cpu_s']:.0f} CPU-s)"


def table(entries: list[dict]) -> str:
    rows = ["| model | MP | before: whole image | after: tiled (default budget) | baseline | 8-bit diff |",
            "|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: (e["model"], e["megapixels"])):
        rows.append(f"| {e['model']} | {e['megapixels']:g} | {_cell(e['whole'])} | {_cell(e['tiled'])} | "
                    f"{e['baseline']['peak_rss_mb'] / 1024:.2f} GB | {e.get('max_abs_diff_8bit', '–')} |")
    return "\n".join(rows)


def main() -> None:
    from sparsefold.trainers.storage import bundled_models
    from sparsefold.trainers.tiling import default_max_memory

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[d.name for d in bundled_models()])
    p.add_argument("--sizes", nargs="+", type=float, default=[1, 4, 16], help="megapixels")
    p.add_argument("--whole-limit", type=float, default=8.0, help="GB: skip whole-image runs predicted above it")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    old = json.loads(a.out.read_text()) if a.out.exists() else {"entries": []}
    entries = {(e["model"], e["megapixels"]): e for e in old["entries"]}
    with tempfile.TemporaryDirectory() as tmp:
        for mp in a.sizes:
            for model in a.models:
                e = run(model, mp, Path(tmp), a.whole_limit * 1024)
                entries[(model, mp)] = e
                print(json.dumps(e), flush=True)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({
                    "what": "sparsefold denoise, one fresh process per measurement, CPU",
                    "cpus": os.cpu_count(), "default_max_memory_mb": default_max_memory("cpu") // MB,
                    "entries": list(entries.values())}, indent=1) + "\n")
    print(table(list(entries.values())))


if __name__ == "__main__":
    main()

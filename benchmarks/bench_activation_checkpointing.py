"""Peak memory and step time of a CSCNet training step vs depth T, with and without activation
checkpointing per unfolding (``trainer.activation_checkpointing``, models/unfolding.py).

Every configuration (T, on/off) runs in a fresh process: build CSCNet (random weights; timing and memory do
not depend on their values), one warm-up step, then ``--steps`` timed Adam steps (zero_grad, forward, MSE,
backward, step) on one fixed batch of ``--batch`` noisy ``--patch``² crops. Reported per configuration: the
peak RSS of the process (``VmHWM`` from /proc/self/status, which unlike ``ru_maxrss`` does not carry the
parent's RSS over a fork), the RSS before the first step (Python, torch, the model, the batch), their
difference (what the steps cost: activations saved for backward, gradients, Adam state), the bytes autograd
keeps for backward (saved-tensor hooks, each storage once), and the median step time. The children run with
glibc's mmap threshold at 1 MiB, so that a freed tensor leaves the RSS and the peak RSS tracks live memory:
with glibc's defaults freed blocks stay in the heap, and checkpointing's extra allocate/free churn showed as
*more* peak RSS (T=12, paper width: 1923 vs 1252 MB) although autograd kept less (``--glibc-default``). Runs one configuration at a time, one torch thread each (steady on a shared
2-core machine). Results: ``benchmarks/results/activation_checkpointing.json``, and a Markdown table::

    nice -n 5 python benchmarks/bench_activation_checkpointing.py                   # paper width, ~5 min
    python benchmarks/bench_activation_checkpointing.py --depths 4 --steps 1 --filters 16 --out /tmp/x.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "activation_checkpointing.json"
MB = 1 << 20
MMAP_THRESHOLD = 1 << 20  # glibc: blocks above 1 MiB are mmapped, so a freed tensor leaves the RSS


def status_kb(key: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))


def record(saved: dict, t: Any) -> Any:
    """saved_tensors_hooks pack: note the tensor's storage (bytes, once per storage), keep the tensor."""
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


def child(a: argparse.Namespace) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    import torch

    from sparsefold.models.cscnet import CSCNet, CSCNetConfig

    torch.set_num_threads(a.threads)
    model = CSCNet(CSCNetConfig(depth=a.depth, filters=a.filters, kernel_size=a.kernel_size, stride=a.stride))
    model.checkpoint_unfoldings = a.on
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(a.batch, 1, a.patch, a.patch, generator=g)
    noisy = clean + 25 / 255 * torch.randn(clean.shape, generator=g)
    base = status_kb("VmRSS")
    times, saved = [], {}
    for i in range(1 + a.steps):  # the first is the warm-up
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        # what autograd keeps for backward (inside a checkpointed unfolding, only its inputs), counted once
        with torch.autograd.graph.saved_tensors_hooks(partial(record, saved), lambda t: t) if i == 0 else nullcontext():
            loss = torch.nn.functional.mse_loss(model(noisy), clean)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = status_kb("VmHWM")
    print(json.dumps({"depth": a.depth, "checkpointing": a.on, "peak_rss_mb": round(peak / 1024),
                      "base_rss_mb": round(base / 1024), "step_mb": round((peak - base) / 1024),
                      "saved_mb": round(sum(saved.values()) / MB),
                      "step_s": round(statistics.median(times[1:]), 3), "loss": float(loss)}))


def run_one(a: argparse.Namespace, depth: int, on: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--depth", str(depth), "--threads", str(a.threads),
           "--steps", str(a.steps), "--batch", str(a.batch), "--patch", str(a.patch), "--filters", str(a.filters),
           "--kernel-size", str(a.kernel_size), "--stride", str(a.stride)] + (["--on"] if on else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if a.mmap_threshold else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| T | checkpointing | peak RSS (MB) | step cost (MB) | step (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_rss_mb']} | "
                     f"{r['step_mb']} | {r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
    p.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up (median)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--filters", type=int, default=175)
    p.add_argument("--kernel-size", type=int, default=11)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--glibc-default", dest="mmap_threshold", action="store_false",
                   help="keep glibc's malloc defaults (freed tensors stay in the heap: RSS then shows fragmentation)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--on", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    t0, load = time.time(), os.getloadavg()
    rows = []
    for depth in a.depths:
        for on in (False, True):
            rows.append(run_one(a, depth, on))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    for r in rows:  # the same loss with and without: the same computation
        twin = next(o for o in rows if o["depth"] == r["depth"] and o["checkpointing"] != r["checkpointing"])
        r["same_loss"] = r["loss"] == twin["loss"]
    setup = {k: getattr(a, k) for k in ("batch", "patch", "filters", "kernel_size", "stride", "steps", "threads")}
    setup["malloc_mmap_threshold"] = MMAP_THRESHOLD if a.mmap_threshold else "glibc default"
    import torch

    result = {"model": "cscnet", "setup": setup, "rows": rows, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "loadavg_start": load, "loadavg_end": os.getloadavg(),
              "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

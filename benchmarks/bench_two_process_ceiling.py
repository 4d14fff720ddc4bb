"""How well two single-thread processes scale on this machine's two cores, without any training code.

    python benchmarks/bench_two_process_ceiling.py [--seconds 8]

Runs a fixed torch kernel at one thread in one process, then in two processes at once, and prints the
throughput ratio (2.0 = perfect). Two kernels: a 7x7 convolution (64 -> 64 channels, 8 x 64², compute-bound)
and an elementwise pass over 8 x 64 x 128² floats (memory-bound). This is the ceiling that the DDP scaling
benchmark (``bench_ddp_scaling.py``) is compared against: the two vCPUs of a cloud VM share caches and
memory bandwidth, and a neighbour's load moves the numbers from one run to the next, so run it twice.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def worker(kind: str, seconds: float) -> float:
    import torch

    torch.set_num_threads(1)
    if kind == "conv":
        x, w = torch.randn(8, 64, 64, 64), torch.randn(64, 64, 7, 7)
        work = lambda: torch.nn.functional.conv2d(x, w, padding=3)  # noqa: E731
    else:
        y = torch.randn(8, 64, 128, 128)
        work = lambda: torch.relu(y - 0.1) * 2.0  # noqa: E731
    for _ in range(2):
        work()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        work()
        n += 1
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--worker", choices=["conv", "ew"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(worker(a.worker, a.seconds))
        return 0
    cmd = lambda kind: [sys.executable, __file__, "--worker", kind, "--seconds", str(a.seconds)]  # noqa: E731
    for kind in ("conv", "ew"):
        one = float(subprocess.run(cmd(kind), capture_output=True, text=True, check=True).stdout)
        procs = [subprocess.Popen(cmd(kind), stdout=subprocess.PIPE, text=True) for _ in range(2)]
        two = [float(p.communicate()[0]) for p in procs]
        print(f"{kind:<4}: one process {one:.2f} it/s; two at once {two[0]:.2f} + {two[1]:.2f} it/s "
              f"-> {sum(two) / one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

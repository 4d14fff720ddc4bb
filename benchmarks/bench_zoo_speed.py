"""Every zoo model in its default (paper) configuration: one training step and one inference, time against the
arithmetic bound, so the next bottleneck is visible (issue 17, goal 4).

    python benchmarks/bench_zoo_speed.py [--threads 2] [--size 128] [--batch 4] [--only cscnet,dncnn]

For each registered model: FLOPs of an inference on one noisy size×size image and of one training step (Adam,
MSE, batch × size²) counted by ``torch.utils.flop_counter`` (matmul/convolution FLOPs; elementwise work is not
counted), the median time of 3 after a warm-up (CPU seconds of the process, all threads, and wall seconds),
achieved GFLOP/s and the fraction of a matmul ceiling measured in the same run (a 2048³ fp32 matmul at the
same thread count), i.e. how far from "only the GEMMs" each model runs. Weights are random (timing does not
depend on them). The fused soft threshold is on, as in training and evaluate (``runtime.fused``).
Writes benchmarks/results/zoo_speed.json. Not part of the package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsefold.models import MODELS, build_model, count_parameters
from sparsefold.runtime import configure_process

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo_speed.json"


def timed(fn: Any, reps: int = 3) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of ``reps`` calls after one warm-up."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c, t = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return statistics.median(cpu), statistics.median(wall)


def flops(fn: Any) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_ceiling() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    _, wall = timed(lambda: a @ b, reps=5)
    return 2 * 2048**3 / wall / 1e9


def bench(name: str, size: int, batch: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(MODELS[name].config())
    x = torch.rand(batch, 1, size, size)
    y = x + 25 / 255 * torch.randn_like(x)
    sigma = torch.full((batch,), 25.0)
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(y, sigma), x).backward()
        opt.step()

    @torch.inference_mode()
    def infer() -> None:
        model.eval()
        model(y[:1], sigma[:1])
        model.train()

    out: dict[str, Any] = {"params": count_parameters(model)}
    for kind, fn in (("inference", infer), ("train_step", step)):
        gflop = flops(fn) / 1e9
        cpu, wall = timed(fn)
        out[kind] = {"gflop": round(gflop, 2), "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                     "gflops_achieved": round(gflop / wall, 1) if wall else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--only", help="comma-separated model names (default: all registered)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    configure_process()
    ceiling = matmul_ceiling()
    names = a.only.split(",") if a.only else list(MODELS)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": a.threads,
                           "size": a.size, "batch": a.batch, "matmul_ceiling_gflops": round(ceiling, 1), "models": {},
                           "command": f"python benchmarks/bench_zoo_speed.py --threads {a.threads} --size {a.size} "
                                      f"--batch {a.batch}" + (f" --only {a.only}" if a.only else "")}
    print(f"matmul ceiling {ceiling:.0f} GFLOP/s at {a.threads} threads")
    for name in names:
        r = bench(name, a.size, a.batch)
        for kind in ("inference", "train_step"):
            k = r[kind]
            k["bound_s"] = round(k["gflop"] / ceiling, 3)
            k["fraction_of_ceiling"] = round(k["bound_s"] / k["wall_s"], 3) if k["wall_s"] else None
        res["models"][name] = r
        print(name, json.dumps(r), flush=True)
        OUT.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

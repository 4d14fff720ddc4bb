"""DDP scaling and Ray overhead on this machine: the same training loop, the same number of steps, three ways.

    python benchmarks/bench_ddp_scaling.py --data ../shared/data/bsd432 --steps 60 \\
        --out benchmarks/results/ddp_scaling.json

  plain : ``sparsefold.trainers.loop.train`` in this process (``ray.enabled=false``)
  ray1  : Ray Train, 1 worker  (``ray.enabled=true ray.workers=1``)
  ray2  : Ray Train, 2 workers (``ray.workers=2``, DDP over gloo)
  torch2: the same loop in 2 processes under plain ``torch.distributed`` DDP over gloo (no Ray): separates
          what DDP itself costs on this machine from what the Ray processes around it cost
  plain2: 2 independent plain trainings at once (no DDP, no Ray, nothing shared): the machine's own ceiling
          for this workload on 2 cores, which no data-parallel scheme can beat

Every run: the quickstart CSCNet (``--config``, default the packaged quickstart.yaml: T=10, 64 filters 7×7,
stride 2, 8 × 64² patches per worker) on --data, 1 torch thread and 1 CPU per worker
(``runtime.threads=1 ray.cpus_per_worker=1``), the loader inside the training process
(``data.num_workers=0``: on 2 cores, 2 ranks already take both), no validation images, W&B disabled, and one
checkpoint at the end (``val_every = ckpt_every = steps``).

Reported per run: ``loop_s`` -- the loop's own wall time as the loop measures it (rank 0; from the first
batch request to the final checkpoint/report, so data start-up is included alike in every run), the samples
processed by all ranks, samples/s, and the fixed cost around the loop (``wall_s - loop_s``: for Ray, worker
group start, process group, teardown). Ratios:

  ray_overhead     = loop_s(ray1) / loop_s(plain)            (1.0 = no per-step cost of running under Ray)
  ddp_speedup      = samples/s(ray2) / samples/s(ray1)       (goal >= 1.8 on 2 cores, 1 thread per worker)
  ddp_over_plain   = samples/s(ray2) / samples/s(plain)
  torch_ddp_speedup = samples/s(torch2) / samples/s(plain)   (DDP without Ray)
  ray2_over_torch2 = samples/s(ray2) / samples/s(torch2)     (what Ray's processes cost at 2 workers)
  machine_ceiling  = samples/s(plain2) / samples/s(plain)    (2 independent runs: what 2 cores give this workload)
  ray2_over_ceiling = samples/s(ray2) / samples/s(plain2)    (1.0 = DDP under Ray loses nothing to the ceiling)

Use enough --steps that the start of the loop (shuffle-buffer fill, first batches) is amortized (60+ on a
quiet machine); compare runs only at similar load averages (printed, and stored in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/bsd432", help="training images (folder, shards or builtin:skimage)")
    p.add_argument("--config", default="", help="training config YAML (default: the packaged quickstart)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of every run")
    p.add_argument("--runs", nargs="+", default=["plain", "ray1", "ray2"], choices=["plain", "ray1", "ray2", "torch2", "plain2"])
    p.add_argument("--cache-dir", default="", help="shard cache (default: ~/.cache/sparsefold)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--loader-workers", type=int, default=0, help="data.num_workers of every run")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for every run (e.g. model.depth=4)")
    p.add_argument("--out", default="benchmarks/results/ddp_scaling.json")
    return p.parse_args(argv)


def run_config(a: argparse.Namespace, out_dir: Path, name: str, extra: list[str]) -> Any:
    from sparsefold.config import load_run_config

    steps = a.steps
    return load_run_config(a.config or None, [
        f"data.train={a.data}", "data.shard_size=36", "data.val_images=0", f"data.num_workers={a.loader_workers}",
        *([f"data.cache_dir={a.cache_dir}"] if a.cache_dir else []),
        f"trainer.max_steps={steps}", f"trainer.val_every={steps}", f"trainer.ckpt_every={steps}",
        f"trainer.log_every={steps}", "runtime.threads=1", "ray.cpus_per_worker=1", "trainer.progress=false",
        "trainer.keep_checkpoints=1", f"trainer.output_dir={out_dir}", f"trainer.run_name={name}",
        "trainer.resume=false", "wandb.mode=disabled", *a.overrides, *extra])


# runs without Ray -> their training processes (ray1/ray2 take ray.workers from the name)
LOCAL_PROCESSES = {"plain": 1, "torch2": 2, "plain2": 2}

# name, numerator run, denominator run, column (see the module docstring)
RATIOS = (("ray_overhead", "ray1", "plain", "loop_s"), ("ddp_speedup", "ray2", "ray1", "samples_per_s"),
          ("torch_ddp_speedup", "torch2", "plain", "samples_per_s"),
          ("ray2_over_torch2", "ray2", "torch2", "samples_per_s"),
          ("machine_ceiling", "plain2", "plain", "samples_per_s"),
          ("ray2_over_ceiling", "ray2", "plain2", "samples_per_s"),
          ("ddp_over_plain", "ray2", "plain", "samples_per_s"))


def _torch_worker(rank: int, world: int, cfg: Any, port: int, queue: Any) -> None:
    """One rank of the ``torch2`` run: the plain loop under torch.distributed DDP (gloo), no Ray."""
    import torch
    import torch.distributed as tdist

    from sparsefold.trainers.loop import Dist, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = train(cfg, Dist(rank=rank, world_size=world, local_rank=rank,
                              wrap=lambda m: torch.nn.parallel.DistributedDataParallel(m)))
        if rank == 0:
            queue.put(out)
    finally:
        tdist.destroy_process_group()


def _plain_worker(rank: int, cfg: Any, queue: Any) -> None:
    """One of the ``plain2`` runs: the plain loop, its own run name, nothing shared with the other."""
    import dataclasses

    from sparsefold.trainers.loop import train

    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, run_name=f"{cfg.trainer.run_name}-{rank}"))
    queue.put(train(cfg))


def _spawn(fn: Any, n: int, args: tuple, results: int) -> list[dict[str, Any]]:
    """Run ``fn(rank, *args, queue)`` in ``n`` spawned processes; collect ``results`` items from the queue."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(fn, args=(*args, queue), nprocs=n, start_method="spawn", join=True)
    return [queue.get() for _ in range(results)]


def independent(cfg: Any, n: int) -> dict[str, Any]:
    """``n`` plain trainings at once; samples summed, loop time = the slowest one's."""
    outs = _spawn(_plain_worker, n, (cfg,), n)
    return {"steps": outs[0]["steps"], "samples": sum(o["samples"] for o in outs),
            "seconds": max(float(o["seconds"]) for o in outs)}


def torch_ddp(cfg: Any, world: int) -> dict[str, Any]:
    import socket

    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _spawn(_torch_worker, world, (world, cfg, port), 1)[0]  # rank 0's summary


class CpuByProcess:
    """Where the machine's CPU time goes during a run: every second, the cumulative utime+stime of every
    live process (``/proc/<pid>/stat``), grouped by what the process is (Ray worker, Train controller,
    raylet, GCS, dashboard, this driver, other). A process that exits loses at most its last second."""

    GROUPS = (("ray::RayTrainWorker", "ray train workers"), ("ray::TrainController", "ray train controller"),
              ("ray::", "other ray actors"), ("default_worker.py", "ray pooled idle workers"),
              ("gcs_server", "ray gcs"), ("dashboard", "ray dashboard + agents"), ("log_monitor", "ray log monitor"),
              ("monitor.py", "ray log monitor"), ("raylet", "raylet"))

    def __init__(self) -> None:
        import threading

        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.baseline = True
        self.tick = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _label(self, pid: int) -> str:
        if pid == os.getpid():
            return "bench driver"
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "other"
        if "multiprocessing.spawn" in cmd or "spawn_main" in cmd:
            return "spawned ranks / runs"
        return next((label for key, label in self.GROUPS if key in cmd), "other")

    def _sample(self) -> None:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, cpu = int(d.name), (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
            if pid not in self.first:
                self.first[pid] = cpu if self.baseline else 0.0  # processes started during the run count from 0
            self.last[pid] = (self._label(pid), cpu)  # re-read: Ray workers rename themselves (setproctitle)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self._sample()

    def __enter__(self) -> CpuByProcess:
        self._sample()  # baseline of the processes alive before the run
        self.baseline = False
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (label, cpu) in self.last.items():
            out[label] = out.get(label, 0.0) + cpu - self.first.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def measure(name: str, cfg: Any) -> dict[str, Any]:
    with CpuByProcess() as cpu:
        row = _measure(name, cfg)
    row["cpu_s_by_process"] = cpu.totals()
    print(f"       CPU-seconds by process during the run: {row['cpu_s_by_process']}", file=sys.stderr, flush=True)
    return row


def _measure(name: str, cfg: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    if name == "torch2":
        out = torch_ddp(cfg, 2)
    elif name == "plain2":
        out = independent(cfg, 2)
    elif cfg.ray.enabled:
        from sparsefold.trainers.ray_train import fit

        out = fit(cfg)
    else:
        from sparsefold.trainers.loop import train

        out = train(cfg)
    wall = time.perf_counter() - t0
    loop = float(out["seconds"])
    row = {"run": name, "workers": LOCAL_PROCESSES.get(name) or cfg.ray.workers, "steps": out["steps"],
           "samples": out["samples"], "loop_s": round(loop, 3), "wall_s": round(wall, 3),
           "fixed_s": round(wall - loop, 3), "samples_per_s": round(out["samples"] / loop, 2),
           "batch_per_worker": cfg.data.batch_size}
    print(f"{name:<5}: {row['steps']} steps, {row['samples']} samples in {loop:.1f} s loop "
          f"({row['samples_per_s']:.1f} samples/s), {wall:.1f} s wall", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    load_start = os.getloadavg()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    from sparsefold.runtime import configure_cpu_allocator

    configure_cpu_allocator()
    import torch

    from sparsefold.datasets import train_urls

    rows: dict[str, dict[str, Any]] = {}
    ray_init_s = None
    with tempfile.TemporaryDirectory(prefix="sparsefold-ddp-bench-") as tmp:
        probe = run_config(a, Path(tmp), "probe", [])
        t0 = time.perf_counter()
        shards = len(train_urls(probe.data))  # build the shard cache before any timing
        print(f"{shards} shards ({time.perf_counter() - t0:.1f} s to list/build)", file=sys.stderr)
        for name in a.runs:
            if name.startswith("ray") and ray_init_s is None:
                import ray

                t0 = time.perf_counter()
                ray.init(address="local", num_cpus=a.cpus, log_to_driver=True)  # a new instance, never another one
                ray_init_s = round(time.perf_counter() - t0, 2)
            extra = [] if name in LOCAL_PROCESSES else ["ray.enabled=true", f"ray.workers={name[-1]}"]
            rows[name] = measure(name, run_config(a, Path(tmp), name, extra))
        cfg = to_plain(probe)
    if ray_init_s is not None:
        ray.shutdown()
    ratios = {name: round(rows[num][key] / rows[den][key], 3) for name, num, den, key in RATIOS
              if num in rows and den in rows}
    for k, v in ratios.items():
        print(f"{k}: {v}" + ("  (goal >= 1.8)" if k == "ddp_speedup" else ""), file=sys.stderr)
    load_end = os.getloadavg()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_start": list(load_start),
        "loadavg_end": list(load_end), "args": vars(a), "config": cfg, "shards": shards,
        "ray_init_s": ray_init_s, "runs": list(rows.values()), "ratios": ratios,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average: start {load_start[0]:.2f} / end {load_end[0]:.2f} on {os.cpu_count()} CPUs "
          "(> ~0.5 at the start means contended numbers)", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def to_plain(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    d["trainer"] = {k: v for k, v in d["trainer"].items() if k not in ("output_dir", "run_name")}
    return d


if __name__ == "__main__":
    sys.exit(main())

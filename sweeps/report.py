"""``sparsefold report SWEEP_DIR``: cost and quality of every trial, and the Pareto front.

Per trial: trainable parameters; FLOPs per pixel, counted by ``torch.utils.flop_counter.FlopCounterMode``
on one forward pass of a fixed-size image (matmuls and convolutions, 2 FLOPs per multiply-add;
elementwise ops such as soft thresholds are not counted) divided by its pixels; median CPU (and GPU when
available) latency of that forward pass; steps trained (to the last validation report Tune received);
best validation PSNR; and the test PSNR (BSD68 by default) of the trial's best checkpoint, by the shared
convention (:func:`sparsefold.trainers.evaluate.evaluate_on_task`: noise seeded once, clipped output; a
restoration sweep's trials on their task's measurements).

Pareto front: the trials no other trial beats on both axes (cost lower or equal, PSNR higher or equal,
one strictly). Plotted as PSNR vs parameters and PSNR vs latency, with horizontal lines for DnCNN-S and
BM3D at the sweep's σ (published BSD68 / Set12 values, notes/unfolding-models-reference.md §6).

ASHA savings: steps trained by finished trials (run to the end or stopped by ASHA) against the same
trials × trainer.max_steps; errored and unfinished trials are listed apart.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeGuard

import torch

from sparsefold.sweeps.spec import SweepSpec, saved_spec

# Published PSNR (dB) of the reference denoisers per test set and σ (reference sheet §6).
REFERENCES = {
    "bsd68": {15: {"DnCNN-S": 31.73, "BM3D": 31.07}, 25: {"DnCNN-S": 29.23, "BM3D": 28.57},
              50: {"DnCNN-S": 26.23, "BM3D": 25.62}},
    "set12": {15: {"DnCNN-S": 32.86, "BM3D": 32.37}, 25: {"DnCNN-S": 30.44, "BM3D": 29.97}, 50: {"DnCNN-S": 27.18}},
}


def _finite(x: Any) -> TypeGuard[float]:
    """A finite number (not None, NaN, inf or a string): what a CSV/JSON cell must be to count."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def _trial_error(trial_path: str | None) -> str | None:
    """The last line (≤ 300 characters) of the error.txt Tune writes into a failed trial's folder."""
    if trial_path is None or not (err_file := Path(trial_path) / "error.txt").is_file():
        return None
    lines = [ln for ln in err_file.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "error"


def collect_trials(sweep_dir: Path, spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial Tune knows of: params, status (done | stopped | error | pending | running), steps
    reported, best validation PSNR, and its Ray Train run dir. Reads files only (no Ray cluster)."""
    from ray.tune import ExperimentAnalysis

    from sparsefold.trainers.storage import run_dir_of

    ea = ExperimentAnalysis(str(sweep_dir))
    dfs = ea.trial_dataframes
    out = []
    for trial in sorted(ea.trials, key=lambda t: t.trial_id):
        params = {d.key: trial.config.get(d.key) for d in spec.space}
        cfg = spec.trial_config(params, trial.trial_id)
        df = dfs.get(trial.trial_id)
        rows = df.to_dict("records") if df is not None and len(df) else []
        steps = max((int(r["step"]) for r in rows if _finite(r.get("step"))), default=0)
        vals = [(r["val_psnr"], int(r["step"])) for r in rows if _finite(r.get("val_psnr"))]
        best = max(vals) if vals else (None, None)
        status = trial.status.lower()
        if status == "terminated":
            status = "done" if steps >= cfg.trainer.max_steps else "stopped"
        error = _trial_error(trial.path)
        timed = [r for r in rows if _finite(r.get("time_total_s")) and _finite(r.get("step"))]
        last_iter = (timed[-1]["time_this_iter_s"], int(timed[-1]["step"]) - int(timed[-2]["step"])) \
            if len(timed) >= 2 else (None, None)  # seconds and steps of the last validation interval
        out.append({"trial_id": trial.trial_id, "status": status, "params": params, "steps": steps,
                    "train_s": round(max((r["time_total_s"] for r in timed), default=0.0), 1),
                    "last_iter_s": last_iter[0], "last_iter_steps": last_iter[1],
                    "max_steps": cfg.trainer.max_steps, "best_val_psnr": best[0], "best_step": best[1],
                    "validations": len(rows), "run_dir": str(run_dir_of(cfg)), "error": error})
    return out


def compute_savings(trials: list[dict]) -> dict[str, Any]:
    """Steps trained vs trials × max_steps over finished trials (done or stopped by ASHA), and the same in
    trial-seconds: what the trials took vs an estimate of what running the stopped ones to the end would
    have taken (their remaining steps at the pace of their last validation interval)."""
    fin = [t for t in trials if t["status"] in ("done", "stopped")]
    trained, budget = sum(t["steps"] for t in fin), sum(t["max_steps"] for t in fin)
    secs = sum(t.get("train_s") or 0.0 for t in fin)
    rest = sum((t["max_steps"] - t["steps"]) / t["last_iter_steps"] * t["last_iter_s"] for t in fin
               if t["status"] == "stopped" and t.get("last_iter_steps") and t.get("last_iter_s") is not None)
    return {"trial_seconds": round(secs, 1), "trial_seconds_without_asha": round(secs + rest, 1),
            "saved_seconds_fraction": round(rest / (secs + rest), 4) if secs + rest > 0 else None,
            "finished": len(fin), "stopped_early": sum(t["status"] == "stopped" for t in fin),
            "errored": sum(t["status"] == "error" for t in trials),
            "unfinished": sum(t["status"] not in ("done", "stopped", "error") for t in trials),
            "steps_trained": trained, "steps_budget": budget,
            "saved_fraction": round(1 - trained / budget, 4) if budget else None}


def pareto_front(costs: list[float], values: list[float]) -> list[bool]:
    """True for points no other point dominates (cost <= and value >=, one strict)."""
    return [not any(cj <= ci and vj >= vi and (cj < ci or vj > vi) for cj, vj in zip(costs, values))
            for ci, vi in zip(costs, values)]


def best_checkpoint(run_dir: Path, val_every: int, max_steps: int) -> tuple[Path | None, dict, dict]:
    """(the persisted Ray Train checkpoint of ``run_dir`` with the best val PSNR, its state.json, the
    latest checkpoint's state.json). Only checkpoints taken at a validation step compete: a
    checkpoint-only one carries the previous validation's metrics."""
    from sparsefold.trainers.storage import STATE, is_complete

    found: list[tuple[float, int, Path, dict[str, Any]]] = []  # (val PSNR or -inf, step, folder, state)
    for d in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        if is_complete(d):  # Ray Train's persisted checkpoints (step_<n>)
            state: dict[str, Any] = json.loads((d / STATE).read_text())
            step = int(state.get("step", 0))
            psnr = (state.get("metrics") or {}).get("val/psnr")
            at_validation = step % val_every == 0 or step == max_steps
            found.append((psnr if _finite(psnr) and at_validation else -math.inf, step, d, state))
    if not found:
        return None, {}, {}
    best = max(found, key=lambda f: (f[0], f[1]))
    return (best[2], best[3], max(found, key=lambda f: f[1])[3]) if best[0] > -math.inf else (None, {}, found[0][3])


@torch.inference_mode()
def measure(model: torch.nn.Module, channels: int, size: int, sigma: float, repeats: int,
            device: str = "cpu") -> tuple[float, float]:
    """(FLOPs per pixel, median latency in ms) of one forward pass on a (1, C, size, size) image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to(device).eval()
    x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    s = torch.full((1,), float(sigma), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, s)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model(x, s)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(x, s)
        sync()
        times.append(time.perf_counter() - t0)
    return counter.get_total_flops() / (size * size), 1000 * statistics.median(times)


def build_rows(sweep_dir: Path, spec: SweepSpec, test_files: list[Path], size: int, repeats: int,
               progress: Callable[[list[dict]], Iterable[dict]] | None = None) -> list[dict]:
    """One row per trial (best checkpoint, cost, test PSNR); ``progress`` wraps the trial loop (a CLI bar)."""
    from sparsefold.models import build_model, count_parameters
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import evaluate_on_task

    cache: dict[str, tuple] = {}
    rows = []
    for t in (progress or iter)(collect_trials(sweep_dir, spec)):
        cfg = spec.trial_config(t["params"], t["trial_id"])
        ckpt, state, last = best_checkpoint(Path(t["run_dir"]), cfg.trainer.val_every, cfg.trainer.max_steps)
        model = load_model(ckpt)[0] if ckpt else build_model(cfg.model)
        key = json.dumps(cfg.model.__dict__, sort_keys=True, default=str)
        if key not in cache:  # cost depends on the architecture only
            channels = getattr(cfg.model, "channels", 1)
            flops, cpu_ms = measure(model, channels, size, cfg.noise.sigma, repeats)
            gpu_ms = measure(model, channels, size, cfg.noise.sigma, repeats, "cuda")[1] \
                if torch.cuda.is_available() else None
            cache[key] = (count_parameters(model), flops, cpu_ms, gpu_ms)
        params, flops, cpu_ms, gpu_ms = cache[key]
        test = None
        if ckpt and test_files:
            test = evaluate_on_task(model.cpu(), test_files, cfg.task, cfg.noise, gray=cfg.data.gray,
                                    with_ssim=False)["psnr"]  # a restoration sweep: on its task
        rows.append({**t, "model": cfg.model.name, "n_params": params, "flops_per_pixel": round(flops, 1),
                     "cpu_ms": round(cpu_ms, 2), "gpu_ms": round(gpu_ms, 3) if gpu_ms is not None else None,
                     "test_psnr": round(test, 3) if test is not None else None,
                     "checkpoint": str(ckpt) if ckpt else None, "ckpt_step": state.get("step"),
                     "train_seconds": last.get("seconds"), "cpu_seconds": last.get("cpu_seconds")})
    return rows


def short_label(params: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in params.items())


def pareto_plot(rows: list[dict], y: str, refs: dict[str, float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if _finite(r.get(y))]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for ax, (xkey, xlabel) in zip(axes, (("n_params", "trainable parameters"), ("cpu_ms", "CPU latency per image (ms)"))):
        xs, ys = [float(r[xkey]) for r in pts], [float(r[y]) for r in pts]
        front = pareto_front(xs, ys)
        stopped = [r["status"] == "stopped" for r in pts]
        for flag, marker, label in ((False, "o", "trials"), (True, "x", "stopped by ASHA")):
            sel = [(x, v) for x, v, f in zip(xs, ys, stopped) if f == flag]
            if sel:
                ax.scatter(*zip(*sel), c="0.5", marker=marker, s=28, label=label, zorder=2)
        # by (cost, value) only: two trials of one configuration (a searcher may sample a point twice) tie on both,
        # and their rows (dicts) do not compare
        fr = sorted(((x, v, r) for x, v, r, f in zip(xs, ys, pts, front) if f), key=lambda t: t[:2])
        if fr:
            ax.plot([f[0] for f in fr], [f[1] for f in fr], "-o", c="tab:red", ms=7, drawstyle="steps-post",
                    label="Pareto front", zorder=3)
            for x, v, r in fr:
                ax.annotate(short_label(r["params"]), (x, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for (name, value), color in zip(refs.items(), ("tab:blue", "tab:green", "tab:purple")):
            ax.axhline(value, ls="--", c=color, lw=1, label=f"{name} {value:.2f} dB (published, full set)")
        if xs and min(xs) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel({"test_psnr": "test PSNR (dB)", "best_val_psnr": "best val PSNR (dB)"}[y])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = ["trial_id", "status", "model", "n_params", "flops_per_pixel", "cpu_ms", "gpu_ms", "steps", "max_steps",
           "best_val_psnr", "best_step", "test_psnr", "ckpt_step", "train_seconds", "cpu_seconds", "checkpoint", "error"]


def write_tables(rows: list[dict], keys: list[str], out: Path) -> list[str]:
    cols = COLUMNS[:2] + keys + COLUMNS[2:]
    flat = [{**{k: r["params"].get(k) for k in keys}, **{c: r.get(c) for c in COLUMNS}} for r in rows]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    md = ["| " + " | ".join(cols[:-2]) + " |", "|" + "---|" * (len(cols) - 2)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols[:-2]) + " |" for r in flat]
    return md


def make_report(sweep_dir: Path, test_dir: Path | None = None, images: int = 0, size: int = 256,
                repeats: int = 5, out: Path | None = None, wandb_mode: str | None = None,
                progress: Callable[[list[dict]], Iterable[dict]] | None = None) -> dict[str, Any]:
    """Write report.{csv,md,json} and pareto.png into ``out`` (default ``<sweep_dir>/report``); ``progress``
    wraps the loop over the trials."""
    from sparsefold.datasets import list_images

    sweep_dir = Path(sweep_dir).resolve()
    spec = saved_spec(sweep_dir)
    out = Path(out or sweep_dir / "report")
    out.mkdir(parents=True, exist_ok=True)
    test_files = list_images(test_dir)[: images or None] if test_dir else []
    rows = build_rows(sweep_dir, spec, test_files, size, repeats, progress)
    keys = [d.key for d in spec.space]
    noise = spec.base_config().noise
    y = "test_psnr" if test_files and any(_finite(r["test_psnr"]) for r in rows) else "best_val_psnr"
    ref_set = Path(test_dir).name.lower() if test_dir and y == "test_psnr" else ""
    sigma = int(noise.sigma) if noise.kind == "gaussian" and noise.sigma_max is None and noise.sigma.is_integer() else None
    refs = REFERENCES.get(ref_set, {}).get(sigma, {}) if sigma is not None else {}
    savings = compute_savings(rows)
    test_name = f"{Path(test_dir).name} ({len(test_files)} images)" if test_dir and test_files else "none"
    title = (f"sweep {spec.name}: {y} vs cost, σ={noise.sigma:g}, test set {test_name}"
             + ("" if refs else " — no published reference for this set/σ"))
    pareto_plot(rows, y, refs, title, out / "pareto.png")
    md = [f"# Sweep `{spec.name}`", "", f"- sweep dir: `{sweep_dir}`", f"- noise: {noise.kind} σ={noise.sigma:g}; "
          f"y axis: {y}; test set: {test_name}; latency: {size}×{size} image, median of {repeats}, "
          f"{torch.get_num_threads()} threads", f"- ASHA: {savings['steps_trained']} of {savings['steps_budget']} steps "
          f"trained by {savings['finished']} finished trials ({savings['stopped_early']} stopped early): saved "
          f"{100 * (savings['saved_fraction'] or 0):.1f} % of the steps; {savings['trial_seconds']:,.0f} trial-seconds "
          f"vs ≈{savings['trial_seconds_without_asha']:,.0f} without early stopping (saved "
          f"{100 * (savings['saved_seconds_fraction'] or 0):.1f} %); {savings['errored']} errored, "
          f"{savings['unfinished']} unfinished",
          "", *write_tables(rows, keys, out), ""]
    fronts = {}
    for xkey in ("n_params", "cpu_ms"):
        pts = [r for r in rows if _finite(r.get(y))]
        flags = pareto_front([r[xkey] for r in pts], [r[y] for r in pts])
        fronts[xkey] = [{"trial_id": r["trial_id"], "params": r["params"], xkey: r[xkey], y: r[y]}
                        for r, f in sorted(zip(pts, flags), key=lambda p: p[0][xkey]) if f]
        md += [f"Pareto front ({y} vs {xkey}; the best configuration per budget):", ""]
        md += [f"- {xkey} ≤ {p[xkey]:,}: {short_label(p['params'])} → {p[y]:.2f} dB" for p in fronts[xkey]] + [""]
    (out / "report.md").write_text("\n".join(md))
    result = {"sweep_dir": str(sweep_dir), "name": spec.name, "y": y, "sigma": noise.sigma, "test_set": test_name,
              "references": refs, "asha": savings, "pareto": fronts, "rows": rows,
              "files": {k: str(out / f) for k, f in (("csv", "report.csv"), ("markdown", "report.md"),
                                                     ("json", "report.json"), ("png", "pareto.png"))}}
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str))
    log_report(spec, rows, keys, out, savings, wandb_mode)
    return result


def log_report(spec: SweepSpec, rows: list[dict], keys: list[str], out: Path, savings: dict,
               mode: str | None) -> None:
    """The table and the Pareto PNG to W&B (group = sweep name, job_type ``report``)."""
    import os

    from sparsefold.trainers.tracking import wandb_mode

    base = spec.base_config().wandb
    mode = wandb_mode(mode or base.mode)
    if mode == "disabled":
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    cols: list[str | int] = ["trial_id", "status", *keys, *COLUMNS[2:-1]]  # the type wandb.Table asks for
    data = [[r["trial_id"], r["status"], *[r["params"].get(k) for k in keys], *[r.get(c) for c in COLUMNS[2:-1]]]
            for r in rows]
    run = wandb.init(project=base.project, entity=base.entity or None, group=spec.name, job_type="report",
                     name=f"{spec.name}-report", mode=mode, dir=str(out), reinit="finish_previous")
    run.log({"report/table": wandb.Table(columns=cols, data=data),
             "report/pareto": wandb.Image(str(out / "pareto.png"))})
    run.summary.update({"asha/" + k: v for k, v in savings.items()})
    run.finish()

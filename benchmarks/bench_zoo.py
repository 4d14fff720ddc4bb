"""Train every model of a suite with the CLI under one CPU budget, then score it by the shared convention.

A suite (``benchmarks/zoo/*.yaml``) holds the common training overrides, the CPU-seconds budget every
run gets (``trainer.budget_cpu_seconds``: the cosine schedule and any depth stages follow the fraction of
the budget spent, and the run stops when it is spent), the test sets and, per entry, the model's own
overrides. Each entry runs ``python -m sparsefold train`` then ``python -m sparsefold evaluate`` (one
process each, the same command a user types), and the table (params, PSNR, SSIM, CPU seconds per test
image) goes to a JSON file and stdout as Markdown.

    python benchmarks/bench_zoo.py benchmarks/zoo/gaussian_s25.yaml --parallel 2 \\
        --out benchmarks/results/zoo_gaussian_s25.json
    python benchmarks/bench_zoo.py benchmarks/zoo/poisson.yaml --parallel 2 --out benchmarks/results/zoo_poisson.json

``--parallel 2`` runs two trainings at once, each with one thread (``runtime.threads=1``, loader in the
main process), so their CPU-time budgets are comparable; evaluation timings then run one at a time with
``--eval-threads`` threads after all training is done (same runs, same noise for every model).
``--only NAME`` restricts to some entries; an entry whose result already exists in ``--out`` is not
re-run unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the command's output")


def run(cmd: list[str], log: Path, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}); see {log}")
    return p.stdout


def train_entry(name: str, entry: dict, suite: dict, args: argparse.Namespace) -> dict:
    overrides = list(suite.get("common", [])) + list(entry.get("overrides", [])) + [
        f"trainer.budget_cpu_seconds={suite['budget_cpu_seconds']}", "runtime.threads=1", "data.num_workers=0",
        f"trainer.run_name={suite['name']}-{name}", f"trainer.output_dir={args.runs}", "trainer.progress=false",
    ]
    log = args.logs / f"{suite['name']}-{name}.log"
    t0 = time.time()
    out = last_json(run([sys.executable, "-m", "sparsefold", "train", *overrides], log, 1))
    return {"name": name, "train": out, "train_wall_s": round(time.time() - t0, 1), "overrides": overrides}


def eval_entry(res: dict, suite: dict, args: argparse.Namespace) -> dict:
    log = args.logs / f"{suite['name']}-{res['name']}.log"
    scores = {}
    for test in suite["models"][res["name"]].get("tests", suite["tests"]):
        cmd = [sys.executable, "-m", "sparsefold", "evaluate", res["train"]["checkpoint"], test["dir"],
               *[str(x) for x in test.get("args", [])]]
        scores[test["name"]] = last_json(run(cmd, log, args.eval_threads))
    return {**res, "scores": scores}


def table(results: dict, suite: dict) -> str:
    tests = [t["name"] for t in suite["tests"]]
    head = "| model | params | steps | train CPU s | " + " | ".join(f"{t} PSNR / SSIM" for t in tests) + \
        f" | noisy input PSNR ({tests[0]}) | CPU s / image |"
    lines = [head, "|" + "---|" * (6 + len(tests))]
    for name, r in results.items():
        sc = r["scores"]
        first = sc[tests[0]]
        cells = " | ".join(f"{sc[t]['psnr']:.2f} / {sc[t]['ssim']:.3f}" for t in tests)
        lines.append(f"| {name} | {r['train']['params']:,} | {r['train']['steps']} | "
                     f"{r['train'].get('cpu_seconds', float('nan')):.0f} | {cells} | {first['input_psnr']:.2f} | "
                     f"{first.get('cpu_sec_per_image', first['sec_per_image']):.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--eval-threads", type=int, default=2)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--retime", type=int, default=0, metavar="N",
                    help="only re-time inference of every trained entry on the first N images of the first test, "
                         "one model after the other (CPU seconds per image, all threads), and rewrite the table")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "zoo")
    ap.add_argument("--logs", type=Path, default=ROOT / "runs" / "zoo-logs")
    args = ap.parse_args()
    suite = yaml.safe_load(args.suite.read_text())
    args.logs.mkdir(parents=True, exist_ok=True)
    done = json.loads(args.out.read_text())["results"] if args.out.is_file() else {}
    if args.retime:
        for name, r in done.items():
            test = suite["models"][name].get("tests", suite["tests"])[0]
            cmd = [sys.executable, "-m", "sparsefold", "evaluate", r["train"]["checkpoint"], test["dir"],
                   *[str(x) for x in test.get("args", [])], "--images", str(args.retime)]
            t = last_json(run(cmd, args.logs / f"{suite['name']}-{name}.log", args.eval_threads))
            r["scores"][test["name"]]["cpu_sec_per_image"] = t["cpu_sec_per_image"]
            r["retimed"] = {"images": args.retime, "threads": args.eval_threads, "wall_sec_per_image": t["sec_per_image"],
                            "loadavg": os.getloadavg()}
            print(f"[zoo] {name}: {t['cpu_sec_per_image']:.3f} CPU s/image", file=sys.stderr)
    todo = {n: e for n, e in suite["models"].items()
            if (not args.only or n in args.only) and (args.force or not done.get(n, {}).get("scores"))
            and not args.retime}
    print(f"[zoo] {suite['name']}: {list(todo)} with {suite['budget_cpu_seconds']} CPU s each", file=sys.stderr)

    def save(entries: dict) -> str:
        """Merge into --out (other invocations may have written meanwhile) and rewrite the table."""
        merged = {**(json.loads(args.out.read_text())["results"] if args.out.is_file() else {}), **entries}
        ordered = {n: merged[n] for n in suite["models"] if n in merged}
        md = table({n: r for n, r in ordered.items() if r.get("scores")}, suite)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        suite_file = args.suite.resolve()
        suite_file = suite_file.relative_to(ROOT).as_posix() if suite_file.is_relative_to(ROOT) else str(suite_file)
        args.out.write_text(json.dumps({"suite": suite, "suite_file": suite_file, "results": ordered, "table": md,
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "loadavg_end": os.getloadavg()}, indent=1))
        return md

    def train_one(kv: tuple[str, dict]) -> dict:
        name, entry = kv
        if done.get(name, {}).get("train", {}).get("checkpoint") and not args.force:
            return done[name]  # trained earlier, not yet scored
        r = train_entry(name, entry, suite, args)
        save({name: {**r, "scores": {}}})  # a killed benchmark keeps what it trained
        return r

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        trained = list(pool.map(train_one, todo.items()))
    for r in trained:  # timings one at a time, after all training
        done[r["name"]] = eval_entry(r, suite, args)
        save({r["name"]: done[r["name"]]})
        print(f"[zoo] {r['name']}: {json.dumps(done[r['name']]['scores'])}", file=sys.stderr)
    md = save({n: done[n] for n in done if args.retime})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning an imported release vs training from scratch, on the same CPU budget (issue 15, item 4).

The authors' σ=25 CSCNet (``../shared/official/cscnet/trained_models/sigma_25.model``) is imported with
``sparsefold import``; then the same ``sparsefold train`` command (the paper's architecture, noise σ=30,
BSD432, the same CPU-seconds budget ``trainer.budget_cpu_seconds``) runs twice: once with
``trainer.init_from=<the import>``, once from scratch. Both final checkpoints, and the import itself (no
training: the σ=25 model told σ=30), are scored by ``sparsefold evaluate`` on the first ``--images``
BSD68 images at σ=30 (the shared convention: seed 0, sorted names).

    python benchmarks/finetune_vs_scratch.py [--budget 600] [--images 8] [--work /tmp/finetune]

Everything runs through the CLI, as a user would; the imported weights stay in ``--work`` (outside the
repository: the CSCNet release has no licence). Writes benchmarks/results/finetune_vs_scratch.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli_run import sparsefold  # benchmarks/cli_run.py

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT.parent / "shared" / "official" / "cscnet" / "trained_models" / "sigma_25.model"
BSD432, BSD68 = ROOT.parent / "shared" / "data" / "bsd432", ROOT.parent / "shared" / "data" / "bsd68"
RESULTS = ROOT / "benchmarks" / "results" / "finetune_vs_scratch.json"
PAPER_MODEL = ["model.name=cscnet", "model.filters=175", "model.kernel_size=11", "model.stride=8", "model.depth=12",
               "model.negative_threshold=official"]  # what `sparsefold import` wrote (its config.json)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=600.0, help="CPU seconds of training per run")
    p.add_argument("--images", type=int, default=8, help="first N BSD68 images for the scores")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparsefold-finetune"))
    p.add_argument("--lr", type=float, default=1.2e-4, help="both runs (the release's .config: 1.2e-4)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    imported = a.work / "cscnet-s25"
    if not imported.is_dir():
        sparsefold("import", "cscnet", str(RELEASE), str(imported))
    common = PAPER_MODEL + [
        "noise.sigma=30", f"data.train={BSD432}", f"data.val={BSD68}", "data.val_images=2", "data.patch_size=64",
        "data.batch_size=4", "data.num_workers=1", f"optim.lr={a.lr}", "optim.schedule=constant",
        "optim.warmup_steps=0", "trainer.max_steps=100000", f"trainer.budget_cpu_seconds={a.budget}",
        "trainer.val_every=100000", "trainer.ckpt_every=100000", f"trainer.output_dir={a.work / 'runs'}",
        "trainer.progress=false", "wandb.mode=disabled", "runtime.threads=2"]
    runs = {"fine-tuned": common + [f"trainer.init_from={imported}", "trainer.run_name=s30-finetuned"],
            "scratch": common + ["trainer.run_name=s30-scratch"]}
    rows: dict[str, dict] = {}
    score = ["--sigma", "30", "--images", str(a.images)]
    rows["imported σ=25, no training"] = {"eval": sparsefold("evaluate", str(imported), str(BSD68), *score)}
    for name, over in runs.items():
        trained = sparsefold("train", *over)
        rows[name] = {"train": {k: trained.get(k) for k in ("steps", "seconds", "cpu_seconds", "checkpoint")},
                      "eval": sparsefold("evaluate", trained["checkpoint"], str(BSD68), *score)}
        print(json.dumps({name: rows[name]}), flush=True)
    table = {k: round(v["eval"]["psnr"], 3) for k, v in rows.items()}
    RESULTS.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/finetune_vs_scratch.py", *sys.argv[1:]]),
        "budget_cpu_seconds": a.budget, "bsd68_images": a.images, "sigma": 30, "psnr": table, "runs": rows},
        indent=1, default=str) + "\n")
    print(json.dumps(table))


if __name__ == "__main__":
    main()

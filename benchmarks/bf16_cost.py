"""What bf16 autocast costs on CPU, in PSNR and time: CSCNet inference (the authors' σ=25 release, imported
from ../shared/official) on the first N BSD68 images, fp32 against bf16 autocast, same noisy images (the shared
convention), image by image alternating, and one paper-configuration training step (4 × 128², Adam) in each.

    python benchmarks/bf16_cost.py [--images 10] [--threads 2]

Writes benchmarks/results/bf16_cost.json. Not part of the package.

The PSNR cost of *training* in bf16: ``--train-steps N`` trains the time-to-quality recipe
(``sparsefold/configs/cdlnet_one_cpu_hour.yaml``, CDLNet, σ=25) for N steps twice through the CLI, with
``runtime.precision=fp32`` and ``bf16`` (same seed, same data order), and scores both checkpoints in fp32 with
``sparsefold evaluate`` on all of BSD68 (the shared convention). Writes benchmarks/results/bf16_training_cost.json.

    python benchmarks/bf16_cost.py --train-steps 2000 [--work /tmp/sparsefold-bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cli_run import sparsefold  # benchmarks/cli_run.py

from sparsefold.datasets import gaussian_eval_noise, list_images, load_image
from sparsefold.models import CSCNet, CSCNetConfig
from sparsefold.runtime import configure_process
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import psnr
from sparsefold.trainers.importers import import_release

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT.parent / "shared" / "official" / "cscnet" / "trained_models" / "sigma_25.model"
DATA = ROOT.parent / "shared" / "data" / "bsd68"
OUT = ROOT / "benchmarks" / "results" / "bf16_cost.json"
TRAIN_OUT = ROOT / "benchmarks" / "results" / "bf16_training_cost.json"
RECIPE = ROOT / "sparsefold" / "configs" / "cdlnet_one_cpu_hour.yaml"


@torch.inference_mode()
def run(model: torch.nn.Module, y: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, float]:
    c = time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(y[None])[0].float().clamp(0, 1)
    return out, time.process_time() - c


def train_step_seconds(bf16: bool, steps: int = 3) -> float:
    torch.manual_seed(0)
    m = CSCNet(CSCNetConfig())
    x = torch.rand(4, 1, 128, 128)
    y = x + 25 / 255 * torch.randn_like(x)
    opt = torch.optim.Adam(m.parameters(), 1e-4)
    times = []
    for _ in range(steps + 1):
        c = time.process_time()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(y)
        torch.nn.functional.mse_loss(out.float(), x).backward()
        opt.step()
        times.append(time.process_time() - c)
    return statistics.median(times[1:])


def training_cost(steps: int, work: Path) -> None:
    """fp32 vs bf16 training of the same recipe for ``steps`` steps, both scored in fp32 on BSD68."""
    res: dict = {"recipe": str(RECIPE.relative_to(ROOT)), "steps": steps, "runs": {},
                 "command": f"python benchmarks/bf16_cost.py --train-steps {steps}"}
    for precision in ("fp32", "bf16"):
        run = sparsefold("train", str(RECIPE), "trainer.budget_cpu_seconds=0", f"trainer.max_steps={steps}",
                         f"runtime.precision={precision}", f"trainer.output_dir={work}",
                         f"trainer.run_name=cdlnet-{precision}-{steps}", f"trainer.ckpt_every={steps}",
                         "trainer.progress=false", "wandb.mode=disabled")
        score = sparsefold("evaluate", run["checkpoint"], str(DATA), "--sigma", "25")
        res["runs"][precision] = {"cpu_seconds": run.get("cpu_seconds"), "steps": run.get("steps"),
                                  "cpu_s_per_step": run["cpu_seconds"] / steps, "bsd68_psnr": score["psnr"]}
        print(json.dumps({precision: res["runs"][precision]}), flush=True)
    res["psnr_cost_db"] = res["runs"]["fp32"]["bsd68_psnr"] - res["runs"]["bf16"]["bsd68_psnr"]
    TRAIN_OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=0, help="measure the training cost instead (see above)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparsefold-bf16"))
    a = p.parse_args()
    if a.train_steps:
        return training_cost(a.train_steps, a.work)
    torch.set_num_threads(a.threads)
    configure_process()
    files = list_images(DATA)[: a.images]
    clean = [load_image(f) for f in files]
    noisy = gaussian_eval_noise(clean, 25.0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:  # the authors' weights are not kept
        model, _ = load_model(import_release("cscnet", RELEASE, Path(tmp) / "s25")["checkpoint"])
    model.eval()
    rows = []
    for f, x, y in zip(files, clean, noisy):
        o32, t32 = run(model, y, False)
        o16, t16 = run(model, y, True)
        rows.append({"file": f.name, "fp32": psnr(o32, x), "bf16": psnr(o16, x), "cpu_s_fp32": t32, "cpu_s_bf16": t16})
        print(json.dumps(rows[-1]), flush=True)
    n = len(rows)
    res = {"images": n, "threads": a.threads, "release": "cscnet/sigma_25.model",
           "inference": {"psnr_fp32": sum(r["fp32"] for r in rows) / n, "psnr_bf16": sum(r["bf16"] for r in rows) / n,
                         "cpu_s_per_image_fp32": statistics.median(r["cpu_s_fp32"] for r in rows),
                         "cpu_s_per_image_bf16": statistics.median(r["cpu_s_bf16"] for r in rows)},
           "train_step_cpu_s": {"fp32": train_step_seconds(False), "bf16": train_step_seconds(True)},
           "per_image": rows, "command": f"python benchmarks/bf16_cost.py --images {a.images} --threads {a.threads}"}
    res["inference"]["psnr_cost_db"] = res["inference"]["psnr_fp32"] - res["inference"]["psnr_bf16"]
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "per_image"}, indent=1))


if __name__ == "__main__":
    main()

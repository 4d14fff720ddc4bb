"""The blind default denoiser (``sparsefold denoise`` without a model or ``--sigma``): what it does to a clean
photo and to noise of an unknown level, against the previous default, and bundling it.

    python benchmarks/blind_default.py RUN_CHECKPOINT [--data set12,bsd68] [--compare cscnet] \\
        [--bundle cdlnet-blind --command "sparsefold train ..."]

For each data set (the shared convention: sorted names, one seeded generator, unclipped noisy input, output
clipped, PSNR peak 1): the clean image denoised blind, scored against itself (a denoiser should leave it
alone), and Gaussian σ = 10, 15, 25, 35, 50 denoised blind (σ estimated from each image, as ``denoise`` does
without ``--sigma``) and told σ. Writes benchmarks/results/blind_default.json. ``--bundle NAME`` copies the
checkpoint (weights, config, state; no optimizer) to sparsefold/bundled/NAME with a TRAINING.md holding the
training command and these numbers. Not part of the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from sparsefold.config import NoiseConfig
from sparsefold.datasets import list_images, load_image
from sparsefold.models.noise_level import estimate_sigma
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import denoise, evaluate_images, psnr
from sparsefold.trainers.storage import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "blind_default.json"
SIGMAS = (10.0, 15.0, 25.0, 35.0, 50.0)


@torch.inference_mode()
def clean_scores(model: torch.nn.Module, files: list[Path]) -> dict:
    """Clean images denoised blind, PSNR against themselves; the σ the estimator reads on them."""
    clean = [load_image(f) for f in files]
    scores = [psnr(denoise(model, x, "cpu", None), x) for x in clean]
    est = [float(estimate_sigma(x[None])[0]) for x in clean]
    return {"psnr_vs_itself": sum(scores) / len(scores), "min_psnr_vs_itself": min(scores),
            "estimated_sigma_mean": sum(est) / len(est)}


def score(ckpt: str, files: list[Path]) -> dict:
    model, _ = load_model(resolve_checkpoint(ckpt))
    t0 = time.process_time()
    out: dict = {"clean": clean_scores(model, files)}
    for s in SIGMAS:
        blind = evaluate_images(model, files, NoiseConfig(sigma=s), blind=True, with_ssim=False)
        told = evaluate_images(model, files, NoiseConfig(sigma=s), with_ssim=False)
        out[f"sigma_{s:g}"] = {"blind": round(blind["psnr"], 4), "told": round(told["psnr"], 4),
                               "noisy": round(blind["input_psnr"], 4)}
    out["cpu_seconds"] = round(time.process_time() - t0, 1)
    return out


def bundle(ckpt: Path, name: str, command: str, results: dict) -> None:
    dst = ROOT / "sparsefold" / "bundled" / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in ("model.safetensors", "state.json"):
        shutil.copy2(ckpt / f, dst / f)
    cfg = json.loads((ckpt / "config.json").read_text().replace(str(ROOT) + "/", ""))
    model, _ = load_model(ckpt)
    cfg["params"] = sum(p.numel() for p in model.parameters())
    (dst / "config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
    rows = []
    for data, r in results["models"]["new"].items():
        c = r["clean"]
        rows.append(f"| {data} | {c['psnr_vs_itself']:.2f} (min {c['min_psnr_vs_itself']:.2f}) | "
                    + " | ".join(f"{r[f'sigma_{s:g}']['blind']:.2f} / {r[f'sigma_{s:g}']['told']:.2f}" for s in SIGMAS) + " |")
    (dst / "TRAINING.md").write_text(f"""# Bundled model `{name}` — blind (noise-adaptive) CDLNet, the default of `sparsefold denoise`

CDLNet's thresholds are τ = τ₀ + τ₁·σ per filter; without `--sigma` the model estimates σ from each image
(median absolute deviation of the finest Haar band), so one model serves clean images and any Gaussian level in
0…55. Fine-tuned from the bundled σ=25 `cdlnet` on σ drawn uniformly in [0, 55] per image, under a CPU budget
(a budget model, not the paper's training). Measured by `benchmarks/blind_default.py` ({results['date']}):

| data | clean image, PSNR vs itself (dB) | {' | '.join(f'σ={s:g} blind / told' for s in SIGMAS)} |
|---|---|{'---|' * len(SIGMAS)}
{chr(10).join(rows)}

Training command (from the repository root, `../shared/data` beside it):

```bash
{command}
```
""")
    print(f"bundled {name} <- {ckpt}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the blind model's checkpoint (a step_N directory or a bundled name)")
    p.add_argument("--data", default="set12,bsd68", help="comma-separated folders of ../shared/data")
    p.add_argument("--compare", default="cscnet", help="the previous default, scored on the first data set only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bundle", help="copy the checkpoint to sparsefold/bundled/NAME")
    p.add_argument("--command", default="", help="the training command, for the bundle's TRAINING.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sets = a.data.split(",")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checkpoint": a.checkpoint,
                 "models": {"new": {}, "previous": {}}, "previous_default": a.compare,
                 "command": "python benchmarks/blind_default.py " + a.checkpoint + f" --data {a.data}"}
    for d in sets:
        res["models"]["new"][d] = score(a.checkpoint, list_images(DATA / d))
        print(d, json.dumps(res["models"]["new"][d]), flush=True)
    if a.compare:
        res["models"]["previous"][sets[0]] = score(a.compare, list_images(DATA / sets[0]))
        print("previous", json.dumps(res["models"]["previous"]), flush=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    if a.bundle:
        bundle(Path(a.checkpoint), a.bundle, a.command, res)


if __name__ == "__main__":
    main()

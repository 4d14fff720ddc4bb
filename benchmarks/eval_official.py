"""Imported releases vs the authors' own code, on the same noisy images (the shared evaluation convention).

For each release in ../shared/official (CSCNet σ=15, σ=25; DnCNN-S σ=25): ``sparsefold import`` it into a
temporary checkpoint, score it with sparsefold's ``evaluate`` path (``evaluate_images``: seeded noise,
output clipped to [0, 1], PSNR with peak 1), and run the official model class (imported by path from
../shared/official, as the tests do) on the same noisy images with the same clipping and PSNR. The official
weights are read from ../shared/official only (never copied); the DnCNN pickle is read by sparsefold's
restricted unpickler (``torch.load(weights_only=False)`` is not used anywhere).

    python benchmarks/eval_official.py [--data set12|bsd68] [--images N] [--threads T]

Writes benchmarks/results/official.json (merged per data set). Not part of the package.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from sparsefold.config import NoiseConfig
from sparsefold.datasets import gaussian_eval_noise, list_images, load_image
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import evaluate_images, psnr
from sparsefold.trainers.importers import import_release
from sparsefold.trainers.torchfile import module_tensors, read_torch_file

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official"
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "official.json"
DNCNN = OFFICIAL / "dncnn" / "TrainingCodes" / "dncnn_pytorch"
PAPER = {  # ../shared/notes/unfolding-models-reference.md (BSD68: papers; Set12: DnCNN README mirrors)
    ("cscnet_s15", "bsd68"): 31.57, ("cscnet_s25", "bsd68"): 29.11, ("dncnn_s25", "bsd68"): 29.23,
    ("dncnn_s25", "set12"): 30.44,
}


def official_cscnet(src: Path, conf: dict) -> torch.nn.Module:
    """drorsimon/CSCNet ConvLista_T with the release loaded (uint8 masked_select mask made bool)."""
    sys.path.insert(0, str(OFFICIAL / "cscnet"))
    modules = importlib.import_module("model.modules")
    masked_select = torch.masked_select
    torch.masked_select = lambda x, mask: masked_select(x, mask.bool())  # this script only
    params = modules.ListaParams(conf["kernel_size"], conf["filters"], conf["stride"], conf["depth"])
    k = conf["kernel_size"]
    model = modules.ConvLista_T(params, A=torch.zeros(conf["filters"], 1, k, k))  # skip the random init
    model.load_state_dict(torch.load(src, map_location="cpu", weights_only=True))
    return model.eval()


def official_dncnn(src: Path) -> torch.nn.Module:
    """cszn/DnCNN main_test.py's DnCNN class, loaded with the release's own tensor names."""
    stub = types.ModuleType("skimage.measure")  # main_test imports compare_psnr, gone from skimage
    stub.compare_psnr = stub.compare_ssim = None  # type: ignore[attr-defined]
    sys.modules["skimage.measure"] = stub
    spec = importlib.util.spec_from_file_location("dncnn_main_test", DNCNN / "main_test.py")
    assert spec is not None and spec.loader is not None
    main_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_test)
    model = main_test.DnCNN()
    model.load_state_dict(dict(module_tensors(read_torch_file(src, stand_ins=frozenset({"DnCNN"})))))
    return model.eval()


@torch.inference_mode()
def official_psnr(model: torch.nn.Module, files: list[Path], sigma: float) -> dict:
    """The official forward on the convention's noisy images (same generator draws), clipped, PSNR peak 1."""
    clean = [load_image(f, gray=True) for f in files]
    noisy = gaussian_eval_noise(clean, sigma, seed=0)
    scores = [psnr(model(y[None])[0].clamp(0, 1), x) for x, y in zip(clean, noisy)]
    return {"psnr": sum(scores) / len(scores), "per_image": scores}


def run(name: str, family: str, src: Path, files: list[Path], tmp: Path) -> dict:
    t0 = time.perf_counter()
    summary = import_release(family, src, tmp / name)
    ours, meta = load_model(summary["checkpoint"])
    sigma = summary["sigma"]
    res = evaluate_images(ours, files, NoiseConfig(sigma=sigma), with_ssim=False)
    t1 = time.perf_counter()
    official = official_cscnet(src, meta["model"]) if family == "cscnet" else official_dncnn(src)
    off = official_psnr(official, files, sigma)
    t2 = time.perf_counter()
    per = [abs(a["psnr"] - b) for a, b in zip(res["per_image"], off["per_image"])]
    return {"release": f"{family}/{src.name}", "sigma": sigma, "sparsefold_psnr": round(res["psnr"], 4),
            "official_psnr": round(off["psnr"], 4), "diff_db": round(res["psnr"] - off["psnr"], 5),
            "max_per_image_diff_db": round(max(per), 5), "images": len(files),
            "seconds_sparsefold": round(t1 - t0, 1), "seconds_official": round(t2 - t1, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="set12", choices=("set12", "bsd68"))
    p.add_argument("--images", type=int, default=0, help="first N sorted images (0: all)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    files = list_images(DATA / a.data)[: a.images or None]
    releases = [("cscnet_s15", "cscnet", OFFICIAL / "cscnet" / "trained_models" / "sigma_15.model"),
                ("cscnet_s25", "cscnet", OFFICIAL / "cscnet" / "trained_models" / "sigma_25.model"),
                ("dncnn_s25", "dncnn", DNCNN / "models" / "DnCNN_sigma25" / "model.pth")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:  # the imported checkpoints hold the authors' weights: not kept
        for name, family, src in releases:
            rows[name] = run(name, family, src, files, Path(tmp)) | {"paper_psnr": PAPER.get((name, a.data))}
            print(json.dumps({name: rows[name]}), flush=True)
    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    out[a.data + ("" if not a.images else f"_first{a.images}")] = {
        "convention": "../shared/data/README.md (seed 0, sorted names, unclipped noisy input, output clipped)",
        "command": " ".join(["python", "benchmarks/eval_official.py", *sys.argv[1:]]), "rows": rows}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

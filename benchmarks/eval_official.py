"""Imported releases vs the authors' own code, on the same noisy images (the shared evaluation convention).

For each release in ../shared/official (CSCNet σ=15, σ=25; DnCNN-S σ=25; LIDIA σ=15, σ=25, LIDIA-S σ=25 on
the gray sets, colour LIDIA σ=25 on cbsd68): ``sparsefold import`` it into a temporary checkpoint, score it with sparsefold's ``evaluate`` path (``evaluate_images``: seeded noise,
output clipped to [0, 1], PSNR with peak 1), and run the official model class (imported by path from
../shared/official, as the tests do) on the same noisy images with the same clipping and PSNR. The official
weights are read from ../shared/official only (never copied); the DnCNN pickle is read by sparsefold's
restricted unpickler (``torch.load(weights_only=False)`` is not used anywhere). LIDIA's official forward runs
as its denoise_set_*.py scripts run it: ``NonLocalDenoiser(image, train=False, save_memory=True,
max_chunk=40000)`` on the [−1, 1] scale, never put in eval mode, so its BatchNorm layers use each 40,000-patch
chunk's statistics, and so does the imported checkpoint (``eval_bn="official"``); ``--official-bn running``
runs both in eval mode (the running statistics).

    python benchmarks/eval_official.py [--data set12|bsd68|cbsd68] [--images N] [--threads T] [--only NAMES]
                                       [--per-image]

Writes benchmarks/results/official.json (merged per data set). ``--per-image`` (for the hour-long LIDIA runs)
scores image by image, both sides, and keeps each image's two PSNRs in
benchmarks/results/official_per_image/DATA_NAME.json as soon as they are measured; a stopped run started
again with the same arguments goes on from the first image not yet scored, and the row in official.json is
written when every image is in. Its "sparsefold" side calls the same two functions per image as
``evaluate_images`` (``trainers.evaluate.denoise`` then ``psnr``) on the same noisy images (``noisy_versions``
over the whole sorted list, so image i's noise is the convention's). Not part of the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from sparsefold.config import NoiseConfig
from sparsefold.datasets import gaussian_eval_noise, list_images, load_image
from sparsefold.models import build_model
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import denoise, evaluate_images, noisy_versions, psnr
from sparsefold.trainers.importers import import_release
from sparsefold.trainers.tiling import tile_pixels
from sparsefold.trainers.torchfile import module_tensors, read_torch_file

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official"
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "official.json"
PER_IMAGE = RESULTS.parent / "official_per_image"
DNCNN = OFFICIAL / "dncnn" / "TrainingCodes" / "dncnn_pytorch"
LIDIA = OFFICIAL / "lidia"
PAPER = {  # ../shared/notes/unfolding-models-reference.md (BSD68: papers; Set12: DnCNN README mirrors;
    # LIDIA: NL-Ridge README (gray), the LIDIA README (colour), LIDIA-S read off the authors' figure)
    ("cscnet_s15", "bsd68"): 31.57, ("cscnet_s25", "bsd68"): 29.11, ("dncnn_s25", "bsd68"): 29.23,
    ("dncnn_s25", "set12"): 30.44, ("lidia_s15", "bsd68"): 31.62, ("lidia_s25", "bsd68"): 29.11,
    ("lidia_s15", "set12"): 32.85, ("lidia_s25", "set12"): 30.41, ("lidia_small_s25", "bsd68"): 29.08,
    ("lidia_c25", "cbsd68"): 31.31,
}
MAX_MEMORY = 16 << 30  # whole images, no tiles: LIDIA at stride 1 peaks at ≈ 4.7 GB RSS on 481×321 (its tile
# planner's estimate is ≈ 2× that)
RELEASES = [  # name, family, file, colour
    ("cscnet_s15", "cscnet", OFFICIAL / "cscnet" / "trained_models" / "sigma_15.model", False),
    ("cscnet_s25", "cscnet", OFFICIAL / "cscnet" / "trained_models" / "sigma_25.model", False),
    ("dncnn_s25", "dncnn", DNCNN / "models" / "DnCNN_sigma25" / "model.pth", False),
    ("lidia_s15", "lidia", LIDIA / "models" / "model_state_sigma_15_bw.pt", False),
    ("lidia_s25", "lidia", LIDIA / "models" / "model_state_sigma_25_bw.pt", False),
    ("lidia_small_s25", "lidia", LIDIA / "models" / "model_state_small_sigma_25_bw.pt", False),
    ("lidia_c25", "lidia", LIDIA / "models" / "model_state_sigma_25_c.pt", True),
]


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


def official_lidia(src: Path, rgb: bool, bn: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """grishavak/LIDIA-denoiser NonLocalDenoiser (code/modules.py; torchvision, used only by its training
    helpers, stubbed when absent) with the release loaded, called as denoise_set_*.py call it, on [0, 1]."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:  # stubbed once
        sys.modules["torchvision"] = tv = types.ModuleType("torchvision")
        sys.modules["torchvision.transforms"] = tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
    sys.path.insert(0, str(LIDIA / "code"))
    modules = importlib.import_module("modules")
    opt = modules.ArchitectureOptions(rgb=rgb, small_network="small" in src.name)
    net = modules.NonLocalDenoiser(modules.calc_padding(opt)[0], opt)
    net.patch_denoise_net.load_state_dict(torch.load(src, map_location="cpu", weights_only=True)["state_dict"])
    net.train(bn == "batch")  # the scripts never call .eval(): BatchNorm on each chunk's statistics
    return lambda y: (net(2 * y - 1, train=False, save_memory=True, max_chunk=40000).clamp(-1, 1) + 1) / 2


@torch.inference_mode()
def official_psnr(model: Callable[[torch.Tensor], torch.Tensor], files: list[Path], sigma: float,
                  gray: bool = True) -> dict:
    """The official forward on the convention's noisy images (same generator draws), clipped, PSNR peak 1."""
    clean = [load_image(f, gray=gray) for f in files]
    noisy = gaussian_eval_noise(clean, sigma, seed=0)
    scores = [psnr(model(y[None])[0].clamp(0, 1), x) for x, y in zip(clean, noisy)]
    return {"psnr": sum(scores) / len(scores), "per_image": scores}


def imported(name: str, family: str, src: Path, tmp: Path, bn: str) -> tuple[dict, torch.nn.Module, dict]:
    """``sparsefold import`` of the release and the checkpoint loaded; a LIDIA import normalizes as the
    official scripts (``eval_bn="official"``), switched to the running statistics for ``--official-bn running``."""
    summary = import_release(family, src, tmp / name)
    ours, meta = load_model(summary["checkpoint"])
    if family == "lidia" and bn == "running":
        state = ours.state_dict()
        ours = build_model(dataclasses.replace(ours.config, eval_bn="running"), init=False)
        ours.load_state_dict(state)
    return summary, ours, meta


def run(name: str, family: str, src: Path, files: list[Path], tmp: Path, rgb: bool = False, bn: str = "batch") -> dict:
    t0 = time.perf_counter()
    summary, ours, meta = imported(name, family, src, tmp, bn)
    sigma = summary["sigma"]
    res = evaluate_images(ours, files, NoiseConfig(sigma=sigma), gray=not rgb, with_ssim=False, max_memory=MAX_MEMORY)
    t1 = time.perf_counter()
    official = official_model(family, src, meta, rgb, bn)
    off = official_psnr(official, files, sigma, gray=not rgb)
    t2 = time.perf_counter()
    per = [abs(a["psnr"] - b) for a, b in zip(res["per_image"], off["per_image"])]
    return {"release": f"{family}/{src.name}", "sigma": sigma, "sparsefold_psnr": round(res["psnr"], 4),
            "official_psnr": round(off["psnr"], 4), "diff_db": round(res["psnr"] - off["psnr"], 5),
            "max_per_image_diff_db": round(max(per), 5), "images": len(files),
            "seconds_sparsefold": round(t1 - t0, 1), "seconds_official": round(t2 - t1, 1)}


def official_model(family: str, src: Path, meta: dict, rgb: bool, bn: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"cscnet": lambda: official_cscnet(src, meta["model"]), "dncnn": lambda: official_dncnn(src),
            "lidia": lambda: official_lidia(src, rgb, bn)}[family]()


@torch.inference_mode()
def run_per_image(name: str, family: str, src: Path, files: list[Path], tmp: Path, cache: Path, rgb: bool = False,
                  bn: str = "batch") -> dict | None:
    """Both sides image by image, each image's pair saved to ``cache`` at once; the row when all are in."""
    done = json.loads(cache.read_text()) if cache.is_file() else {"release": f"{family}/{src.name}", "images": {}}
    summary, ours, meta = imported(name, family, src, tmp, bn)
    ours.eval()
    sigma = float(summary["sigma"])
    official = official_model(family, src, meta, rgb, bn)
    clean = [load_image(f, gray=not rgb) for f in files]
    noisy = noisy_versions(clean, NoiseConfig(sigma=sigma), seed=0)  # the whole list: image i's draws
    ours_bn = getattr(ours.config, "eval_bn", None)  # LIDIA: how the imported model normalizes at eval
    for f, x, y in zip(files, clean, noisy):
        row = done["images"].get(f.name, {})
        if row and row.get("sparsefold_eval_bn") == ours_bn:
            continue
        if ours_bn == "official":  # the official statistics are those of the whole image's patches: no tiles
            assert tile_pixels(ours, y, "cpu", MAX_MEMORY) is None, f"{f.name} would be tiled"
        t0 = time.perf_counter()
        a = psnr(denoise(ours, y, "cpu", sigma, MAX_MEMORY, True), x)
        t1 = time.perf_counter()
        if "official" not in row:  # the official side of an image scored before a change on ours is kept
            row = {"official": psnr(official(y[None])[0].clamp(0, 1), x),
                   "seconds_official": round(time.perf_counter() - t1, 1)}
        row = row | {"sparsefold": a, "seconds_sparsefold": round(t1 - t0, 1)}
        if ours_bn is not None:
            row["sparsefold_eval_bn"] = ours_bn
        done["images"][f.name] = row
        a, b = row["sparsefold"], row["official"]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(done, indent=1) + "\n")
        print(f"{name} {f.name}: sparsefold {a:.4f} official {b:.4f} ({t1 - t0:.0f} s + "
              f"{row['seconds_official']:.0f} s)", flush=True)
    rows = [done["images"][f.name] for f in files]
    n = len(rows)
    ps, po = sum(r["sparsefold"] for r in rows) / n, sum(r["official"] for r in rows) / n
    return {"release": done["release"], "sigma": sigma, "sparsefold_psnr": round(ps, 4),
            "official_psnr": round(po, 4), "diff_db": round(ps - po, 5),
            "max_per_image_diff_db": round(max(abs(r["sparsefold"] - r["official"]) for r in rows), 5),
            "images": n, "seconds_sparsefold": round(sum(r["seconds_sparsefold"] for r in rows), 1),
            "seconds_official": round(sum(r["seconds_official"] for r in rows), 1),
            "per_image_file": str(cache.relative_to(ROOT))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="set12", choices=("set12", "bsd68", "cbsd68"))
    p.add_argument("--images", type=int, default=0, help="first N sorted images (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", help="comma-separated release names (default: all for the data set), e.g. lidia_s25")
    p.add_argument("--official-bn", default="batch", choices=("batch", "running"),
                   help="LIDIA's official BatchNorm: per-chunk statistics as its scripts (batch) or eval mode")
    p.add_argument("--per-image", action="store_true", help="save each image's scores as measured; resumable")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    files = list_images(DATA / a.data)[: a.images or None]
    only = set(a.only.split(",")) if a.only else None
    releases = [r for r in RELEASES if r[3] == (a.data == "cbsd68") and (only is None or r[0] in only)]
    key = a.data + ("" if not a.images else f"_first{a.images}")
    command = " ".join(["python", "benchmarks/eval_official.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:  # the imported checkpoints hold the authors' weights: not kept
        for name, family, src, rgb in releases:
            if a.per_image:
                cache = PER_IMAGE / (f"{key}_{name}" + ("" if a.official_bn == "batch" else "_bn_running"))
                measured = run_per_image(name, family, src, files, Path(tmp), cache.with_suffix(".json"), rgb,
                                         a.official_bn)
            else:
                measured = run(name, family, src, files, Path(tmp), rgb, a.official_bn)
            row = measured | {"paper_psnr": PAPER.get((name, a.data)), "command": command}
            if family == "lidia":
                row["official_bn"] = a.official_bn
            print(json.dumps({name: row}), flush=True)
            save(key, name, row)  # after each release: a long run stopped half-way keeps what it measured


def save(key: str, name: str, row: dict) -> None:
    """Merge one row into benchmarks/results/official.json (rows of other commands are kept)."""
    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    out[key] = {"convention": "../shared/data/README.md (seed 0, sorted names, unclipped noisy input, output "
                "clipped)", "rows": out.get(key, {}).get("rows", {}) | {name: row}}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Imported DCEA releases vs the authors' own code on Set12, with the Poisson convention of their code.

The convention of btolooshams/dea (src/predict.py, src/trainer.py): clean x in [0, 1]; Q = max(x)/peak;
counts c ~ Poisson(x/Q) (the network sees raw counts); estimate Q·exp(η̂), not clipped; PSNR per image with
peak max(x): 20·log10(max x) − 10·log10(MSE), averaged over images. Here one ``torch.Generator`` seeded
once (seed 0) per release draws the counts in sorted-filename order, one realization per image (the
authors average 20). Ours sees c/peak and returns exp(η̂)/peak, so its estimate is max(x)·ours(c/peak).

For each release it runs ``sparsefold import dcea`` into a temporary checkpoint and builds the official
class (src/model.py imported by path from ../shared/official, as tests/test_import_dcea.py does) with the
tensors sparsefold's restricted reader extracted (``torch.load(weights_only=False)`` is used nowhere).

    nice -n 10 python benchmarks/eval_official_dcea.py [--images N] [--releases tied_peak4 ...] [--threads T]

Writes benchmarks/results/official_dcea.json (merged per release). Not part of the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsefold.datasets import list_images, load_image
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.importers import import_release
from sparsefold.trainers.torchfile import module_tensors, read_torch_file

ROOT = Path(__file__).resolve().parents[1]
DCEA = ROOT.parent / "shared" / "official" / "dcea"
SET12 = ROOT.parent / "shared" / "data" / "set12"
RESULTS = ROOT / "benchmarks" / "results" / "official_dcea.json"
PAPER_NOTE = ("the paper's Poisson table (peaks 1/2/4 vs SPDA and CA) was not retrieved and its test images are "
              "not in the code (../shared/notes/unfolding-models-reference.md §4): no published Set12 number")


def official_classes() -> object:
    """btolooshams/dea src/model.py (its ``import utils`` served by src/utils.py); uint8 masks made bool."""
    for name in ("utils", "model"):
        spec = importlib.util.spec_from_file_location(name, DCEA / "src" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    masked_select = torch.masked_select
    torch.masked_select = lambda x, mask: masked_select(x, mask.bool())  # type: ignore[assignment]
    return sys.modules["model"]


def official_module(classes: object, conf: dict, src: Path) -> torch.nn.Module:
    hyp = {"num_iters": conf["depth"], "num_conv": conf["filters"], "dictionary_dim": conf["kernel_size"],
           "device": "cpu", "stride": conf["stride"], "twosided": conf["twosided"], "single_bias": True,
           "model_distribution": conf["likelihood"], "L": 1.0, "peak": conf["peak"], "lam": 0.0,
           "nonlin": "ELU" if conf["residual_elu"] else None}
    m = getattr(classes, "DEA2Dtied" if conf["name"] == "dcea_c" else "DEA2Dfree")(hyp)
    m.load_state_dict(dict(module_tensors(read_torch_file(src, stand_ins=frozenset({"DEA2Dtied", "DEA2Dfree"})))))
    return m.eval()


def psnr_max(est: torch.Tensor, x: torch.Tensor) -> float:
    """The official PSNR: peak max(x) of the clean image, no clipping."""
    mse = torch.mean((est.double() - x.double()) ** 2).item()
    return 20 * math.log10(x.max().item()) - 10 * math.log10(mse)


@torch.no_grad()
def eval_release(src: Path, files: list[Path], classes: object) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = import_release("dcea", src, Path(tmp) / "ckpt")
        ours, meta = load_model(Path(tmp) / "ckpt")
    conf, ours = meta["model"], ours.eval()
    peak, theirs = conf["peak"], official_module(classes, conf, src)
    g = torch.Generator().manual_seed(0)
    rows, t_ours, t_theirs = [], 0.0, 0.0
    for f in files:
        x = load_image(f, gray=True)[None]  # (1, 1, H, W) in [0, 1]
        q = x.max() / peak
        counts = torch.poisson(x / q, generator=g)
        t0 = time.process_time()
        mine = x.max() * ours(counts / peak)  # = Q·exp(η̂)
        t1 = time.process_time()
        z, _, _ = theirs(counts, 0)
        official = q * torch.exp(z)
        t_ours, t_theirs = t_ours + t1 - t0, t_theirs + time.process_time() - t1
        rows.append({"image": f.name, "noisy": psnr_max(q * counts, x), "official": psnr_max(official, x),
                     "ours": psnr_max(mine, x), "max_abs_diff": (mine - official).abs().max().item()})
        print(f"  {f.name}: official {rows[-1]['official']:.3f} dB, ours {rows[-1]['ours']:.3f} dB", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("noisy", "official", "ours")}
    return {"model": conf["name"], "params": summary["params"], "peak": peak, "sha256": summary["source"]["sha256"],
            "images": [r["image"] for r in rows], "psnr_noisy": mean["noisy"], "psnr_official": mean["official"],
            "psnr_ours": mean["ours"], "diff_db": mean["ours"] - mean["official"],
            "max_abs_diff": max(r["max_abs_diff"] for r in rows), "per_image": rows,
            "cpu_s_per_image_ours": t_ours / len(rows), "cpu_s_per_image_official": t_theirs / len(rows),
            "published": None}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=0, help="first N images of Set12 in sorted order (0: all)")
    p.add_argument("--releases", nargs="*", default=[], help="e.g. tied_peak4 (default: every model_*.pt)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    files = list_images(SET12)
    files = sorted(files, key=lambda f: f.name)[: a.images or None]
    classes = official_classes()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.update({"convention": __doc__.split("\n\n")[1].replace("\n", " "), "data": "set12",
                    "threads": a.threads, "published_note": PAPER_NOTE})
    for src in sorted((DCEA / "results" / "trained_models").glob("model_*_peak*.pt")):
        key = src.stem.removeprefix("model_")
        if a.releases and key not in a.releases:
            continue
        print(f"{key}:", flush=True)
        results.setdefault("releases", {})[key] = r = eval_release(src, files, classes)
        print(f"{key}: official {r['psnr_official']:.3f} dB, ours {r['psnr_ours']:.3f} dB "
              f"(diff {r['diff_db']:+.4f}), noisy {r['psnr_noisy']:.2f} dB, {len(files)} images", flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Imported DCEA releases vs the authors' own code on Set12, with the Poisson convention of their code.

The convention of btolooshams/dea (src/predict.py, src/trainer.py): clean x in [0, 1]; Q = max(x)/peak;
counts c ~ Poisson(x/Q) (the network sees raw counts); estimate Q·exp(η̂), not clipped; PSNR per image with
peak max(x): 20·log10(max x) − 10·log10(MSE), averaged over images. That is ``sparsefold evaluate
--convention dcea`` (trainers/evaluate.py: x/max x, Poisson(peak·x/max x)/peak from one generator seeded once,
seed 0, sorted names; output not clipped; PSNR with peak 1 of the rescaled image); one realization per image
(the authors average 20). The official module gets the same counts, c = peak·(evaluate's noisy image).

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
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsefold.config import NoiseConfig
from sparsefold.datasets import list_images, load_image
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import evaluate_images, noisy_versions, psnr
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


@torch.no_grad()
def eval_release(src: Path, files: list[Path], classes: object) -> dict:
    """``sparsefold evaluate --convention dcea`` of the imported release (``evaluate_images``) and the official
    module on the very same counts: the noisy images that evaluate draws (``noisy_versions``, seed 0, sorted
    names) times the peak. The official estimate Q·exp(η̂) over max(x) is scored by the same PSNR."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = import_release("dcea", src, Path(tmp) / "ckpt")
        ours, meta = load_model(Path(tmp) / "ckpt")
    conf, ours = meta["model"], ours.eval()
    noise = NoiseConfig(kind="poisson", peak=conf["peak"])
    t0 = time.process_time()
    res = evaluate_images(ours, files, noise, with_ssim=False, convention="dcea")
    t_ours = time.process_time() - t0
    theirs = official_module(classes, conf, src)
    clean = [x / x.max() for x in (load_image(f, gray=True) for f in files)]  # the dcea convention's images
    rows, t_theirs = [], 0.0
    for f, x, y, mine in zip(files, clean, noisy_versions(clean, noise, seed=0), res["per_image"]):
        t1 = time.process_time()
        z, _, _ = theirs((y * noise.peak).round()[None], 0)  # the counts (y = counts / peak)
        t_theirs += time.process_time() - t1
        official = torch.exp(z)[0] / noise.peak  # = Q·exp(η̂) / max(x)
        rows.append({"image": f.name, "noisy": psnr(y, x), "official": psnr(official, x), "ours": mine["psnr"]})
        print(f"  {f.name}: official {rows[-1]['official']:.3f} dB, ours {rows[-1]['ours']:.3f} dB", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("noisy", "official", "ours")}
    return {"model": conf["name"], "params": summary["params"], "peak": noise.peak,
            "sha256": summary["source"]["sha256"], "images": [r["image"] for r in rows],
            "psnr_noisy": mean["noisy"], "psnr_official": mean["official"], "psnr_ours": mean["ours"],
            "diff_db": mean["ours"] - mean["official"],
            "max_per_image_diff_db": max(abs(r["ours"] - r["official"]) for r in rows), "per_image": rows,
            "cpu_s_per_image_ours": t_ours / len(rows), "cpu_s_per_image_official": t_theirs / len(rows),
            "command_ours": f"sparsefold evaluate <import of {src.name}> SET12 --convention dcea", "published": None}


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

"""Restoration beyond denoising, measured (issue 18): learned vs classical, one table per task, one run.

Every learned model is trained by ``sparsefold train`` on train400 patches under the same process-CPU budget
(``trainer.budget_cpu_seconds``, 1 thread), and scored by ``sparsefold evaluate`` (its training task, the
restoration convention of ``trainers/evaluate.py``: one generator seeded 0, the operator's draws then the
noise, image after image). The classical references run on the very same measurements
(``measured_versions``) in this process:

    ======  ====================================  =========================================  ==============
    task    test images                           classical                                  learned
    ======  ====================================  =========================================  ==============
    csmri   BSD68 256² centre crops; the          zero-filled Aᵀy; FISTA-TV                  admmnet, pgnet
            Shepp–Logan phantom (256²)
    sr      Set12, ×2 and ×4 (bicubic filter)     bicubic up-sampling                        pgnet, vdsr
    deblur  Set12, Gaussian and motion kernels    FISTA-TV                                   pgnet
    inpaint Set12, 50 % of the pixels missing     Aᵀy (masked); FISTA-TV                     pgnet
    csmri   the phantom (rows ``*_phantom``)      zero-filled Aᵀy; FISTA-TV (both λ);        admmnet(-tv)@ellipses
                                                  ADMM-TV, 100 and 1000 iterations
    ======  ====================================  =========================================  ==============

``admmnet@ellipses`` trains on 200 random ellipse phantoms (:func:`ellipse_phantoms`, seeded; validation on 4
others) instead of train400: the test phantom's domain, as MR images are the paper's; ``fista_tv@ellipses`` is
FISTA-TV with λ tuned on those 4 validation phantoms (``ELLIPSE_LAMBDAS``, ``ELLIPSE_ITERS`` × the iterations);
``admm_tv_N`` is ADMM on anisotropic TV (exact Fourier-domain x-update) for N iterations with admmnet-tv's λ, ρ, η:
the network untrained, at 100 stages what its training starts from, at 1000 converged.

FISTA-TV's λ is the best of a grid on 4 BSD432 images (not test images) measured the same way; it runs
``--fista-iters`` iterations of 5 dual (FGP) steps each; the json records the tuning images' PSNR at twice as
many iterations, to show it has converged (within 0.02 dB in a check at 100 → 300 × 20 on Set12).
The crops and the phantom are written under ``--work`` (outside the repository).

    python benchmarks/task_tables.py [--budget 300] [--only csmri,sr,deblur,inpaint] [--work /tmp/sparsefold-tasks]

Writes benchmarks/results/task_tables/ROW.json per row (so rows can run in parallel processes) and prints
the markdown tables of every row measured so far (``--table`` prints them without measuring).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from cli_run import sparsefold  # benchmarks/cli_run.py
from PIL import Image

from sparsefold.config import NoiseConfig, TaskConfig, load_config
from sparsefold.datasets import list_images, load_image
from sparsefold.models import build_model
from sparsefold.models.classical import bicubic_upsample, fista_tv
from sparsefold.trainers.evaluate import measured_versions, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "task_tables"
LAMBDAS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
# fista_tv@ellipses: λ tuned on 4 ellipse phantoms (the phantom's domain, noise-free: small λ wins, and converges
# slowly: ELLIPSE_ITERS × --fista-iters iterations)
ELLIPSE_LAMBDAS, ELLIPSE_ITERS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), 4
TV_ITERS = 5
LR = {"pgnet": 5e-4, "admmnet": 2e-3, "admmnet-tv": 1e-5, "vdsr": 1e-3}  # pgnet diverged on deblurring at 2e-3
# learned entry -> its model overrides: the paper configurations, and ADMM-Net started at anisotropic-TV ADMM:
# λ = θρ = 3e-5 (fista_tv@ellipses' pick), ρ = 0.002, η = 1.6, 100 stages (the best of a grid at init on the
# phantom: 83.2 / 92.2 dB at 20 / 33 %, against 58.6 / 64.9 with 30 stages at λ = 1e-3, ρ = 0.02), θ = 0.015 three
# steps of a PLF grid on [−0.05, 0.05] (so S_PLF = S_θ exactly); lr 1e-5, as Adam moves every parameter by ≈ lr a
# step and ρ is 0.002 (lr 1e-4 lost 2.3 dB on the phantom in 11 steps)
MODEL = {"pgnet": ["model.name=pgnet"], "admmnet": ["model.name=admmnet"], "vdsr": ["model.name=vdsr"],
         "admmnet-tv": ["model.name=admmnet", "model.filter_init=tv", "model.rho_init=0.002",
                        "model.threshold_init=0.015", "model.control_range=0.05", "model.control_points=21",
                        "model.depth=100"]}
# learned entry -> its data overrides (after the common ones): admmnet-tv trains on whole 256² images, the test
# phantom's operator (a 64² patch's variable-density mask is another operator)
DATA_OVERRIDES = {"admmnet-tv": ["data.patch_size=256", "data.batch_size=1"]}
# admm_tv_N: ADMM on anisotropic TV for N iterations = admmnet-tv untrained with N stages (one code: the model's).
# N = 100: what training starts from; N = 1000: run to convergence (88.56 / 96.31 dB on the phantom, against
# 88.39 / 95.69 at 400)
ADMM_TV_ITERS = {"admm_tv_100": 100, "admm_tv_1000": 1000}

# name -> (task overrides, noise σ, test sets, classical references, learned models)
ROWS: dict[str, tuple[list[str], float, list[str], list[str], list[str]]] = {
    "csmri_20": (["task.kind=csmri", "task.rate=0.2"], 0.0, ["bsd68_crop256", "phantom"], ["zero_filled", "fista_tv"],
                 ["admmnet", "pgnet"]),
    "csmri_33": (["task.kind=csmri", "task.rate=0.33"], 0.0, ["bsd68_crop256", "phantom"],
                 ["zero_filled", "fista_tv"], ["admmnet", "pgnet"]),
    "sr_x2": (["task.kind=sr", "task.factor=2"], 0.0, ["set12"], ["bicubic"], ["pgnet", "vdsr"]),
    "sr_x4": (["task.kind=sr", "task.factor=4"], 0.0, ["set12"], ["bicubic"], ["pgnet", "vdsr"]),
    "deblur_gaussian": (["task.kind=deblur", "task.kernel=gaussian"], 2.55, ["set12"], ["fista_tv"], ["pgnet"]),
    "deblur_motion": (["task.kind=deblur", "task.kernel=motion"], 2.55, ["set12"], ["fista_tv"], ["pgnet"]),
    "inpaint_50": (["task.kind=inpaint", "task.keep=0.5"], 2.55, ["set12"], ["zero_filled", "fista_tv"], ["pgnet"]),
    # MODEL@ellipses: trained on random ellipse phantoms (:func:`ellipse_phantoms`), the phantom's own domain
    "csmri_20_phantom": (["task.kind=csmri", "task.rate=0.2"], 0.0, ["phantom"],
                         ["zero_filled", "fista_tv", "fista_tv@ellipses", "admm_tv_100", "admm_tv_1000"],
                         ["admmnet@ellipses", "admmnet-tv@ellipses"]),
    "csmri_33_phantom": (["task.kind=csmri", "task.rate=0.33"], 0.0, ["phantom"],
                         ["zero_filled", "fista_tv", "fista_tv@ellipses", "admm_tv_100", "admm_tv_1000"],
                         ["admmnet@ellipses", "admmnet-tv@ellipses"]),
}


def test_sets(work: Path) -> dict[str, Path]:
    """Set12 as it is; BSD68 256² centre crops and the 256² phantom written once under ``work``."""
    crops, phantom = work / "bsd68_crop256", work / "phantom"
    if not crops.is_dir():
        crops.mkdir(parents=True)
        for f in list_images(DATA / "bsd68"):
            im = np.asarray(Image.open(f).convert("L"))
            top, left = (im.shape[0] - 256) // 2, (im.shape[1] - 256) // 2
            Image.fromarray(im[top:top + 256, left:left + 256]).save(crops / f"{f.stem}.png")
    if not phantom.is_dir():
        from skimage.data import shepp_logan_phantom
        from skimage.transform import resize

        phantom.mkdir(parents=True)
        x = resize(shepp_logan_phantom(), (256, 256), anti_aliasing=True)
        Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)).save(phantom / "shepp_logan.png")
    return {"set12": DATA / "set12", "bsd68_crop256": crops, "phantom": phantom}


def ellipse_phantoms(folder: Path, n: int, seed: int, size: int = 256) -> Path:
    """``n`` random Shepp–Logan-like phantoms written once to ``folder``: a bright skull ring, a dim head, 4–11
    ellipses of random size, angle and intensity (−0.2..0.4) added inside the head, clipped to [0, 1]. A
    training domain for the phantom (which is not among them), as MR images are for the paper's model."""
    if folder.is_dir():
        return folder
    from skimage.draw import ellipse

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        x, head = np.zeros((size, size)), np.zeros((size, size), bool)
        cy, cx = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
        ay, ax, rot = rng.uniform(0.40, 0.47) * size, rng.uniform(0.30, 0.40) * size, rng.uniform(-0.3, 0.3)
        x[ellipse(cy, cx, ay, ax, shape=x.shape, rotation=rot)] = 1.0
        t = rng.uniform(0.02, 0.05) * size
        inner = ellipse(cy, cx, ay - t, ax - t, shape=x.shape, rotation=rot)
        x[inner], head[inner] = rng.uniform(0.1, 0.3), True
        for _ in range(rng.integers(4, 12)):
            m = np.zeros_like(head)
            m[ellipse(cy + rng.uniform(-0.6, 0.6) * ay, cx + rng.uniform(-0.6, 0.6) * ax, rng.uniform(0.02, 0.25) * size,
                      rng.uniform(0.02, 0.15) * size, shape=x.shape, rotation=rng.uniform(0, np.pi))] = True
            x[m & head] += rng.uniform(-0.2, 0.4)
        Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)).save(folder / f"e{i:03d}.png")
    return folder


def task_of(overrides: list[str]) -> TaskConfig:
    return TaskConfig(**{o.split("=")[0][5:]: _value(o.split("=")[1]) for o in overrides})


def _value(v: str) -> str | float | int:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def score(files: list[Path], task: TaskConfig, sigma: float, method: Callable) -> dict:
    """Mean PSNR/SSIM of ``method(y, op)`` over ``files`` by the restoration convention, and CPU-s per image."""
    clean = [load_image(f) for f in files]
    ps, ss, c0 = [], [], time.process_time()
    for x, y, _, op in measured_versions(clean, task, NoiseConfig(sigma=sigma)):
        with torch.no_grad():
            out = method(y, op).squeeze(0).clamp(0, 1)
        ps.append(psnr(out, x))
        ss.append(ssim(out, x))
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "images": len(files),
            "cpu_sec_per_image": (time.process_time() - c0) / len(files)}


def classical(name: str, task: TaskConfig, lam: float, iters: int) -> Callable:
    """zero_filled, bicubic, ADMM-TV (``ADMM_TV_ITERS``), or FISTA-TV (either tuning) at ``lam`` for ``iters``
    iterations."""
    if name == "zero_filled":
        return lambda y, op: op.A_adjoint(y)
    if name == "bicubic":
        return lambda y, op: bicubic_upsample(y, task.factor)
    if name in ADMM_TV_ITERS:
        net = build_model(load_config(None, [*MODEL["admmnet-tv"], f"model.depth={ADMM_TV_ITERS[name]}"]).model)
        return lambda y, op: net(y, None, op)
    return lambda y, op: fista_tv(y, op, lam, iters=iters, tv_iters=TV_ITERS)


def tune_lambda(task: TaskConfig, sigma: float, iters: int, files: list[Path], lambdas: tuple[float, ...]) -> dict:
    """The FISTA-TV λ of ``lambdas`` with the best mean PSNR on the tuning ``files`` (not test images), and its
    PSNR there at twice the iterations."""
    grid = {lam: score(files, task, sigma, classical("fista_tv", task, lam, iters))["psnr"] for lam in lambdas}
    lam = max(grid, key=grid.__getitem__)
    twice = score(files, task, sigma, classical("fista_tv", task, lam, 2 * iters))["psnr"]
    return {"lambda": lam, "iters": iters, "tv_iters": TV_ITERS, "tuning_psnr": grid, "twice_iters_psnr": twice}


def train(entry: str, task: list[str], sigma: float, budget: float, work: Path, name: str) -> dict:
    """Train ``entry`` (MODEL, or MODEL@ellipses: on :func:`ellipse_phantoms`) under ``budget`` CPU-seconds."""
    model, _, domain = entry.partition("@")
    # a new run each time: a re-run of the row must not resume (or be refused by) the last one's checkpoints
    run = work / "runs" / f"{name}-{entry.replace('@', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    if domain == "ellipses":
        train_dir, val_dir = ellipse_phantoms(work / "ellipse_phantoms" / "train", 200, 0), \
            ellipse_phantoms(work / "ellipse_phantoms" / "val", 4, 1)
    else:
        train_dir, val_dir = DATA / "train400", DATA / "bsd432"
    over = [*MODEL[model], *task, f"noise.sigma={sigma}",
            f"data.train={train_dir}", f"data.val={val_dir}", "data.val_images=2",
            "data.patch_size=64", "data.batch_size=8", "data.num_workers=1", f"optim.lr={LR[model]}",
            "trainer.max_steps=1000000", f"trainer.budget_cpu_seconds={budget}", "trainer.val_every=1000000",
            "trainer.ckpt_every=1000000", f"trainer.output_dir={run.parent}", f"trainer.run_name={run.name}",
            "trainer.progress=false", "wandb.mode=disabled", "runtime.threads=1", *DATA_OVERRIDES.get(model, [])]
    out = sparsefold("train", *over)
    return {k: out.get(k) for k in ("steps", "seconds", "cpu_seconds", "checkpoint", "val_psnr")} | {"overrides": over}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=300.0, help="process CPU-seconds of training per learned model")
    p.add_argument("--only", default=",".join(ROWS), help="comma-separated rows (default: all)")
    p.add_argument("--images", type=int, default=0, help="first N images of each test set (0: all)")
    p.add_argument("--fista-iters", type=int, default=100)
    p.add_argument("--table", action="store_true", help="only print the tables of the rows measured so far")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparsefold-tasks"))
    a = p.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in [] if a.table else a.only.split(","):
        sets = test_sets(a.work)
        over, sigma, data, refs, learned = ROWS[name]
        task = task_of(over)
        row: dict = {"task": over, "sigma": sigma, "budget_cpu_seconds": a.budget, "scores": {}, "train": {}}
        tuning = {"fista_tv": lambda: (list_images(DATA / "bsd432")[:4], LAMBDAS, a.fista_iters),
                  "fista_tv@ellipses": lambda: (list_images(ellipse_phantoms(a.work / "ellipse_phantoms" / "val", 4,
                                                                             1)),
                                                ELLIPSE_LAMBDAS, ELLIPSE_ITERS * a.fista_iters)}
        for ref in set(refs) & set(tuning):  # a tuning set is built only for a row that asks for its reference
            files, lambdas, iters = tuning[ref]()
            row[ref] = tune_lambda(task, sigma, iters, files, lambdas)
        for model in learned:
            row["train"][model] = train(model, over, sigma, a.budget, a.work, name)
        for ds in data:
            files = list_images(sets[ds])[: a.images or None]
            cell = row["scores"][ds] = {}
            for ref in refs:
                lam, iters = row.get(ref, {}).get("lambda", 0.0), row.get(ref, {}).get("iters", a.fista_iters)
                cell[ref] = score(files, task, sigma, classical(ref, task, lam, iters))
            for model in learned:
                ckpt = row["train"][model]["checkpoint"]
                args = ["evaluate", ckpt, str(sets[ds]), "--sigma", str(sigma), "--images", str(a.images)]
                cell[model] = {k: v for k, v in sparsefold(*args).items() if k in ("psnr", "ssim", "images",
                                                                                   "cpu_sec_per_image", "params")}
            print(json.dumps({name: {ds: {k: round(v["psnr"], 2) for k, v in cell.items()}}}), flush=True)
        row["command"] = " ".join(["python", "benchmarks/task_tables.py", *sys.argv[1:]])
        row["date"] = time.strftime("%Y-%m-%d")
        (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=1, default=str) + "\n")
    done = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in ROWS if (RESULTS / f"{n}.json").is_file()}
    print(markdown(done))


def markdown(rows: dict) -> str:
    """One table: a line per (row, test set), PSNR / SSIM per method (— where a method does not apply), and
    the steps each learned model trained in its budget."""
    methods = [m for m in ("zero_filled", "bicubic", "fista_tv", "fista_tv@ellipses", "admm_tv_100", "admm_tv_1000",
                           "admmnet", "admmnet@ellipses",
                           "admmnet-tv@ellipses", "pgnet", "vdsr")
               if any(m in cell for row in rows.values() for cell in row["scores"].values())]
    lines = ["| task | test set | σ | " + " | ".join(methods) + " | steps in the budget |",
             "|" + "---|" * (len(methods) + 4)]
    for name, row in rows.items():
        steps = ", ".join(f"{m} {t['steps']}" for m, t in row["train"].items())
        for ds, cell in row["scores"].items():
            scores = [f"{cell[m]['psnr']:.2f} / {cell[m]['ssim']:.3f}" if m in cell else "—" for m in methods]
            lines.append(f"| {name} | {ds} | {row['sigma']:g} | " + " | ".join(scores) + f" | {steps} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""``sparsefold`` command line (also ``python -m sparsefold``).

    sparsefold shards IMAGE_DIR OUT_DIR [--shard-size N] [--rgb]
    sparsefold train [CONFIG.yaml] [section.key=value ...]
    sparsefold evaluate CHECKPOINT DATA_DIR [--sigma 25] [--images N]
    sparsefold denoise [CHECKPOINT] INPUT OUTPUT
    sparsefold models [--json]
    sparsefold sweep SPEC [key=value ...] [--dry-run] [--retry-errored]
    sparsefold report SWEEP_DIR [--test-dir DIR] [--images N]
    sparsefold launch [CONFIG] [key=value ...] --address ADDR [--follow] [--sweep]   # a Ray Job on a cluster

Scriptable: human-readable progress goes to stderr; the last stdout line of ``train`` and ``evaluate``
is one JSON object. CHECKPOINT is a checkpoint directory, a run directory (its latest checkpoint),
or the name of a bundled model (``sparsefold models``). Exit code 2 on a bad config or argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

QUICKSTART = "quickstart.yaml"
DEFAULT_MODEL = "cscnet"  # the bundled sigma=25 CSCNet (sparsefold/bundled/cscnet)


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, default=str), flush=True)


def cmd_shards(a: argparse.Namespace) -> int:
    from sparsefold.datasets import list_images, write_shards

    files = list_images(a.image_dir)
    if not files:
        raise SystemExit(f"error: {a.image_dir}: no images found")
    pattern = write_shards(files, a.out_dir, shard_size=a.shard_size, gray=not a.rgb, prefix=a.prefix)
    print(f"[sparsefold] wrote {len(files)} images into shards", file=sys.stderr)
    print(pattern)
    return 0


def load_run_config(config: str | None, overrides: list[str]):
    from sparsefold.config import load_config

    if config is None or "=" in config:  # no file: the packaged quickstart
        overrides = ([config] if config else []) + overrides
        config = str(resources.files("sparsefold") / "configs" / QUICKSTART)
    return load_config(config, overrides)


def cmd_train(a: argparse.Namespace) -> int:
    cfg = load_run_config(a.config, a.overrides)  # validated before any Ray resource is requested
    if cfg.trainer.use_ray:
        from sparsefold.trainers.ray_train import fit

        out = fit(cfg)
    else:
        from sparsefold.trainers.loop import train

        out = train(cfg)
    print(f"[sparsefold] checkpoint: {out.get('checkpoint')}  val PSNR: {out.get('val_psnr')}", file=sys.stderr)
    _print_json(out)
    return 0


def noise_for(a: argparse.Namespace, meta: dict):
    """The evaluation noise: the checkpoint's training noise kind (σ range → its middle), with the
    command line's --noise/--sigma/--peak/--trials on top."""
    from sparsefold.config import NoiseConfig, dataclass_from_dict

    trained = dict((meta.get("run") or {}).get("noise") or {})
    d = {"kind": trained.get("kind", "gaussian"), "sigma": trained.get("sigma", 25.0),
         "peak": trained.get("peak", 4.0), "trials": trained.get("trials", 1)}
    if trained.get("sigma_max") is not None:
        d["sigma"] = 0.5 * (d["sigma"] + trained["sigma_max"])
    for key in ("noise", "sigma", "peak", "trials"):
        if getattr(a, key, None) is not None:
            d["kind" if key == "noise" else key] = getattr(a, key)
    return dataclass_from_dict(NoiseConfig, d, "noise")


def cmd_evaluate(a: argparse.Namespace) -> int:
    from sparsefold.datasets import list_images
    from sparsefold.models import count_parameters
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import evaluate_images

    model, meta = load_model(a.checkpoint)
    files = list_images(a.data_dir)[: a.images or None]
    if not files:
        raise SystemExit(f"error: {a.data_dir}: no images found")
    gray = meta["model"].get("channels", 1) == 1
    noise = noise_for(a, meta)
    res = evaluate_images(model, files, noise, gray=gray, seed=a.seed, blind=a.blind)
    out = {k: res[k] for k in ("psnr", "ssim", "images", "sec_per_image", "cpu_sec_per_image", "input_psnr")}
    out.update(params=count_parameters(model), model=meta["model"]["name"], checkpoint=meta["path"],
               noise=noise.kind, sigma=noise.sigma if noise.kind == "gaussian" else None,
               peak=noise.peak if noise.kind == "poisson" else None, blind=a.blind, data=str(a.data_dir))
    if a.per_image:
        for row in res["per_image"]:
            print(f"{row['file']}\t{row['psnr']:.3f}", file=sys.stderr)
    _print_json(out)
    return 0


def cmd_denoise(a: argparse.Namespace) -> int:
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import denoise_path

    if len(a.paths) not in (2, 3):
        raise ValueError("denoise takes [CHECKPOINT] INPUT OUTPUT")
    checkpoint, src, dst = ([DEFAULT_MODEL] + a.paths)[-3:]
    model, meta = load_model(checkpoint)
    adapt = None
    if a.adapt_steps > 0:
        from sparsefold.trainers.adapt import adapt_to_image

        adapt = lambda m, y: adapt_to_image(m, y, a.sigma, steps=a.adapt_steps, lr=a.adapt_lr)
    written = denoise_path(model, Path(src), Path(dst), gray=meta["model"].get("channels", 1) == 1,
                           sigma=a.sigma, adapt=adapt)
    for p in written:
        print(p)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from sparsefold.models import MODELS, build_model, count_parameters
    from sparsefold.trainers.checkpoint import BUNDLED_DIR, is_complete, load_model, read_config

    archs = [{"name": n, "params": count_parameters(build_model(e.config())), "summary": e.summary}
             for n, e in MODELS.items()]
    bundled = []
    for d in sorted(BUNDLED_DIR.iterdir()) if BUNDLED_DIR.is_dir() else []:
        if is_complete(d):
            meta = read_config(d)
            model, _ = load_model(d)
            noise = meta["run"]["noise"]
            bundled.append({"name": d.name, "model": meta["model"]["name"], "params": count_parameters(model),
                            "noise": noise["kind"], "sigma": noise["sigma"] if noise["kind"] == "gaussian" else None,
                            "peak": noise["peak"] if noise["kind"] == "poisson" else None, "path": str(d)})
    if a.json:
        _print_json({"architectures": archs, "bundled": bundled})
        return 0
    print("architectures (default configuration):")
    for r in archs:
        print(f"  {r['name']:<10} {r['params']:>9,} params  {r['summary']}")
    print("bundled models:")
    for r in bundled or [{"name": "(none)", "model": "", "params": 0, "sigma": ""}]:
        level = f"sigma={r['sigma']}" if r.get("sigma") is not None else f"{r.get('noise')} peak={r.get('peak')}"
        print(f"  {r['name']:<16} {r['model']:<10} {r['params']:>9,} params  {level}")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from sparsefold.sweeps.spec import load_spec

    spec = load_spec(a.spec, a.overrides)  # validated (every point of the space) before Ray starts
    plan = {"name": spec.name, "sweep_dir": str(spec.sweep_dir), "trials": spec.num_trials,
            "space": {d.key: {d.kind: list(d.values)} for d in spec.space}, "search": spec.search.kind,
            "scheduler": spec.scheduler.kind, "max_t": spec.max_t, "time_attr": spec.scheduler.time_attr}
    if a.dry_run:
        _print_json(plan)
        return 0
    from sparsefold.sweeps.runner import run_sweep

    out = run_sweep(spec, retry_errored=a.retry_errored)
    for t in out["results"]:
        print(f"[sparsefold] {t['trial_id']} {t['status']:<8} steps {t['steps']:>6}/{t['max_steps']}  "
              f"best val PSNR {t['best_val_psnr']}  {t['params']}", file=sys.stderr)
    print(f"[sparsefold] next: sparsefold report {spec.sweep_dir}", file=sys.stderr)
    _print_json({k: v for k, v in out.items() if k != "results"})
    return 0 if out["asha"]["finished"] else 1


def cmd_report(a: argparse.Namespace) -> int:
    from sparsefold.sweeps.report import make_report

    test_dir = None if a.no_test else a.test_dir
    if test_dir is None and not a.no_test and Path("../shared/data/bsd68").is_dir():
        test_dir = Path("../shared/data/bsd68")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out = make_report(a.sweep_dir, test_dir, images=a.images, size=a.size, repeats=a.repeats, out=a.out,
                      wandb_mode=a.wandb_mode)
    print(Path(out["files"]["markdown"]).read_text(), file=sys.stderr)
    _print_json({k: v for k, v in out.items() if k != "rows"})
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsefold", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shards", help="write WebDataset shards from an image folder")
    s.add_argument("image_dir", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--shard-size", type=int, default=100)
    s.add_argument("--prefix", default="train")
    s.add_argument("--rgb", action="store_true", help="keep colour (default: convert to gray)")
    s.set_defaults(fn=cmd_shards)
    s = sub.add_parser("train", help="train a model (plain process or Ray Train DDP)")
    s.add_argument("config", nargs="?", help="YAML config (default: the packaged quickstart)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("evaluate", help="PSNR/SSIM on an image folder by the shared convention")
    s.add_argument("checkpoint")
    s.add_argument("data_dir", type=Path)
    s.add_argument("--noise", choices=("gaussian", "poisson", "binomial"), help="default: the checkpoint's")
    s.add_argument("--sigma", type=float, help="Gaussian σ in 0..255 (default: the checkpoint's training σ)")
    s.add_argument("--peak", type=float, help="Poisson peak (default: the checkpoint's)")
    s.add_argument("--trials", type=int, help="Binomial trials (default: the checkpoint's)")
    s.add_argument("--blind", action="store_true", help="do not tell the model σ (noise-adaptive models estimate it)")
    s.add_argument("--images", type=int, default=0, help="first N sorted images (0: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-image", action="store_true")
    s.set_defaults(fn=cmd_evaluate)
    s = sub.add_parser("denoise", help="denoise an image or a folder (default model: the bundled cscnet)")
    s.add_argument("paths", nargs="+", metavar="[CHECKPOINT] INPUT OUTPUT")
    s.add_argument("--sigma", type=float, help="known noise σ (0..255); default: estimated from each image")
    s.add_argument("--adapt-steps", type=int, default=0,
                   help="test-time adaptation: fine-tune on each noisy image for N steps first (LIDIA)")
    s.add_argument("--adapt-lr", type=float, default=1e-4)
    s.set_defaults(fn=cmd_denoise)
    s = sub.add_parser("models", help="list architectures and bundled models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)
    s = sub.add_parser("sweep", help="Ray Tune sweep of Ray Train runs (ASHA / Optuna / grid) from a YAML spec")
    s.add_argument("spec", help="spec YAML, or the name of a packaged one (sparsefold/sweeps/*.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value: run-config keys go to the base, spec keys to the spec")
    s.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    s.add_argument("--retry-errored", action="store_true", help="on resume, also re-run errored trials")
    s.set_defaults(fn=cmd_sweep)
    s = sub.add_parser("report", help="table + Pareto plot (PSNR vs parameters / latency) of a sweep")
    s.add_argument("sweep_dir", type=Path)
    s.add_argument("--test-dir", type=Path, help="test images (default: ../shared/data/bsd68 if present)")
    s.add_argument("--no-test", action="store_true", help="skip the test-set evaluation")
    s.add_argument("--images", type=int, default=0, help="first N sorted test images (0: all)")
    s.add_argument("--size", type=int, default=256, help="side of the latency / FLOPs image")
    s.add_argument("--repeats", type=int, default=5, help="timed forward passes (median)")
    s.add_argument("--threads", type=int, default=0, help="torch threads for the latency (0: torch default)")
    s.add_argument("--out", type=Path, help="output folder (default: SWEEP_DIR/report)")
    s.add_argument("--wandb-mode", choices=("auto", "online", "offline", "disabled"), help="default: the sweep's")
    s.set_defaults(fn=cmd_report)
    from sparsefold.launch import add_parser as add_launch

    add_launch(sub)  # sparsefold/launch.py
    return p


def main(argv: list[str] | None = None) -> int:
    from sparsefold.config import ConfigError

    a = parser().parse_args(argv)
    from sparsefold.runtime import configure_cpu_allocator

    configure_cpu_allocator()  # process-wide; before the first large tensor exists
    try:
        return a.fn(a)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2

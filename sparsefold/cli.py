"""``sparsefold`` command line (also ``python -m sparsefold``).

    sparsefold shards IMAGE_DIR OUT_DIR [--shard-size N] [--rgb]
    sparsefold train [CONFIG.yaml] [section.key=value ...]
    sparsefold evaluate CHECKPOINT DATA_DIR [--sigma 25] [--images N]
    sparsefold denoise [CHECKPOINT] INPUT OUTPUT
    sparsefold models [--json]

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


def cmd_evaluate(a: argparse.Namespace) -> int:
    from sparsefold.config import NoiseConfig
    from sparsefold.datasets import list_images
    from sparsefold.models import count_parameters
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import evaluate_images

    model, meta = load_model(a.checkpoint)
    files = list_images(a.data_dir)[: a.images or None]
    if not files:
        raise SystemExit(f"error: {a.data_dir}: no images found")
    gray = meta["model"].get("channels", 1) == 1
    res = evaluate_images(model, files, NoiseConfig(sigma=a.sigma), gray=gray, seed=a.seed)
    out = {k: res[k] for k in ("psnr", "ssim", "images", "sec_per_image", "input_psnr")}
    out.update(params=count_parameters(model), model=meta["model"]["name"], checkpoint=meta["path"],
               sigma=a.sigma, data=str(a.data_dir))
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
    written = denoise_path(model, Path(src), Path(dst), gray=meta["model"].get("channels", 1) == 1)
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
            bundled.append({"name": d.name, "model": meta["model"]["name"], "params": count_parameters(model),
                            "sigma": meta["run"]["noise"]["sigma"], "path": str(d)})
    if a.json:
        _print_json({"architectures": archs, "bundled": bundled})
        return 0
    print("architectures (default configuration):")
    for r in archs:
        print(f"  {r['name']:<10} {r['params']:>9,} params  {r['summary']}")
    print("bundled models:")
    for r in bundled or [{"name": "(none)", "model": "", "params": 0, "sigma": ""}]:
        print(f"  {r['name']:<10} {r['model']:<8} {r['params']:>9,} params  sigma={r['sigma']}")
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
    s.add_argument("--sigma", type=float, default=25.0)
    s.add_argument("--images", type=int, default=0, help="first N sorted images (0: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-image", action="store_true")
    s.set_defaults(fn=cmd_evaluate)
    s = sub.add_parser("denoise", help="denoise an image or a folder (default model: the bundled cscnet)")
    s.add_argument("paths", nargs="+", metavar="[CHECKPOINT] INPUT OUTPUT")
    s.set_defaults(fn=cmd_denoise)
    s = sub.add_parser("models", help="list architectures and bundled models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)
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

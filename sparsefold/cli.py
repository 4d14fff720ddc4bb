# PYTHON_ARGCOMPLETE_OK  (argcomplete: this command completes its arguments)
"""``sparsefold`` command line (also ``python -m sparsefold``).

    sparsefold --version
    sparsefold shards IMAGE_DIR OUT_DIR [--shard-size N] [--rgb] [--quiet]
    sparsefold train [CONFIG.yaml] [section.key=value ...] [--print-config]
    sparsefold evaluate CHECKPOINT DATA_DIR [--sigma 25] [--images N] [--quiet]
    sparsefold denoise [CHECKPOINT] INPUT OUTPUT [--quiet]
    sparsefold restore CHECKPOINT INPUT OUTPUT [--mask M] [--kernel K] [--simulate]   # sr, deblur, inpaint, csmri
    sparsefold models [--json]
    sparsefold export CHECKPOINT OUT.onnx|OUT.pt
    sparsefold import FAMILY SRC OUT [--sigma S] [--overwrite]    # an official release -> a checkpoint
    sparsefold sweep SPEC [key=value ...] [--dry-run] [--retry-errored]
    sparsefold report SWEEP_DIR [--test-dir DIR] [--images N]
    sparsefold launch [CONFIG] [key=value ...] --address ADDR [--follow] [--sweep]   # a Ray Job on a cluster

Scriptable: human-readable progress goes to stderr; the last stdout line of ``train`` and ``evaluate``
is one JSON object. CHECKPOINT is a checkpoint directory, a run directory (its latest checkpoint),
the name of a bundled model (``sparsefold models``) or a W&B model artifact
(``wandb:ENTITY/PROJECT/NAME:ALIAS``). Every failure is one stderr line; exit code 2 on
bad input, 1 on a failed run (policy: :func:`main`); ``sparsefold --debug ...`` adds the traceback.
Long commands (evaluate, denoise of a folder, shards) show a progress bar on stderr when it is a terminal,
never with ``--quiet``. ``sparsefold --help`` shows plain text (DESCRIPTION, EPILOG below), not this docstring.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from sparsefold import __version__
from sparsefold.config import (
    EVAL_CONVENTIONS,
    ConfigError,
    NoiseConfig,
    TaskConfig,
    dataclass_from_dict,
    load_run_config,
)
from sparsefold.errors import InputError, SparsefoldError
from sparsefold.launch import add_parser as add_launch
from sparsefold.launch import mask_secrets
from sparsefold.models import MODELS
from sparsefold.trainers.provenance import git_commit
from sparsefold.trainers.storage import bundled_models, read_config

DEFAULT_MODEL = "cdlnet-blind"  # the bundled blind CDLNet, σ 0..55 estimated per image (sparsefold/bundled/cdlnet-blind)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (inf, NaN: not JSON) replaced by None, recursively; tuples become
    lists and anything else JSON cannot hold becomes its ``str``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # a numpy / torch scalar
        return json_safe(obj.item())
    return str(obj)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def memory_size(text: str) -> int:
    """``--max-memory``: bytes, or a number with K, M, G or T (binary units; a trailing B or iB is optional):
    ``512M``, ``1.5G``, ``2GiB``."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 512M or 2G, got {text!r}")
    return int(value)


MAX_MEMORY_HELP = ("memory for one forward pass, e.g. 512M or 2G (default: half the available RAM; on GPU half "
                   "the free GPU memory); larger images are denoised in overlapping tiles, with the same result")


def version_text() -> str:
    """``sparsefold --version``: the installed distribution's version and, in a git checkout of the project,
    the commit (trainers/provenance.py: three quick ``git`` calls, no torch)."""
    try:
        version = metadata.version("sparsefold")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = __version__
    commit, dirty = git_commit()
    if commit == "unknown":
        return f"sparsefold {version}"
    return f"sparsefold {version} (git {commit[:12]}{', with uncommitted changes' if dirty else ''})"


class VersionAction(argparse.Action):
    """``--version``: like argparse's own, but the text (a git call) is made only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        print(version_text(), flush=True)
        parser.exit()


def _stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(a: argparse.Namespace, total: int, what: str, unit: str = "image"
                 ) -> Callable[[Iterable[Any]], Iterable[Any]] | None:
    """A tqdm bar on stderr over ``total`` images (what the library loops take as ``progress``), or None:
    under ``--quiet`` or when stderr is not a terminal (a log file, a pipe, a script's capture)."""
    if a.quiet or not _stderr_is_terminal():
        return None
    from tqdm import tqdm  # here, not at the top: ~0.1 s, and only a terminal run needs it

    return lambda it: tqdm(it, total=total, desc=what, unit=unit, file=sys.stderr, leave=False,
                           dynamic_ncols=True)


def _print_json(obj: dict) -> None:
    """One line of strict JSON on stdout: a non-finite number is ``null``."""
    print(json.dumps(json_safe(obj), allow_nan=False), flush=True)


def cmd_shards(a: argparse.Namespace) -> int:
    from sparsefold.datasets import list_images, read_index, write_shards

    files = list_images(a.image_dir)
    if not files:
        raise SystemExit(f"error: {a.image_dir}: no images found")
    pattern = write_shards(files, a.out_dir, shard_size=a.shard_size, gray=not a.rgb, prefix=a.prefix,
                           progress=progress_bar(a, len(files), "shards"))
    skipped = len(read_index(a.out_dir).get("skipped", []))  # each was said on stderr while writing
    if not a.quiet:
        print(f"[sparsefold] wrote {len(files) - skipped} images into shards"
              + (f", skipped {skipped} unreadable (listed in index.json)" if skipped else ""), file=sys.stderr)
    print(pattern)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    if a.print_config:  # validated (a bad value: ConfigError, exit 2); no data path is looked at, nothing runs
        cfg = load_run_config(a.config, a.overrides)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="", flush=True)
        return 0
    cfg = load_run_config(a.config, a.overrides, local=True)  # before torch, Ray, W&B or any data is touched
    if cfg.ray.enabled:
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
    trained = dataclass_from_dict(NoiseConfig, (meta.get("run") or {}).get("noise") or {}, "noise").at_evaluation()
    d = {"kind": trained.kind, "sigma": trained.sigma, "peak": trained.peak, "trials": trained.trials}
    for key in ("noise", "sigma", "peak", "trials"):
        if getattr(a, key, None) is not None:
            d["kind" if key == "noise" else key] = getattr(a, key)
    return dataclass_from_dict(NoiseConfig, d, "noise")


def check_sigma(sigma: float | None) -> None:
    """``--sigma`` of evaluate and denoise: None (the default) or a noise std in 0..255 (NaN and inf refused)."""
    if sigma is not None and not 0 <= sigma <= 255:  # NaN fails the comparison too
        raise InputError(f"--sigma: must be in 0..255 (the noise std on the 8-bit scale), got {sigma:g}")


def cmd_evaluate(a: argparse.Namespace) -> int:
    from sparsefold.datasets import list_images
    from sparsefold.models import count_parameters
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import evaluate_on_task

    if a.images < 0:
        raise InputError(f"--images: must be >= 0 (0: all), got {a.images}")
    check_sigma(a.sigma)
    model, meta = load_model(a.checkpoint)
    files = list_images(a.data_dir)[: a.images or None]
    if not files:
        raise InputError(f"{a.data_dir}: no images found (png/jpg/bmp/tif); point DATA_DIR at an image folder")
    gray = meta["model"].get("channels", 1) == 1
    noise = noise_for(a, meta)
    task = dataclass_from_dict(TaskConfig, meta.get("run", {}).get("task", {}), "task")  # what it was trained for
    res = evaluate_on_task(model, files, task, noise, gray=gray, seed=a.seed, blind=a.blind, max_memory=a.max_memory,
                           convention=a.convention, progress=progress_bar(a, len(files), "evaluate"))
    out = {k: res[k] for k in ("psnr", "ssim", "images", "sec_per_image", "cpu_sec_per_image", "input_psnr")}
    out["task"] = task.kind
    out.update(params=count_parameters(model), model=meta["model"]["name"], checkpoint=meta["path"],
               noise=noise.kind, sigma=noise.sigma if noise.kind == "gaussian" else None,
               peak=noise.peak if noise.kind == "poisson" else None, blind=a.blind, data=str(a.data_dir),
               convention=a.convention)
    if a.per_image:
        for row in res["per_image"]:
            print(f"{row['file']}\t{row['psnr']:.3f}", file=sys.stderr)
    _print_json(out)
    return 0


def cmd_denoise(a: argparse.Namespace) -> int:
    """Arguments and output names are checked before the model loads (see ``plan_outputs``); written
    paths go to stdout. An unreadable INPUT file is one error line; in a folder job the unreadable
    images are listed on stderr at the end, the others written, and the exit code is 2."""
    from sparsefold.datasets.images import plan_outputs
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import denoise_path

    if len(a.paths) not in (2, 3):
        raise InputError("denoise takes [CHECKPOINT] INPUT OUTPUT")
    check_sigma(a.sigma)
    checkpoint, src, dst = ([DEFAULT_MODEL] + a.paths)[-3:]
    pairs = plan_outputs(src, dst, overwrite=a.overwrite)
    model, meta = load_model(checkpoint)
    adapt = None
    if a.adapt_steps > 0:
        from sparsefold.trainers.adapt import adapt_to_image

        adapt = lambda m, y: adapt_to_image(m, y, a.sigma, steps=a.adapt_steps, lr=a.adapt_lr)
    bar = progress_bar(a, len(pairs), "denoise") if Path(src).is_dir() else None  # a folder: one step per file
    written, failed = denoise_path(model, pairs, gray=meta["model"].get("channels", 1) == 1,
                                   sigma=a.sigma, adapt=adapt, max_memory=a.max_memory, progress=bar)
    for p in written:
        print(p)
    if failed and Path(src).is_file():
        raise InputError(failed[0][1])
    for _, why in failed:
        print(f"error: {why}", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(pairs)} images failed (listed above); the other {len(written)} "
              "were written", file=sys.stderr)
        return 2
    return 0


def cmd_restore(a: argparse.Namespace) -> int:
    """``denoise`` for any task: the checkpoint's operator (trainers/restore.py), or ``--simulate`` from clean
    images. Outputs, and ``--measurement`` files, are planned and checked before the model loads."""
    from sparsefold.datasets.images import plan_outputs
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.evaluate import denoise_path
    from sparsefold.trainers.restore import restore_path

    check_sigma(a.sigma)
    pairs = plan_outputs(a.input, a.output, overwrite=a.overwrite)
    shown = plan_outputs(a.input, a.measurement, overwrite=a.overwrite) if a.measurement else []
    clash = {t.resolve() for _, t in pairs} & {t.resolve() for _, t in shown}
    if clash:
        raise InputError(f"{sorted(clash)[0]}: --measurement and OUTPUT name the same file; give another")
    if a.simulate and (a.mask or a.kernel):
        raise InputError("--mask/--kernel describe a real measurement; --simulate draws them as evaluate does")
    model, meta = load_model(a.checkpoint)
    task = dataclass_from_dict(TaskConfig, meta.get("run", {}).get("task", {}), "task")  # what it was trained for
    gray = meta["model"].get("channels", 1) == 1
    bar = progress_bar(a, len(pairs), "restore") if Path(a.input).is_dir() else None
    if task.kind == "denoise" and not a.simulate:  # exactly ``denoise`` (tiles, any size)
        written, failed = denoise_path(model, pairs, gray=gray, sigma=a.sigma, progress=bar)
        for _, why in failed:
            print(f"error: {why}", file=sys.stderr)
        for p in written:
            print(p)
        return 2 if failed else 0
    done = restore_path(model, pairs, task, noise_for(a, meta), gray=gray, simulate=a.simulate, seed=a.seed,
                        mask=a.mask, kernel=a.kernel, measurements=[t for _, t in shown] or None, progress=bar)
    for r in done:
        if r.psnr is not None:
            print(f"[sparsefold] {r.source.name}: A^T y {r.input_psnr:.2f} dB -> {r.psnr:.2f} dB ({task.kind})",
                  file=sys.stderr)
        print(r.target)
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    """An authors' release -> a checkpoint directory (``trainers/importers.py``); SRC is only read."""
    from sparsefold.trainers.importers import import_release

    check_sigma(a.sigma)
    out = import_release(a.family, a.src, a.out, sigma=a.sigma, overwrite=a.overwrite)
    print(f"[sparsefold] imported {a.src} -> {out['checkpoint']} ({out['model']}, {out['params']:,} params, "
          f"{out['noise']})", file=sys.stderr)
    _print_json(out)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    """A checkpoint -> ONNX (OUT.onnx) or TorchScript (OUT.pt), dynamic batch and H×W (trainers/export.py)."""
    from sparsefold.trainers.export import export_checkpoint

    out = export_checkpoint(a.checkpoint, a.out)
    print(f"[sparsefold] exported {out['model']} ({out['checkpoint']}) -> {out['output']} "
          f"(inputs: {', '.join(out['inputs'])})", file=sys.stderr)
    _print_json(out)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    """Lists without building a model (a build runs the power-method init: seconds): an architecture's count
    is its registry entry's, a bundled model's the ``params`` its config.json was bundled with (both are
    checked against a built model by the tests). Imports no torch (tests/test_registry.py checks it)."""
    archs = [{"name": n, "params": e.params, "summary": e.summary} for n, e in MODELS.items()]
    bundled = []
    for d in bundled_models():
        meta = read_config(d)
        noise = meta["run"]["noise"]
        bundled.append({"name": d.name, "model": meta["model"]["name"], "params": meta["params"],
                        "noise": noise["kind"], "sigma": noise["sigma"] if noise["kind"] == "gaussian" else None,
                        "sigma_max": noise.get("sigma_max") if noise["kind"] == "gaussian" else None,
                        "peak": noise["peak"] if noise["kind"] == "poisson" else None, "path": str(d)})
    if a.json:
        _print_json({"architectures": archs, "bundled": bundled})
        return 0
    print("architectures (default configuration):")
    for r in archs:
        print(f"  {r['name']:<10} {r['params']:>9,} params  {r['summary']}")
    print("bundled models:")
    for r in bundled or [{"name": "(none)", "model": "", "params": 0, "sigma": ""}]:
        level = (f"{r.get('noise')} peak={r.get('peak')}" if r.get("sigma") is None else f"sigma={r['sigma']:g}"
                 + (f"..{r['sigma_max']:g} (blind)" if r.get("sigma_max") is not None else ""))
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

    test_dir = None if a.no_test else a.test_dir  # none: trials ranked by their best val PSNR
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)

    def trial_bar(trials: list[dict]) -> Iterable[dict]:  # the trials are known once the report read the sweep
        bar = progress_bar(a, len(trials), "report", unit="trial")
        return bar(trials) if bar is not None else trials

    out = make_report(a.sweep_dir, test_dir, images=a.images, size=a.size, repeats=a.repeats, out=a.out,
                      wandb_mode=a.wandb_mode, progress=trial_bar)
    print(Path(out["files"]["markdown"]).read_text(), file=sys.stderr)
    _print_json({k: v for k, v in out.items() if k != "rows"})
    return 0


DESCRIPTION = "sparsefold: train, evaluate and run deep-unfolded sparse-coding denoisers (also: python -m sparsefold)."
EPILOG = ("Scriptable: messages and progress bars go to stderr; the last stdout line of train and evaluate is one "
          "JSON object. CHECKPOINT is a checkpoint directory, a run directory (its latest checkpoint), the name of "
          "a bundled model (sparsefold models) or a W&B model artifact (wandb:ENTITY/PROJECT/NAME:ALIAS). Every "
          "failure is one stderr line; exit code 2 on bad input, 1 on a failed run; --debug adds the traceback. "
          "Options of a command: sparsefold COMMAND --help.")
CHECKPOINT_HELP = ("checkpoint directory, run directory (its latest checkpoint), bundled model name (sparsefold "
                   "models) or wandb:ENTITY/PROJECT/NAME:ALIAS")
QUIET_HELP = "no progress bar (shown otherwise when stderr is a terminal)"


def add_global_flags(p: argparse.ArgumentParser, default) -> None:
    """--debug and --verbose, accepted before and after the command (``sparsefold --debug report ...`` and
    ``sparsefold report ... --debug``)."""
    p.add_argument("--debug", action="store_true", default=default,
                   help="print the traceback of an error too (also: SPARSEFOLD_DEBUG=1)")
    p.add_argument("--verbose", action="store_true", default=default,
                   help="Ray runs and sweeps: Ray's own logs and warnings and every worker's output on the terminal "
                   "too (otherwise only in the run's ray_logs/ folder; also: SPARSEFOLD_VERBOSE=1)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsefold", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action=VersionAction, help="print the version (and git commit) and exit")
    add_global_flags(p, default=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="one of:")
    s = sub.add_parser("shards", help="write WebDataset shards from an image folder")
    s.add_argument("image_dir", type=Path, help="folder of images (png/jpg/bmp/tif directly inside it)")
    s.add_argument("out_dir", type=Path, help="folder for the PREFIX-NNNNNN.tar shards and index.json (created; "
                   "old shards with the same prefix are removed)")
    s.add_argument("--shard-size", type=int, default=100, help="images per shard (default: 100)")
    s.add_argument("--prefix", default="train", help="shard file name prefix: letters, digits, _ or - (default: train)")
    s.add_argument("--rgb", action="store_true", help="keep colour (default: convert to gray)")
    s.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP + " and no summary line")
    s.set_defaults(fn=cmd_shards)
    s = sub.add_parser("train", help="train a model (plain process or Ray Train DDP)")
    s.add_argument("config", nargs="?", help="YAML config (default: the packaged quickstart)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config as YAML and exit (trains nothing, reads no data)")
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("evaluate", help="PSNR/SSIM on an image folder by the shared convention")
    s.add_argument("checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("data_dir", type=Path, help="folder of clean images; seeded noise is added to each")
    s.add_argument("--noise", choices=("gaussian", "poisson", "binomial"), help="default: the checkpoint's")
    s.add_argument("--sigma", type=float, help="Gaussian σ in 0..255 (default: the checkpoint's training σ)")
    s.add_argument("--peak", type=float, help="Poisson peak (default: the checkpoint's)")
    s.add_argument("--trials", type=int, help="Binomial trials (default: the checkpoint's)")
    s.add_argument("--blind", action="store_true", help="do not tell the model σ (noise-adaptive models estimate it)")
    s.add_argument("--images", type=int, default=0, help="first N >= 0 sorted images (0: all)")
    s.add_argument("--seed", type=int, default=0, help="seed of the added noise (default: 0)")
    s.add_argument("--per-image", action="store_true", help="also print each image's PSNR on stderr")
    s.add_argument("--convention", choices=EVAL_CONVENTIONS, default="shared",
                   help="shared: the benchmark convention (output clipped to [0, 1]); dcea: the DCEA code's Poisson "
                        "convention (each image divided by its maximum, output not clipped)")
    s.add_argument("--max-memory", type=memory_size, help=MAX_MEMORY_HELP)
    s.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    s.set_defaults(fn=cmd_evaluate)
    s = sub.add_parser("denoise", help="denoise an image or a folder (default model: the bundled blind cdlnet-blind)",
                       usage="%(prog)s [-h] [options] [CHECKPOINT] INPUT OUTPUT",
                       description="Never writes over an input; refuses an existing output unless --overwrite and "
                       "two inputs with one output name (x.png, x.jpg, X.PNG -> x.png: rename one); writes each "
                       "output atomically as 8-bit (PNG unless OUTPUT names another format). Transparency is "
                       "composited on white; 16-bit images are scaled by 65535. Unreadable images of a folder are "
                       "listed at the end (exit 2), the others written.")
    s.add_argument("paths", nargs="+", metavar="[CHECKPOINT] INPUT OUTPUT",
                   help="CHECKPOINT (default: the bundled cdlnet-blind; see evaluate --help), then an image and the output "
                        "file, or a folder and the output folder")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    s.add_argument("--sigma", type=float, help="known Gaussian noise σ (0..255). Without it a noise-adaptive model "
                   "(the default cdlnet-blind, trained for σ 0..55; cdlnet; LIDIA blind) estimates σ from each image, so "
                   "a clean photo comes back nearly unchanged; a model trained for one σ (cscnet, dncnn, ...) denoises "
                   "at that σ whatever the image holds")
    s.add_argument("--adapt-steps", type=int, default=0,
                   help="test-time adaptation: fine-tune on each noisy image for N steps first (LIDIA)")
    s.add_argument("--adapt-lr", type=float, default=1e-4, help="learning rate of --adapt-steps (default: 1e-4)")
    s.add_argument("--max-memory", type=memory_size, help=MAX_MEMORY_HELP)
    s.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP + " (a folder: one step per image)")
    s.set_defaults(fn=cmd_denoise)
    s = sub.add_parser("restore", help="restore a measurement (super-resolution, deblurring, inpainting, CS-MRI) "
                       "with a model trained for that task",
                       description="The operator is the checkpoint's training task (task.kind): sr takes the "
                       "low-resolution image; deblur the blurred image (--kernel, or a Gaussian task's own kernel); "
                       "inpaint the image and --mask; csmri a complex (H, W) k-space .npy in fft2(norm='ortho') "
                       "layout and --mask. --simulate instead degrades clean INPUT images as evaluate does and "
                       "prints the PSNR of A^T y and of the result. A denoising checkpoint denoises. Outputs follow "
                       "denoise's rules (never an input, no existing file without --overwrite).")
    s.add_argument("checkpoint", help="a checkpoint trained for a task (run folder, checkpoint folder or bundled name)")
    s.add_argument("input", help="a measurement (or, with --simulate, a clean image), or a folder of them")
    s.add_argument("output", help="the output file, or folder for a folder INPUT")
    s.add_argument("--mask", help="inpaint/csmri: the mask of measured pixels/k-space entries (.npy or image, "
                   "non-zero = measured)")
    s.add_argument("--kernel", help="deblur: the blur kernel (.npy or gray image, odd square, normalized to sum 1)")
    s.add_argument("--simulate", action="store_true", help="INPUT is clean: draw y = A x + n by the evaluation "
                   "convention (--seed) and report PSNRs")
    s.add_argument("--measurement", help="also write A^T y (clipped) here: a file, or a folder for a folder INPUT")
    s.add_argument("--sigma", type=float, help="noise σ (0..255) of y; default: the checkpoint's training σ")
    s.add_argument("--seed", type=int, default=0, help="--simulate: the generator's seed (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    s.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP + " (a folder: one step per image)")
    s.set_defaults(fn=cmd_restore)
    s = sub.add_parser("import", help="turn the authors' released weights into a sparsefold checkpoint",
                       description="FAMILY cscnet: a drorsimon/CSCNet sigma_*.model with its .config beside it; "
                       "dncnn: a cszn/DnCNN model.pth (a whole pickled module, read by a restricted unpickler: "
                       "nothing in the file runs); dcea: a btolooshams/dea model_*.pt (likewise); lidia: a "
                       "grishavak/LIDIA-denoiser model_state_*.pt (gray, small, colour, blind). Writes OUT "
                       "(model.safetensors, config.json with the source file's SHA-256, manifest) for evaluate, "
                       "denoise and the Python API; SRC is never modified.")
    s.add_argument("family", help="cscnet, dncnn, dcea or lidia")
    s.add_argument("src", type=Path, help="the released weight file")
    s.add_argument("out", type=Path, help="checkpoint directory to write")
    s.add_argument("--sigma", type=float, help="noise σ (0..255) it was trained for (default: what the release says)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint directory")
    s.set_defaults(fn=cmd_import)
    s = sub.add_parser("export", help="export a model to ONNX (.onnx) or TorchScript (.pt) for deployment",
                       description="Inputs: noisy (B, C, H, W) in [0, 1], and sigma (B,) in 0..255 for noise-adaptive "
                       "models; output: denoised (B, C, H, W), not clipped. Batch, height and width are dynamic. "
                       "A model that cannot be exported is refused with the reason (README, Export).")
    s.add_argument("checkpoint", help="checkpoint directory, run directory or bundled model name")
    s.add_argument("out", type=Path, help="output file: .onnx (ONNX, opset 18) or .pt (TorchScript)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("models", help="list architectures and bundled models")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    s.set_defaults(fn=cmd_models)
    s = sub.add_parser("sweep", help="Ray Tune sweep of Ray Train runs (ASHA / Optuna / grid) from a YAML spec")
    s.add_argument("spec", help="spec YAML, or the name of a packaged one (sparsefold/sweeps/*.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value: run-config keys go to the base, spec keys to the spec")
    s.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    s.add_argument("--retry-errored", action="store_true", help="on resume, also re-run errored trials")
    s.set_defaults(fn=cmd_sweep)
    s = sub.add_parser("report", help="table + Pareto plot (PSNR vs parameters / latency) of a sweep")
    s.add_argument("sweep_dir", type=Path, help="the sweep's folder (the one sparsefold sweep prints)")
    s.add_argument("--test-dir", type=Path, help="test images (default: none; trials ranked by best val PSNR)")
    s.add_argument("--no-test", action="store_true", help="skip the test-set evaluation")
    s.add_argument("--images", type=int, default=0, help="first N sorted test images (0: all)")
    s.add_argument("--size", type=int, default=256, help="side of the latency / FLOPs image")
    s.add_argument("--repeats", type=int, default=5, help="timed forward passes (median)")
    s.add_argument("--threads", type=int, default=0, help="torch threads for the latency (0: torch default)")
    s.add_argument("--out", type=Path, help="output folder (default: SWEEP_DIR/report)")
    s.add_argument("--wandb-mode", choices=("auto", "online", "offline", "disabled"), help="default: the sweep's")
    s.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    s.set_defaults(fn=cmd_report)
    add_launch(sub)  # sparsefold/launch.py
    for s in sub.choices.values():  # also after the command; SUPPRESS keeps a flag given before it
        add_global_flags(s, default=argparse.SUPPRESS)
    return p


TENSOR_COMMANDS = ("evaluate", "denoise", "restore", "report")  # train: the loop sets the allocator (runtime_for)
OOM_HINTS = {"train": "lower data.batch_size or data.patch_size",
             "evaluate": "lower --max-memory or use smaller images", "denoise": "lower --max-memory",
             "restore": "use a smaller image (restore runs an image whole)"}
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, torch's (CUDA) OutOfMemoryError, or torch's CPU allocator failing (a RuntimeError)."""
    torch = sys.modules.get("torch")  # never imported just to classify an error
    oom = getattr(torch, "OutOfMemoryError", MemoryError) if torch is not None else MemoryError
    return isinstance(e, (MemoryError, oom)) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def error_line(e: Exception, command: str) -> tuple[int, str]:
    """The exit code and the ONE stderr line for an exception that ended ``command`` (policy: :func:`main`)."""
    msg = _first_line(e)
    if isinstance(e, ConfigError):
        return e.exit_code, f"config error: {msg}"
    if isinstance(e, SparsefoldError):
        return e.exit_code, f"error: {msg}"
    if _out_of_memory(e):
        return 1, f"error: out of memory ({msg}); {OOM_HINTS.get(command, 'use smaller inputs')}"
    if isinstance(e, (*PATH_ERRORS, ValueError)):
        return 2, f"error: {msg}"
    if isinstance(e, OSError):  # an I/O failure of a started command (disk full, network file system)
        return 1, f"error: {msg}"
    return 1, f"internal error: {type(e).__name__}: {msg} (a bug: run again with --debug for the traceback and report it)"


def complete(p: argparse.ArgumentParser) -> None:
    """Shell completion of commands, options and paths (``pip install argcomplete``, then once per shell:
    ``eval "$(register-python-argcomplete sparsefold)"``); without argcomplete, nothing."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(p)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in ONE line on stderr and an exit code (the traceback too only
    with ``--debug`` or ``SPARSEFOLD_DEBUG=1``):

    * 2: bad input (``InputError`` and ``ConfigError``, and a missing/existing/unreadable path or a bad
      value: FileNotFoundError, PermissionError, ValueError, ...);
    * 1: a command that started and failed: ``RunError`` (diverged, disk full), out of memory (with what to
      lower), another OSError; and an unexpected exception, which is a bug: ``internal error: ...``;
    * 130: interrupted (Ctrl-C).
    """
    p = parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions: argcomplete answers and exits
        complete(p)
    a = p.parse_args(argv)
    debug = a.debug or os.environ.get("SPARSEFOLD_DEBUG", "") not in ("", "0")
    if a.verbose:  # read where Ray starts (trainers/ray_env.py), also by a job this process submits
        os.environ["SPARSEFOLD_VERBOSE"] = "1"
    try:
        if a.cmd in TENSOR_COMMANDS:  # runtime imports torch: train validates its config first
            from sparsefold.runtime import configure_cpu_allocator, configure_process

            # process-wide, before the first large tensor exists; evaluate/denoise: the fused soft threshold too
            configure_process() if a.cmd in ("evaluate", "denoise") else configure_cpu_allocator()
        return a.fn(a)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every failure becomes one line; the policy is error_line's)
        if debug:
            traceback.print_exc()
        code, line = error_line(e, a.cmd)
        print(mask_secrets(line), file=sys.stderr, flush=True)
        return code

"""Importing the authors' released weights: ``sparsefold import FAMILY SRC OUT``.

Each importer in :data:`IMPORTERS` reads one official file and returns an :class:`Imported`: our model
config (hyperparameters read from the release, plus the options that make our forward reproduce the
official one exactly) and the state dict under our names. :func:`import_release` writes it as a normal
checkpoint (model.safetensors + config.json + manifest, state step 0) that ``evaluate``, ``denoise`` and
:func:`load_model` accept; config.json's ``source`` records the family, file name and SHA-256.

Every official tensor must land on one of ours with its shape and every one of ours must be filled: a
missing, extra or wrong-shape tensor, a file of another family, a truncated file is one :class:`InputError`
line. Nothing in a release is executed: state dicts and whole pickled modules alike go through the
restricted unpickler of :mod:`.torchfile`; a CSCNet ``.config`` is parsed with ``ast.literal_eval``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsefold.config import NoiseConfig, RunConfig
from sparsefold.errors import InputError
from sparsefold.models import build_model, count_parameters
from sparsefold.models.cscnet import CSCNetConfig
from sparsefold.models.dncnn import DnCNNConfig
from sparsefold.trainers.checkpoint import save_checkpoint
from sparsefold.trainers.storage import CONFIG, WEIGHTS, sha256_file
from sparsefold.trainers.torchfile import StandIn, module_tensors, read_torch_file


@dataclass(frozen=True)
class Imported:
    """What an importer read: our model config, our state dict, the σ (0..255) the release was trained
    for (None when the file does not say), and the side files it read (a CSCNet ``.config``)."""

    model: Any
    weights: dict[str, Tensor]
    sigma: float | None
    side_files: tuple[Path, ...] = ()


# official name -> (our name, official shape); our shape is the model's
Spec = dict[str, tuple[str, tuple[int, ...]]]


def map_state(sd: Any, spec: Spec, own: dict[str, Tensor], src: Path, family: str) -> dict[str, Tensor]:
    """Official tensors ``sd`` renamed by ``spec`` onto a model whose state dict is ``own``. Every tensor
    of ``sd`` must be in ``spec`` and every one of ``spec`` in ``sd`` (our names ``spec`` leaves out keep
    ``own``'s value: counters such as BatchNorm's num_batches_tracked), shapes exact, values finite."""
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise InputError(f"{src}: not a state dict of tensors; is it a {family} release?")
    extra = [k for k in sd if k not in spec]
    missing = [k for k in spec if k not in sd]
    if extra:
        raise InputError(f"{src}: unexpected tensor {extra[0]!r} ({len(extra)} in all): not the {family} "
                         "release this config describes")
    if missing:
        raise InputError(f"{src}: missing tensor {missing[0]!r} ({len(missing)} in all): incomplete {family} release")
    out = {k: v.clone() for k, v in own.items()}
    for name, (ours, shape) in spec.items():
        t = sd[name]
        if tuple(t.shape) != shape:
            raise InputError(f"{src}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{src}: tensor {name!r} has non-finite values")
        out[ours] = t.detach().reshape(own[ours].shape).to(own[ours].dtype).clone()
    return out


# ---------------------------------------------------------------------------------------------- CSCNet

CSCNET_KEYS = ("kernel_size", "num_filters", "stride", "unfoldings")


def read_cscnet_config(src: Path) -> tuple[Path, dict[str, Any]]:
    """The ``.config`` beside a CSCNet ``.model``: a Python-literal dict, parsed without evaluating it."""
    path = src.with_suffix(".config")
    if not path.is_file():
        raise InputError(f"{path}: missing; a CSCNet release is NAME.model with NAME.config beside it "
                         "(drorsimon/CSCNet trained_models/)")
    try:
        conf = ast.literal_eval(path.read_text(errors="replace"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise InputError(f"{path}: not a Python-literal dict ({type(e).__name__})") from None
    if not isinstance(conf, dict):
        raise InputError(f"{path}: not a dict")
    for key in CSCNET_KEYS:
        if not isinstance(conf.get(key), int) or isinstance(conf.get(key), bool):
            raise InputError(f"{path}: {key!r} missing or not an integer")
    return path, conf


def cscnet_config(path: Path, conf: dict[str, Any]) -> CSCNetConfig:
    """Our CSCNet for an official ConvLista_T: the same hyperparameters, gray, and the official soft
    threshold (its negative thresholds widen instead of shrinking)."""
    if conf["stride"] == 1:  # ConvLista_T does not pad at stride 1; our CSCNet always pads by s
        raise InputError(f"{path}: stride 1 is not supported (the official code does not pad at stride 1, "
                         "sparsefold's CSCNet does, so the borders would differ)")
    try:
        return CSCNetConfig(depth=conf["unfoldings"], filters=conf["num_filters"], kernel_size=conf["kernel_size"],
                            stride=conf["stride"], threshold_init=float(conf.get("threshold", 0.01)),
                            negative_threshold="official")
    except (InputError, TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None


def import_cscnet(src: Path) -> Imported:
    """drorsimon/CSCNet ``trained_models/sigma_*.model`` (a ConvLista_T state dict) and its ``.config``."""
    path, conf = read_cscnet_config(src)
    cfg = cscnet_config(path, conf)
    sd = read_torch_file(src)
    if isinstance(sd, StandIn):
        raise InputError(f"{src}: a whole pickled {sd.class_name} module, not a CSCNet state dict: wrong family?")
    K, k = cfg.filters, cfg.kernel_size
    spec: Spec = {f"apply_{x}.weight": (x, (K, 1, k, k)) for x in "ABC"}
    spec["soft_threshold.threshold"] = ("threshold", (1, K, 1, 1))
    own = build_model(cfg, init=False).state_dict()
    noise_std = conf.get("noise_std")
    sigma = round(float(noise_std) * 255.0, 4) if isinstance(noise_std, int | float) else None
    return Imported(cfg, map_state(sd, spec, own, src, "cscnet"), sigma, (path,))


# ---------------------------------------------------------------------------------------------- DnCNN


def dncnn_layers(root: Any, src: Path) -> list[StandIn]:
    """The ``dncnn`` Sequential of a pickled cszn/DnCNN module, checked to be DnCNN-S's layer pattern
    (conv+relu, (conv, bn, relu) × D−2, conv; 3×3 convolutions, stride 1, padding 1)."""
    if not isinstance(root, StandIn) or root.class_name != "DnCNN":
        what = f"a pickled {root.class_name}" if isinstance(root, StandIn) else f"a {type(root).__name__}"
        raise InputError(f"{src}: holds {what}, not a whole pickled DnCNN module (cszn/DnCNN model.pth): "
                         "wrong family?")
    seq = (root.__dict__.get("_modules") or {}).get("dncnn")
    layers = list((seq.__dict__.get("_modules") or {}).values()) if isinstance(seq, StandIn) else []
    kinds = [m.class_name if isinstance(m, StandIn) else type(m).__name__ for m in layers]
    convs = kinds.count("Conv2d")
    if convs < 2 or kinds != ["Conv2d", "ReLU"] + ["Conv2d", "BatchNorm2d", "ReLU"] * (convs - 2) + ["Conv2d"]:
        raise InputError(f"{src}: layers {kinds[:6]}... are not DnCNN-S's (conv, relu, (conv, bn, relu)*, conv)")
    for i, m in enumerate(layers):
        geometry = [tuple(m.__dict__.get(a, d)) for a, d in
                    (("kernel_size", (3, 3)), ("stride", (1, 1)), ("padding", (1, 1)), ("dilation", (1, 1)))]
        if kinds[i] == "Conv2d" and geometry != [(3, 3), (1, 1), (1, 1), (1, 1)]:
            raise InputError(f"{src}: layer dncnn.{i} is not a 3x3 convolution with stride 1 and padding 1")
    return layers


def import_dncnn(src: Path) -> Imported:
    """cszn/DnCNN ``TrainingCodes/dncnn_pytorch/models/DnCNN_sigma*/model.pth``: a whole pickled module,
    read by the restricted unpickler. σ comes from a ``sigma<N>`` in the path (the file does not hold it)."""
    root = read_torch_file(src, stand_ins=frozenset({"DnCNN"}))
    layers = dncnn_layers(root, src)
    first = layers[0].__dict__.get("_parameters", {}).get("weight")
    if not isinstance(first, Tensor) or first.dim() != 4:
        raise InputError(f"{src}: missing tensor 'dncnn.0.weight'")
    eps = {float(m.__dict__.get("eps", 1e-5)) for m in layers if m.class_name == "BatchNorm2d"}
    if len(eps) > 1:
        raise InputError(f"{src}: BatchNorm layers with different eps {sorted(eps)}")
    try:
        cfg = DnCNNConfig(depth=[m.class_name for m in layers].count("Conv2d"), features=first.shape[0],
                          channels=first.shape[1], bn_eps=eps.pop() if eps else 1e-5)
    except InputError as e:
        raise InputError(f"{src}: {e}") from None
    own = build_model(cfg, init=False).state_dict()
    sd = dict(module_tensors(root))
    spec: Spec = {"dncnn." + k.removeprefix("body."): (k, tuple(t.shape)) for k, t in own.items()
                  if not (k.endswith("num_batches_tracked") and "dncnn." + k.removeprefix("body.") not in sd)}
    m = re.search(r"sigma_?(\d+(?:\.\d+)?)", str(src))
    return Imported(cfg, map_state(sd, spec, own, src, "dncnn"), float(m.group(1)) if m else None)


IMPORTERS: dict[str, Callable[[Path], Imported]] = {"cscnet": import_cscnet, "dncnn": import_dncnn}


# ---------------------------------------------------------------------------------------------- writing


def check_out(out: Path, overwrite: bool) -> None:
    """OUT must not exist, or (with ``overwrite``) be a checkpoint directory or an empty one: an import
    never replaces anything else."""
    if not out.exists():
        return
    if not overwrite:
        raise InputError(f"{out}: exists; pass --overwrite to replace it, or choose another OUT")
    if not out.is_dir() or not ((out / CONFIG).is_file() or (out / WEIGHTS).is_file() or not any(out.iterdir())):
        raise InputError(f"{out}: exists and is not a checkpoint directory; --overwrite only replaces a checkpoint")


def import_release(family: str, src: str | Path, out: str | Path, sigma: float | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Import the release ``src`` of ``family`` into the checkpoint directory ``out``; ``sigma`` (0..255)
    overrides the σ the release says it was trained for. Returns a summary (checkpoint, model, params,
    sigma, source). ``src`` is only read."""
    src, out = Path(src), Path(out)
    if family not in IMPORTERS:
        raise InputError(f"{family}: unknown family; one of {', '.join(IMPORTERS)}")
    if not src.is_file():
        raise InputError(f"{src}: not a file")
    check_out(out, overwrite)
    got = IMPORTERS[family](src)
    sigma = got.sigma if sigma is None else sigma
    if sigma is None:
        raise InputError(f"{src}: the release does not say its noise level; pass --sigma")
    cfg = RunConfig(model=got.model, noise=NoiseConfig(sigma=sigma))
    model = build_model(got.model, init=False)
    model.load_state_dict(got.weights)  # map_state filled every tensor with its shape: strict cannot fail
    source: dict[str, Any] = {"family": family, "file": src.name, "sha256": sha256_file(src)}
    if got.side_files:
        source["side_files"] = [{"file": p.name, "sha256": sha256_file(p)} for p in got.side_files]
    path = save_checkpoint(out, model, cfg, {"step": 0}, extra={"source": source})
    return {"checkpoint": str(path), "model": got.model.name, "params": count_parameters(model), "sigma": sigma,
            "source": source}

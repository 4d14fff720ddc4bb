"""Importing the authors' released weights: ``sparsefold import FAMILY SRC OUT``.

Each importer in :data:`IMPORTERS` reads one official file and returns an :class:`Imported`: our model
config (hyperparameters read from the release, plus the options that make our forward reproduce the
official one exactly) and the state dict under our names. :func:`import_release` writes it as a normal
checkpoint (model.safetensors + config.json + manifest, state step 0) that ``evaluate``, ``denoise`` and
:func:`load_model` accept; config.json's ``source`` records the family, file name and SHA-256.

Every official tensor must land on one of ours with its shape and every one of ours must be filled: a
missing, extra or wrong-shape tensor, a file of another family, a truncated file is one :class:`InputError`
line. Nothing in a release is executed: state dicts and whole pickled modules (DnCNN, DCEA) alike go
through the restricted unpickler of :mod:`.torchfile`; a CSCNet ``.config`` is parsed with
``ast.literal_eval``.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsefold.config import DataConfig, NoiseConfig, RunConfig
from sparsefold.errors import InputError
from sparsefold.models import build_model, count_parameters
from sparsefold.models.cscnet import CSCNetConfig
from sparsefold.models.dcea import DCEAConfig, DCEAUCConfig
from sparsefold.models.dncnn import DnCNNConfig
from sparsefold.models.lidia import LIDIAConfig
from sparsefold.trainers.checkpoint import save_checkpoint
from sparsefold.trainers.storage import CONFIG, WEIGHTS, sha256_file
from sparsefold.trainers.torchfile import StandIn, module_tensors, read_torch_file


@dataclass(frozen=True)
class Imported:
    """What an importer read: our model config, our state dict, the σ (0..255) the release was trained
    for (None when the file does not say), the side files it read (a CSCNet ``.config``), and the noise
    model when the release says it is not Gaussian (a Poisson DCEA and its peak)."""

    model: Any
    weights: dict[str, Tensor]
    sigma: float | None
    side_files: tuple[Path, ...] = ()
    noise: NoiseConfig | None = None


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


# ---------------------------------------------------------------------------------------------- DCEA

DCEA_CLASSES = {"DEA2Dtied": DCEAConfig, "DEA2Dfree": DCEAUCConfig}  # btolooshams/dea src/model.py
DCEA_INTS = ("T", "num_conv", "dictionary_dim", "stride")


def dcea_module(root: Any, src: Path) -> dict[str, Any]:
    """The attributes of a pickled btolooshams/dea DEA2Dtied / DEA2Dfree, checked to be a model our DCEA
    reproduces: one bias shared by the unfoldings, stride > 1, residual nonlinearity ELU(α=peak) or none."""
    if not isinstance(root, StandIn) or root.class_name not in DCEA_CLASSES:
        what = f"a pickled {root.class_name}" if isinstance(root, StandIn) else f"a {type(root).__name__}"
        hint = " (DEA1D, the 1-D model of the paper's simulations)" if what.endswith("DEA1D") else ""
        raise InputError(f"{src}: holds {what}{hint}, not a whole pickled DEA2Dtied / DEA2Dfree module "
                         "(btolooshams/dea results/trained_models/*.pt): wrong family?")
    a = root.__dict__
    for key in (*DCEA_INTS, "twosided", "model_distribution", "single_bias", "peak"):
        if key not in a:
            raise InputError(f"{src}: {root.class_name} without attribute {key!r}: not a btolooshams/dea release")
    for key in DCEA_INTS:
        if not isinstance(a[key], int) or isinstance(a[key], bool):
            raise InputError(f"{src}: attribute {key!r} is {a[key]!r}, not an integer")
    if not a["single_bias"]:
        raise InputError(f"{src}: one bias per unfolding (single_bias=False) is not supported: sparsefold's DCEA "
                         "shares one bias across unfoldings")
    if a["stride"] == 1:  # split_image does not pad at stride 1; our DCEA always pads by s
        raise InputError(f"{src}: stride 1 is not supported (the official code does not pad at stride 1, "
                         "sparsefold's DCEA does, so the borders would differ)")
    nonlin = (a.get("_modules") or {}).get("nonlin", a.get("nonlin"))
    kind = nonlin.class_name if isinstance(nonlin, StandIn) else None
    if a["model_distribution"] == "poisson" and kind not in (None, "ELU"):
        raise InputError(f"{src}: residual nonlinearity {kind} is not supported (sparsefold's DCEA has ELU or none)")
    if kind == "ELU" and float(nonlin.__dict__.get("alpha", 1.0)) != float(a["peak"]):
        raise InputError(f"{src}: ELU alpha {nonlin.__dict__.get('alpha')} is not the peak {a['peak']}")
    return {**a, "elu": kind == "ELU"}


def dcea_config(root: StandIn, a: dict[str, Any], src: Path) -> tuple[DCEAConfig, NoiseConfig | None]:
    """Our DCEA-C / DCEA-UC with the module's hyperparameters and the official forward (μ = 0, its
    residual nonlinearity and two-sided shrink), and the noise model it was trained for (None: Gaussian,
    whose σ the module does not hold). A Binomial release gets trials=1: the official residual is
    ȳ − sigmoid(η) on the averaged observation, whatever the number of trials."""
    dist = a["model_distribution"]
    poisson = dist == "poisson"
    try:
        cfg = DCEA_CLASSES[root.class_name](
            likelihood=dist, depth=a["T"], filters=a["num_conv"], kernel_size=a["dictionary_dim"],
            stride=a["stride"], mu=0.0, residual_elu=poisson and a["elu"], twosided=bool(a["twosided"]),
            negative_threshold="official" if a["twosided"] else "clamp",
            peak=float(a["peak"]) if poisson else DCEAConfig.peak)  # the peak matters to Poisson only
    except (InputError, TypeError, ValueError) as e:
        raise InputError(f"{src}: {e}") from None
    noise = {"poisson": NoiseConfig(kind="poisson", peak=cfg.peak), "binomial": NoiseConfig(kind="binomial")}
    return cfg, noise.get(dist)


def import_dcea(src: Path) -> Imported:
    """btolooshams/dea ``results/trained_models/model_{tied,untied}_peak*.pt``: a whole pickled DEA2Dtied /
    DEA2Dfree module, read by the restricted unpickler; its hyperparameters come from its attributes."""
    root = read_torch_file(src, stand_ins=frozenset({*DCEA_CLASSES, "DEA1D"}))
    cfg, noise = dcea_config(root, dcea_module(root, src), src)
    K, C, k = cfg.filters, cfg.channels, cfg.kernel_size
    spec: Spec = {"b": ("threshold", (1, K, 1, 1)), "H": ("H", (K, C, k, k))}
    if not cfg.tied:
        spec |= {"We": ("W_e", (K, C, k, k)), "Wd": ("W_d", (K, C, k, k))}
    own = build_model(cfg, init=False).state_dict()
    return Imported(cfg, map_state(dict(module_tensors(root)), spec, own, src, "dcea"), None, noise=noise)


# ---------------------------------------------------------------------------------------------- LIDIA

LIDIA_NET = "separable_fc_net."
LIDIA_FIRST = LIDIA_NET + "sep_part1_s0.ver_hor_bn_re0.ver_hor.ver.weight"  # W_v of L_{0,0}: (F, C·p²)
LIDIA_BLUR = LIDIA_NET + "agg1.bilinear_conv.weight"  # the fixed 3×3 filter h (our non-persistent ``blur``)
LIDIA_BLIND = NoiseConfig(sigma=10.0, sigma_max=30.0)  # blind releases: σ ∈ [10, 30] (blind_denoise_bw.py)
LIDIA_SEP = {"ver": "ver_hor.ver.weight", "hor": "ver_hor.hor.weight", "bias": "ver_hor.b"}  # VerHorBnRe
LIDIA_MAT = {"ver": "ver.weight", "hor": "hor.weight", "bias": "b"}  # VerHorMat
BLUR = (torch.tensor([1.0, 2, 1]).outer(torch.tensor([1.0, 2, 1])) / 16).flatten()


def lidia_config(sd: dict[str, Any], src: Path) -> LIDIAConfig:
    """Our LIDIA for an official PatchDenoiseNet state dict, read from its tensors: C and p from W_v of
    L_{0,0} (C·p² inputs; official: gray p = 7, colour p = 5), F and K from its shapes, LIDIA-S from the
    absent second blocks, the FcNet depth from its layers; window 29 and every patch a reference are
    constants of the official code. The options reproduce the official forward (models/lidia.py)."""
    first = sd.get(LIDIA_FIRST)
    hor = sd.get(LIDIA_NET + "sep_part1_s0.ver_hor_bn_re0.ver_hor.hor.weight")
    if not isinstance(first, Tensor) or first.dim() != 2 or not isinstance(hor, Tensor) or hor.dim() != 2:
        raise InputError(f"{src}: no tensor {LIDIA_FIRST!r}: not a LIDIA release (grishavak/LIDIA-denoiser "
                         "models/model_state_*.pt); wrong family?")
    n = first.shape[1]
    c = 1 if math.isqrt(n) ** 2 == n else 3
    p = math.isqrt(n // c)
    if c * p * p != n:
        raise InputError(f"{src}: {LIDIA_FIRST!r} has {n} inputs, not the C·p² pixels of a patch (C = 1 or 3)")
    layers = sum(1 for k in sd if re.fullmatch(r"weights_net0\.fc\d+\.weight", k))
    try:
        return LIDIAConfig(channels=c, patch_size=p, neighbours=hor.shape[0], window=29, stride=1,
                           width=first.shape[0], blocks=2 if LIDIA_NET + "sep_part1_s0.a" in sd else 1,
                           weight_layers=layers, search="official", aggregation="official", w11_min=0.0,
                           eval_bn="official")
    except InputError as e:
        raise InputError(f"{src}: {e}") from None


def lidia_name(ours: str, weight_layers: int) -> str:
    """The official PatchDenoiseNet name of one of our tensors (``alpha.s``, ``a1.s``: element s of ours)."""
    head, _, rest = ours.partition(".")
    idx, _, leaf = rest.partition(".")
    if head == "weight_net":  # Sequential [fc, bn, relu] × L + fc_out
        i, _, leaf = leaf.partition(".")
        layer = "fc_out" if int(i) == 3 * weight_layers else f"{('fc', 'bn')[int(i) % 3]}{int(i) // 3}"
        return f"weights_net{idx}.{layer}.{leaf}"
    if head in ("alpha", "beta"):
        return f"{head}{idx}"
    if head in ("a1", "a2"):
        return LIDIA_NET + (f"sep_part1_s{idx}.a" if head == "a1" else "sep_part2.a")
    if head in ("agg_pre", "out"):
        leaf = rest if head == "out" else leaf
        return LIDIA_NET + ("sep_part2.ver_hor_out." if head == "out" else f"ver_hor_agg{idx}_pre.") + LIDIA_MAT[leaf]
    prefix = {"stage1": f"sep_part1_s{idx}.ver_hor_bn_re", "stage2": "sep_part2.ver_hor_bn_re",
              "agg_post": f"ver_hor_bn_re_agg{idx}_post."}[head]
    if head != "agg_post":  # stage1.s.j.leaf / stage2.j.leaf
        j, _, leaf = (leaf if head == "stage1" else rest).partition(".")
        prefix += f"{int(j) + 2 * (head == 'stage2')}."
    return LIDIA_NET + prefix + LIDIA_SEP.get(leaf, leaf)


def import_lidia(src: Path) -> Imported:
    """grishavak/LIDIA-denoiser ``models/model_state_*.pt``: ``{'state_dict': PatchDenoiseNet state dict,
    ...}`` (gray, LIDIA-S, colour, blind). σ comes from ``sigma_<N>`` in the file name; ``sigma_blind``:
    the blind range σ ∈ [10, 30]."""
    root = read_torch_file(src)
    if isinstance(root, StandIn):
        raise InputError(f"{src}: a whole pickled {root.class_name} module, not a LIDIA state dict: wrong family?")
    sd = root.get("state_dict", root) if isinstance(root, dict) else root
    if not isinstance(sd, dict):
        raise InputError(f"{src}: holds a {type(sd).__name__}, not a LIDIA state dict: wrong family?")
    cfg = lidia_config(sd, src)
    own = build_model(cfg, init=False).state_dict()
    own_split = {k: v for k, v in own.items() if k not in ("alpha", "a1")}  # alpha, a1: one element per scale
    own_split |= {f"{k}.{i}": own[k][i:i + 1] for k in ("alpha", "a1") if k in own for i in (0, 1)}
    spec: Spec = {lidia_name(k, cfg.weight_layers): (k, (1,) if k == "beta" else tuple(v.shape))
                  for k, v in own_split.items()}
    blur = sd.get(LIDIA_BLUR)
    if not isinstance(blur, Tensor):
        raise InputError(f"{src}: missing tensor {LIDIA_BLUR!r}: incomplete lidia release")
    if blur.shape != (1, 1, 3, 3) or not torch.allclose(blur.flatten().float(), BLUR, rtol=0, atol=1e-7):
        raise InputError(f"{src}: tensor {LIDIA_BLUR!r} is not the fixed binomial filter [1,2,1]ᵀ[1,2,1]/16")
    got = map_state({k: v for k, v in sd.items() if k != LIDIA_BLUR}, spec, own_split, src, "lidia")
    for k in ("alpha", "a1"):
        if k in own:
            got[k] = torch.cat([got.pop(f"{k}.0"), got.pop(f"{k}.1")])
    m = re.search(r"sigma_(\d+(?:\.\d+)?|blind)", src.name)
    sigma = float(m.group(1)) if m and m.group(1) != "blind" else None
    return Imported(cfg, got, sigma, noise=LIDIA_BLIND if m and m.group(1) == "blind" else None)


IMPORTERS: dict[str, Callable[[Path], Imported]] = {"cscnet": import_cscnet, "dncnn": import_dncnn,
                                                     "dcea": import_dcea, "lidia": import_lidia}


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
                   overwrite: bool = False, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import the release ``src`` of ``family`` into the checkpoint directory ``out``; ``sigma`` (0..255)
    overrides the σ the release says it was trained for (Gaussian releases only). ``provenance`` (e.g.
    repo, commit, path) is added to config.json's ``source``. Returns a summary (checkpoint, model,
    params, sigma, noise, source). ``src`` is only read."""
    src, out = Path(src), Path(out)
    if family not in IMPORTERS:
        raise InputError(f"{family}: unknown family; one of {', '.join(IMPORTERS)}")
    if not src.is_file():
        raise InputError(f"{src}: not a file")
    check_out(out, overwrite)
    got = IMPORTERS[family](src)
    noise = got.noise
    if noise is not None and sigma is not None:
        raise InputError(f"{src}: --sigma does not apply: the release is a {noise.kind} model")
    if noise is None:
        sigma = got.sigma if sigma is None else sigma
        if sigma is None:
            raise InputError(f"{src}: the release does not say its noise level; pass --sigma")
        noise = NoiseConfig(sigma=sigma)
    gray = getattr(got.model, "channels", 1) == 1  # a colour release evaluates on colour images
    cfg = RunConfig(model=got.model, noise=noise, data=DataConfig(gray=gray))
    model = build_model(got.model, init=False)
    model.load_state_dict(got.weights)  # map_state filled every tensor with its shape: strict cannot fail
    source: dict[str, Any] = {"family": family, "file": src.name, "sha256": sha256_file(src), **(provenance or {})}
    if got.side_files:
        source["side_files"] = [{"file": p.name, "sha256": sha256_file(p)} for p in got.side_files]
    path = save_checkpoint(out, model, cfg, {"step": 0}, extra={"source": source})
    level = {"gaussian": f"sigma={noise.sigma:g}", "poisson": f"peak={noise.peak:g}"}.get(noise.kind, "")
    return {"checkpoint": str(path), "model": got.model.name, "params": count_parameters(model), "sigma": sigma,
            "noise": f"{noise.kind} {level}".strip(), "source": source}

"""``sparsefold import dcea``: the authors' DCEA releases (btolooshams/dea, whole pickled modules) against
their own code, the refusals, and the bundled copies of the releases.

The refusal tests pickle small stand-in classes named like the official ones (they run everywhere). The
equivalence tests import ../shared/official/dcea/src/model.py by path, build the official module from its
class with the hyperparameters the importer read and load the tensors our restricted reader extracted
(never ``torch.load(weights_only=False)``), and are skipped when ../shared/official is absent.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sparsefold.cli import main
from sparsefold.errors import InputError
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.importers import import_release
from sparsefold.trainers.storage import BUNDLED_DIR
from sparsefold.trainers.torchfile import module_tensors, read_torch_file

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official"
DCEA = OFFICIAL / "dcea"
SET12 = OFFICIAL.parent / "data" / "set12"
needs_official = pytest.mark.skipif(not (DCEA / "src" / "model.py").is_file() or not SET12.is_dir(),
                                    reason="../shared/official/dcea and ../shared/data/set12 not present")
RELEASES = ["tied_peak1", "tied_peak4", "untied_peak1", "untied_peak4"]
CLASSES = ("DEA2Dtied", "DEA2Dfree")


# ------------------------------------------------------------------ stand-in releases (run everywhere)


class DEA2Dfree(nn.Module):
    """The attributes and parameters of btolooshams/dea's DEA2Dfree, small (no forward needed)."""

    def __init__(self, K: int = 4, k: int = 5, stride: int = 2, single_bias: bool = True, nonlin: str = "ELU") -> None:
        super().__init__()
        self.T, self.num_conv, self.dictionary_dim, self.device, self.stride = 3, K, k, torch.device("cpu"), stride
        self.twosided, self.model_distribution, self.single_bias, self.peak = False, "poisson", single_bias, 4
        self.L = torch.tensor(10.0)
        self.nonlin = nn.ELU(alpha=4) if nonlin == "ELU" else nn.SELU()
        if single_bias:
            self.b = nn.Parameter(torch.full((1, K, 1, 1), 0.1))
        else:
            for t in range(self.T):
                self.register_parameter(f"b{t}", nn.Parameter(torch.full((1, K, 1, 1), 0.1)))
        for name in ("H", "We", "Wd"):
            self.register_parameter(name, nn.Parameter(0.1 * torch.randn(K, 1, k, k)))


class DEA1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.H = nn.Parameter(torch.randn(4, 1, 7))


def release(tmp: Path, m: nn.Module, name: str = "model_untied_peak4.pt") -> Path:
    torch.save(m, tmp / name, _use_new_zipfile_serialization=False)  # the releases' legacy format
    return tmp / name


def test_stand_in_release_reads_its_attributes(tmp_path):
    """Hyperparameters come from the module, not the file name (this one says peak 1, the module 4)."""
    out = import_release("dcea", release(tmp_path, DEA2Dfree(), "model_tied_peak1.pt"), tmp_path / "ckpt")
    _, meta = load_model(tmp_path / "ckpt")
    m = meta["model"]
    assert (m["name"], m["depth"], m["filters"], m["kernel_size"], m["stride"], m["peak"], m["mu"]) == \
        ("dcea_uc", 3, 4, 5, 2, 4.0, 0.0)
    assert m["residual_elu"] and out["noise"] == "poisson peak=4" and meta["run"]["noise"]["kind"] == "poisson"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda m: m._parameters.pop("We"), "missing tensor 'We'"),
    (lambda m: m.register_parameter("extra", nn.Parameter(torch.zeros(1))), "unexpected tensor 'extra'"),
    (lambda m: setattr(m, "Wd", nn.Parameter(torch.zeros(4, 1, 3, 3))), "tensor 'Wd' has shape"),
    (lambda m: setattr(m, "T", 2.5), "attribute 'T' is 2.5"),
    (lambda m: m.__dict__.pop("peak"), "without attribute 'peak'"),
])
def test_damaged_release_is_one_line(tmp_path, capsys, damage, message):
    m = DEA2Dfree()
    damage(m)
    assert main(["import", "dcea", str(release(tmp_path, m)), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(("module", "message"), [
    (lambda: DEA2Dfree(single_bias=False), "single_bias=False"),
    (lambda: DEA2Dfree(stride=1), "stride 1 is not supported"),
    (lambda: DEA2Dfree(nonlin="SELU"), "nonlinearity SELU"),
    (lambda: DEA1D(), "DEA1D"),
    (lambda: nn.Conv2d(1, 2, 3), "not a whole pickled DEA2Dtied / DEA2Dfree module"),
])
def test_unsupported_release_is_one_line(tmp_path, module, message):
    with pytest.raises(InputError, match=message) as e:
        import_release("dcea", release(tmp_path, module()), tmp_path / "ckpt")
    assert "\n" not in str(e.value)


def test_truncated_release_and_sigma_are_one_line(tmp_path):
    src = release(tmp_path, DEA2Dfree())
    with pytest.raises(InputError, match="--sigma does not apply"):
        import_release("dcea", src, tmp_path / "a", sigma=25)
    src.write_bytes(src.read_bytes()[:-200])
    with pytest.raises(InputError, match="truncated") as e:
        import_release("dcea", src, tmp_path / "b")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ equivalence with the official code


@pytest.fixture
def official(monkeypatch) -> types.ModuleType:
    """btolooshams/dea src/model.py imported by path (its ``import utils`` served by src/utils.py), as
    module ``model`` (the name its classes were pickled under); its uint8 masked_select mask made bool."""
    for name in ("utils", "model"):
        spec = importlib.util.spec_from_file_location(name, DCEA / "src" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)  # undone after the test
        spec.loader.exec_module(mod)
    masked_select = torch.masked_select
    monkeypatch.setattr(torch, "masked_select", lambda x, mask: masked_select(x, mask.bool()))
    return sys.modules["model"]


def official_module(official: types.ModuleType, conf: dict, tensors: dict) -> nn.Module:
    """Their class with their hyperparameters (L given: no power method; H is replaced by the tensors)."""
    hyp = {"num_iters": conf["depth"], "num_conv": conf["filters"], "dictionary_dim": conf["kernel_size"],
           "device": "cpu", "stride": conf["stride"], "twosided": conf["twosided"], "single_bias": True,
           "model_distribution": conf["likelihood"], "L": 1.0, "peak": conf["peak"], "lam": 0.0,
           "nonlin": "ELU" if conf["residual_elu"] else None}
    m = getattr(official, "DEA2Dtied" if conf["name"] == "dcea_c" else "DEA2Dfree")(hyp)
    m.load_state_dict(tensors)
    return m.eval()


def set12_counts(peak: float, size: int = 64) -> torch.Tensor:
    """Poisson counts of a Set12 crop, the official convention: Poisson(peak·x/max x), seeded."""
    from sparsefold.datasets import load_image

    x = load_image(sorted(SET12.iterdir())[0], gray=True)[None, :, 64:64 + size, 64:64 + size]
    return torch.poisson(x * (peak / x.max()), generator=torch.Generator().manual_seed(0))


def assert_same_forward(ours: nn.Module, theirs: nn.Module, counts: torch.Tensor, peak: float) -> None:
    """Ours sees counts/peak and returns exp(η̂)/peak; theirs sees counts and returns η̂ (predict.py: Q·exp(η̂)).

    In float64 the two agree to rounding (measured 0 to 1e-12). In float32 each one's 15 exp-link steps
    drift from its own float64 result by up to 8e-4 in η̂ on the tied peak-1 release (measured on this
    crop: the iteration amplifies rounding), so float32 is held to 1e-3 only."""
    for dtype, tol in ((torch.float64, 1e-4), (torch.float32, 1e-3)):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the official forward allocates its codes with the default dtype
        try:
            a, b = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
            with torch.no_grad():
                z, _, _ = b(counts.to(dtype), 0)
                got, eta = a(counts.to(dtype) / peak), a.natural(counts.to(dtype) / peak)
        finally:
            torch.set_default_dtype(default)
        assert (eta - z).abs().max().item() <= tol, dtype
        assert (got - torch.exp(z) / peak).abs().max().item() <= tol, dtype


@needs_official
@pytest.mark.parametrize("name", RELEASES)
def test_dcea_release_equals_official_forward(tmp_path, official, name):
    torch.set_num_threads(1)
    src = DCEA / "results" / "trained_models" / f"model_{name}.pt"
    out = import_release("dcea", src, tmp_path / "ckpt")
    ours, meta = load_model(tmp_path / "ckpt")
    conf = meta["model"]
    assert (conf["depth"], conf["filters"], conf["kernel_size"], conf["stride"]) == (15, 169, 11, 7)
    assert out["params"] == (20_618 if name.startswith("tied") else 61_516)
    tensors = dict(module_tensors(read_torch_file(src, stand_ins=frozenset(CLASSES))))
    assert_same_forward(ours, official_module(official, conf, tensors), set12_counts(conf["peak"]), conf["peak"])


@needs_official
@pytest.mark.parametrize(("cls", "dist", "twosided"), [("DEA2Dtied", "gaussian", True),
                                                         ("DEA2Dfree", "binomial", False)])
def test_other_likelihoods_equal_official_forward(tmp_path, official, cls, dist, twosided):
    """Releases the authors could make with the same code (Gaussian two-sided with negative biases,
    Binomial), pickled from their own class: read from the module's attributes, forward equal."""
    torch.manual_seed(0)
    hyp = {"num_iters": 4, "num_conv": 6, "dictionary_dim": 5, "device": "cpu", "stride": 3, "twosided": twosided,
           "single_bias": True, "model_distribution": dist, "L": 4.0, "peak": 1, "lam": 0.05, "nonlin": "ELU"}
    m = getattr(official, cls)(hyp)
    with torch.no_grad():
        m.b.copy_(torch.linspace(-0.05, 0.1, 6).view(1, 6, 1, 1))  # b < 0: the official two-sided shrink
    src = tmp_path / "anything.pt"
    torch.save(m, src)
    import_release("dcea", src, tmp_path / "ckpt", sigma=25 if dist == "gaussian" else None)
    ours, meta = load_model(tmp_path / "ckpt")
    assert (meta["model"]["likelihood"], meta["model"]["twosided"]) == (dist, twosided)
    y = set12_counts(1.0, 40) / 1.0 if dist == "binomial" else set12_counts(4.0, 40) / 4.0
    y = y.clamp(max=1.0)
    with torch.no_grad():
        z, _, _ = m.eval()(y, 0)
        want = torch.sigmoid(z) if dist == "binomial" else z
        assert (ours.eval()(y) - want).abs().max().item() <= 1e-4


@needs_official
def test_wrong_family_is_one_line(tmp_path, capsys):
    src = OFFICIAL / "cscnet" / "trained_models" / "sigma_25.model"
    assert main(["import", "dcea", str(src), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a whole pickled DEA2Dtied / DEA2Dfree module" in err, err


# ------------------------------------------------------------------ the bundled releases


def test_bundled_releases_ship_with_their_licence():
    names = sorted(d.name for d in BUNDLED_DIR.glob("dcea-official-*"))
    assert names == [f"dcea-official-{r.replace('_', '-')}" for r in RELEASES]
    for name in names:
        assert "Copyright (c) 2020 Bahareh Tolooshams" in (BUNDLED_DIR / name / "LICENSE").read_text()
        source = json.loads((BUNDLED_DIR / name / "config.json").read_text())["source"]
        assert (source["repo"], source["commit"][:8], source["license"]) == ("btolooshams/dea", "e21772e6", "MIT")
    assert '"bundled/*/LICENSE"' in (ROOT / "pyproject.toml").read_text()  # the wheel ships the notice


@needs_official
@pytest.mark.parametrize("name", RELEASES)
def test_bundled_release_equals_import_of_the_official_file(tmp_path, name):
    src = DCEA / "results" / "trained_models" / f"model_{name}.pt"
    bundled = BUNDLED_DIR / f"dcea-official-{name.replace('_', '-')}"
    out = import_release("dcea", src, tmp_path / "ckpt")
    meta = json.loads((bundled / "config.json").read_text())
    assert meta["source"]["sha256"] == out["source"]["sha256"]
    assert meta["source"]["path"] == f"results/trained_models/{src.name}"
    assert meta["model"] == json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]
    want, got = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(bundled / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    model, _ = load_model(bundled.name)  # by its bundled name
    assert meta["params"] == sum(p.numel() for p in model.parameters())


def test_dcea_evaluation_convention_rescales_by_the_maximum_and_does_not_clip(tmp_path):
    """``evaluate --convention dcea``: each clean image divided by its maximum (so a darker copy of an image
    scores the same: same counts, same PSNR) and the output left unclipped; the shared convention clips."""
    from PIL import Image

    from sparsefold.config import NoiseConfig
    from sparsefold.trainers.evaluate import evaluate_images

    class Brighter(nn.Module):  # an "estimate" above 1 where the noisy input is
        def forward(self, y: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
            return 1.5 * y

    g = torch.Generator().manual_seed(0)
    img = (torch.rand(24, 24, generator=g) * 200 + 20).to(torch.uint8)
    for name, scale in (("a.png", 1.0), ("b.png", 0.5)):
        Image.fromarray((img.float() * scale).round().to(torch.uint8).numpy()).save(tmp_path / name)
    noise, model = NoiseConfig(kind="poisson", peak=4.0), Brighter()
    dcea = [evaluate_images(model, [tmp_path / n], noise, with_ssim=False, convention="dcea")["psnr"]
            for n in ("a.png", "b.png")]
    assert dcea[0] == pytest.approx(dcea[1], abs=0.05)  # 8-bit rounding of the darker copy only
    shared = evaluate_images(model, [tmp_path / "a.png"], noise, with_ssim=False)["psnr"]
    assert shared > dcea[0] + 0.5  # clipping at 1 helps an over-bright estimate
    with pytest.raises(InputError, match="^--convention"):
        evaluate_images(model, [tmp_path / "a.png"], noise, convention="paper")

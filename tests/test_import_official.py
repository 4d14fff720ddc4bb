"""``sparsefold import``: the restricted unpickler, the importers' refusals, and one-image equivalence with
the authors' own code on their released weights.

The synthetic tests build small releases in tmp_path (a whole pickled DnCNN-like module, a CSCNet state
dict + .config) and run everywhere. The equivalence tests read the official code and weights from
``../shared/official`` (never copied into the repository: their licences do not allow it) and are
skipped when it is absent.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from sparsefold.cli import main
from sparsefold.errors import InputError
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.importers import import_release
from sparsefold.trainers.torchfile import StandIn, module_tensors, read_torch_file

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official"
DATA = OFFICIAL.parent / "data"
needs_official = pytest.mark.skipif(not (OFFICIAL / "cscnet").is_dir() or not (DATA / "set12").is_dir(),
                                    reason="../shared/official and ../shared/data (authors' releases) not present")
FORMATS = pytest.mark.parametrize("zipped", [False, True], ids=["legacy", "zip"])


class DnCNN(nn.Module):
    """A small module with the layout of cszn/DnCNN's pickled class (BatchNorm eps 1e-4)."""

    def __init__(self, depth: int = 4, n_channels: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, n_channels, 3, padding=1, bias=True), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(n_channels, n_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(n_channels, eps=0.0001, momentum=0.95), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(n_channels, 1, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dncnn(x)


def trained_dncnn(seed: int = 0) -> DnCNN:
    """A DnCNN-like module with non-trivial BatchNorm statistics (so eps and the running stats matter)."""
    torch.manual_seed(seed)
    m = DnCNN()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(1e-4, 1e-3)  # small variances: eps 1e-4 vs 1e-5 shows
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.1, 0.1)
    return m.eval()


def save(obj: object, path: Path, zipped: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    return path


def cscnet_release(tmp: Path, drop: str = "", extra: bool = False, wrong: bool = False) -> Path:
    """A small ConvLista_T release: state dict (official names) + .config, optionally damaged."""
    g = torch.Generator().manual_seed(1)
    sd = {f"apply_{x}.weight": 0.1 * torch.randn(4, 1, 5, 5, generator=g) for x in "ABC"}
    sd["soft_threshold.threshold"] = torch.full((1, 4, 1, 1), 0.01)
    if drop:
        del sd[drop]
    if extra:
        sd["apply_D.weight"] = torch.zeros(4, 1, 5, 5)
    if wrong:
        sd["apply_B.weight"] = torch.zeros(4, 1, 3, 3)
    conf = {"kernel_size": 5, "stride": 2, "num_filters": 4, "unfoldings": 3, "threshold": 0.01,
            "noise_std": 25 / 255}
    (tmp / "sigma_25.config").write_text(repr(conf))
    return save(sd, tmp / "sigma_25.model", zipped=False)


# ------------------------------------------------------------------ the restricted reader


@FORMATS
def test_reader_rebuilds_a_whole_module_like_torch(tmp_path, zipped):
    m = trained_dncnn()
    got = read_torch_file(save(m, tmp_path / "m.pth", zipped), stand_ins=frozenset({"DnCNN"}))
    assert isinstance(got, StandIn) and got.class_name == "DnCNN"
    tensors = dict(module_tensors(got))
    want = m.state_dict()
    assert list(tensors) == list(want)
    assert all(torch.equal(tensors[k], want[k]) for k in want)


@FORMATS
def test_reader_equals_torch_load_on_a_state_dict(tmp_path, zipped):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(6).view(2, 3).t(), "c": torch.randn(5)[1:4]}
    path = save(sd, tmp_path / "sd.pt", zipped)
    got, want = read_torch_file(path), torch.load(path, weights_only=True)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


class Evil:
    def __init__(self, target: object, arg: str) -> None:
        self.target, self.arg = target, arg

    def __reduce__(self):
        return self.target, (self.arg,)


@FORMATS
@pytest.mark.parametrize("target", ["system", "exec"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, zipped, target, capsys):
    marker = tmp_path / "PWNED"
    fn, arg = (os.system, f"touch {marker}") if target == "system" else (builtins.exec, f"open({str(marker)!r}, 'w')")
    path = save({"weight": torch.ones(2), "x": Evil(fn, arg)}, tmp_path / "model.pth", zipped)
    with pytest.raises(InputError, match="refused to unpickle") as e:
        read_torch_file(path, stand_ins=frozenset({"DnCNN"}))
    assert "\n" not in str(e.value) and not marker.exists()
    out = tmp_path / "out"
    assert main(["import", "dncnn", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to unpickle" in err
    assert not marker.exists() and not out.exists()


@FORMATS
def test_truncated_file_is_one_line(tmp_path, zipped):
    path = save(trained_dncnn(), tmp_path / "model.pth", zipped)
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 100):
        path.write_bytes(data[:cut])
        with pytest.raises(InputError) as e:
            import_release("dncnn", path, tmp_path / "out")
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ importers on synthetic releases


@FORMATS
def test_dncnn_import_reproduces_the_module(tmp_path, zipped):
    """Layout, BatchNorm eps 1e-4 and running statistics carried over: our forward equals the module's."""
    m = trained_dncnn()
    (tmp_path / "DnCNN_sigma25").mkdir()
    src = save(m, tmp_path / "DnCNN_sigma25" / "model.pth", zipped)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = import_release("dncnn", src, tmp_path / "ckpt")
    assert out["sigma"] == 25.0 and out["source"]["sha256"] == digest
    ours, meta = load_model(tmp_path / "ckpt")
    assert meta["model"]["bn_eps"] == 1e-4 and meta["source"]["file"] == "model.pth"
    y = torch.rand(1, 1, 20, 17, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(y), m(y), rtol=0, atol=1e-6)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # SRC untouched


def test_cscnet_import_reads_the_config(tmp_path):
    out = import_release("cscnet", cscnet_release(tmp_path), tmp_path / "ckpt")
    _, meta = load_model(tmp_path / "ckpt")
    m = meta["model"]
    assert (m["depth"], m["filters"], m["kernel_size"], m["stride"], m["negative_threshold"]) == (3, 4, 5, 2, "official")
    assert out["sigma"] == 25.0 and meta["run"]["noise"]["sigma"] == 25.0
    assert [f["file"] for f in meta["source"]["side_files"]] == ["sigma_25.config"]


@pytest.mark.parametrize(("damage", "message"), [
    ({"drop": "apply_C.weight"}, "missing tensor 'apply_C.weight'"),
    ({"extra": True}, "unexpected tensor 'apply_D.weight'"),
    ({"wrong": True}, "tensor 'apply_B.weight' has shape"),
])
def test_cscnet_state_dict_mismatch_is_one_line(tmp_path, damage, message, capsys):
    src = cscnet_release(tmp_path, **damage)
    assert main(["import", "cscnet", str(src), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "ckpt").exists()


def test_wrong_family_is_one_line(tmp_path, capsys):
    cscnet = cscnet_release(tmp_path)
    assert main(["import", "dncnn", str(cscnet), str(tmp_path / "a")]) == 2
    assert "not a whole pickled DnCNN module" in capsys.readouterr().err
    dncnn = save(trained_dncnn(), tmp_path / "sigma_25.model", zipped=False)  # a DnCNN where a CSCNet goes
    assert main(["import", "cscnet", str(dncnn), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to unpickle" in err and "DnCNN" in err
    (tmp_path / "x.config").write_text("__import__('os').system('true')")
    save({}, tmp_path / "x.model", zipped=False)
    assert main(["import", "cscnet", str(tmp_path / "x.model"), str(tmp_path / "c")]) == 2
    assert "not a Python-literal dict" in capsys.readouterr().err


def test_cli_import_then_evaluate_and_denoise(tmp_path, capsys):
    """An imported checkpoint is a normal one; OUT is never replaced without --overwrite."""
    src = cscnet_release(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert main(["import", "cscnet", str(src), str(ckpt)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"] == 3 * 4 * 25 + 4
    assert main(["import", "cscnet", str(src), str(ckpt)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import", "cscnet", str(src), str(ckpt), "--overwrite"]) == 0
    assert main(["import", "cscnet", str(src), str(tmp_path), "--overwrite"]) == 2  # not a checkpoint dir
    assert "not a checkpoint directory" in capsys.readouterr().err
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((torch.rand(24, 24) * 255).byte().numpy()).save(images / "a.png")
    assert main(["evaluate", str(ckpt), str(images)]) == 0
    assert main(["denoise", str(ckpt), str(images / "a.png"), str(tmp_path / "a_out.png")]) == 0
    assert (tmp_path / "a_out.png").is_file()


# ------------------------------------------------------------------ equivalence with the official code


def one_image(sigma: float) -> torch.Tensor:
    """A 96×96 crop of Set12's first image with seeded Gaussian noise (1, 1, 96, 96), unclipped."""
    from sparsefold.datasets import load_image

    x = load_image(sorted((DATA / "set12").iterdir())[0], gray=True)[:, 64:160, 64:160]
    return (x + sigma / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))[None]


def official_cscnet(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """drorsimon/CSCNet model/modules.py, imported by path; its uint8 masked_select mask made bool."""
    monkeypatch.syspath_prepend(str(OFFICIAL / "cscnet"))
    for name in ("model", "model.modules", "model.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    modules = importlib.import_module("model.modules")
    for name in ("model", "model.modules", "model.utils"):  # undone after the test by monkeypatch
        monkeypatch.setitem(sys.modules, name, sys.modules[name])
    masked_select = torch.masked_select
    monkeypatch.setattr(torch, "masked_select", lambda x, mask: masked_select(x, mask.bool()))
    return modules


@needs_official
@pytest.mark.parametrize("sigma", [15, 25])
def test_cscnet_release_equals_official_forward(tmp_path, monkeypatch, sigma):
    torch.set_num_threads(1)
    src = OFFICIAL / "cscnet" / "trained_models" / f"sigma_{sigma}.model"
    import_release("cscnet", src, tmp_path / "ckpt")
    ours, _ = load_model(tmp_path / "ckpt")
    modules = official_cscnet(monkeypatch)
    conf = json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]
    params = modules.ListaParams(conf["kernel_size"], conf["filters"], conf["stride"], conf["depth"])
    official = modules.ConvLista_T(params, A=torch.zeros(conf["filters"], 1, conf["kernel_size"], conf["kernel_size"]))
    official.load_state_dict(torch.load(src, map_location="cpu", weights_only=True))
    y = one_image(sigma)
    with torch.no_grad():
        got, want = ours.eval()(y), official.eval()(y)
    assert (got - want).abs().max().item() <= 1e-4


@needs_official
def test_dncnn_release_equals_official_forward(tmp_path, monkeypatch):
    """cszn/DnCNN main_test.py's class (imported by path; its skimage.measure import stubbed), loaded with
    the release's tensors under their own names, against our imported checkpoint."""
    torch.set_num_threads(1)
    src = OFFICIAL / "dncnn" / "TrainingCodes" / "dncnn_pytorch" / "models" / "DnCNN_sigma25" / "model.pth"
    import_release("dncnn", src, tmp_path / "ckpt")
    ours, meta = load_model(tmp_path / "ckpt")
    assert meta["model"]["bn_eps"] == 1e-4
    stub = types.ModuleType("skimage.measure")
    stub.compare_psnr = stub.compare_ssim = None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "skimage.measure", stub)
    spec = importlib.util.spec_from_file_location("dncnn_main_test", src.parents[2] / "main_test.py")
    assert spec is not None and spec.loader is not None
    main_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_test)
    official = main_test.DnCNN()
    official.load_state_dict(dict(module_tensors(read_torch_file(src, stand_ins=frozenset({"DnCNN"})))))
    y = one_image(25)
    with torch.no_grad():
        got, want = ours.eval()(y), official.eval()(y)
    assert (got - want).abs().max().item() <= 1e-4

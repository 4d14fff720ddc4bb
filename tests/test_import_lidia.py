"""``sparsefold import lidia``: the authors' LIDIA releases (gray, LIDIA-S, colour, blind) as checkpoints whose
forward is the official one.

Synthetic releases (our model's tensors under the official names, in tmp_path) check the refusals and the
hyperparameters read from the tensors; they run everywhere. The equivalence tests run the official
``code/modules.py`` (imported by path, never copied) on the released weights in ``../shared/official/lidia``
and are skipped when it is absent. The official scripts never call ``.eval()`` (their BatchNorm layers use
the statistics of each 40,000-patch chunk, FcNet's those of all patches): an import reproduces that
(``eval_bn="official"``, compared with the scripts' call on smaller chunks), and ``eval_bn="running"`` equals
the module in eval mode (the running statistics the checkpoints hold).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sparsefold.cli import main
from sparsefold.datasets import list_images, load_image
from sparsefold.errors import InputError
from sparsefold.models import build_model, count_parameters, neighbours
from sparsefold.models import lidia as lidia_mod
from sparsefold.models.lidia import LIDIAConfig
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.importers import import_release, lidia_name
from sparsefold.trainers.torchfile import read_torch_file

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official" / "lidia"
DATA = OFFICIAL.parents[1] / "data"
needs_official = pytest.mark.skipif(not (OFFICIAL / "models").is_dir() or not (DATA / "cbsd68").is_dir(),
                                    reason="../shared/official/lidia and ../shared/data (authors' releases) not present")
BLUR = "separable_fc_net.agg1.bilinear_conv.weight"


def lidia_release(tmp: Path, name: str = "model_state_sigma_25_bw.pt", blocks: int = 2, channels: int = 1,
                  drop: str = "", extra: bool = False, wrong: str = "") -> Path:
    """A release in the official format, {'state_dict': PatchDenoiseNet tensors, 'i': ...}, holding our
    randomly initialized model's tensors (small K and F), optionally damaged."""
    cfg = LIDIAConfig(channels=channels, patch_size=7 if channels == 1 else 5, neighbours=4, width=8,
                      blocks=blocks, weight_layers=2, stride=1)
    own = build_model(cfg).state_dict()
    sd: dict[str, torch.Tensor] = {}
    for k, v in own.items():
        if k in ("alpha", "a1"):
            sd |= {lidia_name(f"{k}.{i}", 2): v[i:i + 1].clone() for i in (0, 1)}
        else:
            sd[lidia_name(k, 2)] = v.reshape(1) if k == "beta" else v
    sd[BLUR] = (torch.tensor([1.0, 2, 1]).outer(torch.tensor([1.0, 2, 1])) / 16).view(1, 1, 3, 3)
    if drop:
        del sd[drop]
    if extra:
        sd["separable_fc_net.sep_part2.ver_hor_bn_re4.ver_hor.b"] = torch.zeros(16, 8)
    if wrong:
        sd[wrong] = torch.zeros(3, 3)
    torch.save({"state_dict": sd, "i": 200000}, tmp / name)
    return tmp / name


@pytest.mark.parametrize(("blocks", "channels"), [(2, 1), (1, 1), (2, 3)], ids=["lidia", "lidia-s", "colour"])
def test_hyperparameters_come_from_the_tensors(tmp_path, blocks, channels):
    src = lidia_release(tmp_path, blocks=blocks, channels=channels)
    import_release("lidia", src, tmp_path / "ckpt")
    ours, meta = load_model(tmp_path / "ckpt")
    m = meta["model"]
    assert (m["channels"], m["patch_size"], m["neighbours"], m["width"], m["blocks"], m["weight_layers"]) == (
        channels, 7 if channels == 1 else 5, 4, 8, blocks, 2)
    assert (m["stride"], m["window"], m["search"], m["aggregation"], m["w11_min"]) == (1, 29, "official", "official", 0)
    assert meta["run"]["data"]["gray"] is (channels == 1) and meta["run"]["noise"]["sigma"] == 25.0
    sd = read_torch_file(src)["state_dict"]
    assert count_parameters(ours) == sum(v.numel() for k, v in sd.items() if k != BLUR and "running" not in k
                                         and "num_batches" not in k)


def test_blind_release_gets_the_sigma_range(tmp_path):
    import_release("lidia", lidia_release(tmp_path, "model_state_small_sigma_blind_bw.pt", blocks=1), tmp_path / "c")
    noise = json.loads((tmp_path / "c" / "config.json").read_text())["run"]["noise"]
    assert (noise["sigma"], noise["sigma_max"]) == (10.0, 30.0)


@pytest.mark.parametrize(("damage", "message"), [
    ({"drop": "weights_net1.fc_out.bias"}, "missing tensor 'weights_net1.fc_out.bias'"),
    ({"drop": BLUR}, f"missing tensor {BLUR!r}"),
    ({"extra": True}, "unexpected tensor 'separable_fc_net.sep_part2.ver_hor_bn_re4.ver_hor.b'"),
    ({"wrong": "separable_fc_net.ver_hor_agg1_pre.b"}, "tensor 'separable_fc_net.ver_hor_agg1_pre.b' has shape"),
])
def test_damaged_release_is_one_line(tmp_path, damage, message, capsys):
    src = lidia_release(tmp_path, **damage)
    assert main(["import", "lidia", str(src), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "ckpt").exists()


def test_wrong_family_is_one_line(tmp_path, capsys):
    cscnet = tmp_path / "sigma_25.model"  # a CSCNet ConvLista_T state dict
    torch.save({f"apply_{x}.weight": torch.zeros(4, 1, 5, 5) for x in "ABC"}, cscnet)
    (tmp_path / "sigma_25.config").write_text(repr({"kernel_size": 5, "stride": 2, "num_filters": 4, "unfoldings": 3}))
    assert main(["import", "lidia", str(cscnet), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a LIDIA release" in err, err
    with pytest.raises(InputError, match="not a LIDIA state dict"):
        torch.save([torch.zeros(2)], tmp_path / "list.pt")
        import_release("lidia", tmp_path / "list.pt", tmp_path / "b")


# ------------------------------------------------------------------ equivalence with the official code


def official_modules(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """grishavak/LIDIA-denoiser code/modules.py, imported by path (torchvision, which only its training
    helpers use, stubbed when absent)."""
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.transforms", tv.transforms)  # type: ignore[attr-defined]
    monkeypatch.syspath_prepend(str(OFFICIAL / "code"))
    names = ("modules", "utils", "data_modules")
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    modules = importlib.import_module("modules")
    for name in names:  # removed again after the test by monkeypatch
        monkeypatch.setitem(sys.modules, name, sys.modules[name])
    return modules


@needs_official
@pytest.mark.parametrize("eval_bn", ["official", "running"])
@pytest.mark.parametrize(("release", "sigma", "rgb", "small", "params"), [
    ("model_state_sigma_15_bw.pt", 15, False, False, 61_589),
    ("model_state_sigma_25_bw.pt", 25, False, False, 61_589),
    ("model_state_small_sigma_25_bw.pt", 25, False, True, 40_226),
    ("model_state_sigma_25_c.pt", 25, True, False, 94_067),
])
def test_lidia_release_equals_official_forward(tmp_path, monkeypatch, release, sigma, rgb, small, params, eval_bn):
    """A 40×40 crop (Set12 / CBSD68 first image, seeded noise, unclipped) through the imported checkpoint
    and through the official NonLocalDenoiser (inference path: reflect and −1 padding, both scales), as the
    official scripts call it (BatchNorm in training mode, patch chunks: 4 uneven ones of the 2,116 patches
    here) or in eval mode."""
    torch.set_num_threads(1)  # the official search is 5 × 841 tiny convolutions: threads only add overhead
    if sigma == 15:  # one reference row per distance table: the banded search equals the whole one
        monkeypatch.setattr(neighbours, "_TABLE", 1)
    src = OFFICIAL / "models" / release
    out = import_release("lidia", src, tmp_path / "ckpt")
    assert out["params"] == params and out["sigma"] == sigma
    ours, _ = load_model(tmp_path / "ckpt")
    assert ours.config.eval_bn == "official"  # the scripts' way is what an import reproduces
    if eval_bn == "running":
        ours = build_model(dataclasses.replace(ours.config, eval_bn="running"), init=False)
        ours.load_state_dict(load_model(tmp_path / "ckpt")[0].state_dict())
    chunk = 700
    monkeypatch.setattr(lidia_mod, "_OFFICIAL_CHUNK", chunk)
    modules = official_modules(monkeypatch)
    opt = modules.ArchitectureOptions(rgb=rgb, small_network=small)
    official = modules.NonLocalDenoiser(modules.calc_padding(opt)[0], opt)
    official.patch_denoise_net.load_state_dict(torch.load(src, map_location="cpu", weights_only=True)["state_dict"])
    x = load_image(list_images(DATA / ("cbsd68" if rgb else "set12"))[0], gray=not rgb)[:, 100:140, 60:100]
    y = (x + sigma / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))[None]
    with torch.no_grad():
        got = ours.eval()(y)
        official.train(eval_bn == "official")  # the official [−1, 1] scale:
        want = official(2 * y - 1, train=False, save_memory=True, max_chunk=chunk) / 2 + 0.5
    assert (got - want).abs().max().item() <= 1e-4

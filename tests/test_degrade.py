"""Restoration tasks' data (datasets/degrade.py, ``task`` config section): y = A x + n drawn per sample, the
exact operator carried with the batch, the evaluation convention, and the config checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsefold.config import NoiseConfig, TaskConfig, load_config
from sparsefold.datasets import load_image, save_image
from sparsefold.datasets.degrade import degrade, join, make_operator, split
from sparsefold.errors import ConfigError
from sparsefold.trainers.checkpoint import load_model
from sparsefold.trainers.evaluate import measured_versions

TASKS = [TaskConfig(kind="inpaint"), TaskConfig(kind="inpaint", mask="blocks", block=8, holes=2),
         TaskConfig(kind="deblur"), TaskConfig(kind="deblur", kernel="motion", kernel_size=9, motion_length=5,
                                                   boundary="reflect"),
         TaskConfig(kind="sr", factor=4), TaskConfig(kind="sr", factor=2, filter="box"),
         TaskConfig(kind="csmri", rate=0.33), TaskConfig(kind="csmri", sampling="radial")]
IDS = ["inpaint", "blocks", "gauss-blur", "motion-blur", "sr4", "sr2-box", "mri-cartesian", "mri-radial"]


def clean(b: int = 3, c: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_measurement_is_the_operator_plus_the_noise(task) -> None:
    x = clean()
    y0, sigma0, op = degrade(x, task, NoiseConfig(sigma=0.0), torch.Generator().manual_seed(0))
    assert y0.shape == op.measurement_shape(tuple(x.shape)) and sigma0.shape == (3,)
    torch.testing.assert_close(y0, op.A(x))  # σ = 0: exactly A x
    y, sigma, op2 = degrade(x, task, NoiseConfig(sigma=25.0), torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(op.params().values(), op2.params().values()))  # same draws first
    residual = (y - op.A(x)).abs()
    observed = op.params().get("mask", torch.ones(1)).expand(residual.shape).bool()
    assert residual[observed].pow(2).mean().sqrt().item() == pytest.approx(25 / 255, rel=0.15)  # E|n|^2 = (σ/255)^2
    assert not residual[~observed].any()  # nothing measured there, no noise either
    y_again, _, _ = degrade(x, task, NoiseConfig(sigma=25.0), torch.Generator().manual_seed(0))
    assert torch.equal(y, y_again)  # a function of the generator's state


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_a_batch_carries_each_samples_operator(task) -> None:
    """Per-sample params split into items and joined into one batch operator give back the same A."""
    x = clean(b=4)
    _, _, op = degrade(x, task, NoiseConfig(sigma=0.0), torch.Generator().manual_seed(3))
    items = split(op, 4)
    again = make_operator(op.name, join(op.name, items))
    torch.testing.assert_close(again.A(x), op.A(x))
    first = make_operator(op.name, join(op.name, items[:1]))
    torch.testing.assert_close(first.A(x[:1]), op.A(x)[:1])  # item 0 is sample 0's operator


def test_random_masks_differ_between_samples_and_keep_the_rate() -> None:
    _, _, op = degrade(clean(b=8, size=64), TaskConfig(kind="inpaint", keep=0.3), NoiseConfig(sigma=0.0),
                       torch.Generator().manual_seed(0))
    mask = op.params()["mask"]
    assert not torch.equal(mask[0], mask[1]) and abs(mask.mean().item() - 0.3) < 0.02


def test_evaluation_convention_is_seeded_in_order_and_crops_for_sr() -> None:
    images = [clean(b=1, size=s)[0] for s in (30, 33)]
    task = TaskConfig(kind="sr", factor=4)
    a, b = measured_versions(images, task, NoiseConfig(sigma=15.0)), measured_versions(images, task, NoiseConfig(sigma=15.0))
    assert [x.shape[-1] for x, *_ in a] == [28, 32]  # cropped to a multiple of the factor
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, b))
    sigma_range = measured_versions(images, TaskConfig(kind="inpaint"), NoiseConfig(sigma=10.0, sigma_max=30.0))
    assert all(float(s) == 20.0 for _, _, s, _ in sigma_range)  # a σ range evaluates at its middle


@pytest.mark.parametrize(("overrides", "field"), [
    (["task.kind=inpaint"], "task.kind"),  # cscnet takes no operator
    (["model.name=admmnet", "task.kind=deblur"], "task.kind"),  # admmnet: identity and MRI only
    (["task.kind=blur"], "task.kind"),
    (["task.kind=deblur", "task.kernel_size=8"], "task.kernel_size"),
    (["task.kind=sr", "task.factor=5"], "task.factor"),
    (["task.kind=csmri", "task.rate=0"], "task.rate"),
])
def test_bad_task_config_is_one_line_naming_the_field(overrides, field) -> None:
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config(None, overrides)


def test_denoising_runs_keep_their_names() -> None:
    """The task section at its defaults is not in a run's name: existing runs resume by the same command."""
    from sparsefold.trainers.storage import default_run_name

    assert default_run_name(load_config(None, [])) == "cscnet-61e36639"
    assert dataclasses.asdict(load_config(None, []).task)["kind"] == "denoise"


@pytest.mark.parametrize("task", [["task.kind=inpaint", "task.keep=0.5"], ["task.kind=deblur", "task.kernel=motion",
                                  "task.kernel_size=7", "task.motion_length=4"], ["task.kind=sr", "task.factor=2"],
                                  ["task.kind=csmri", "task.rate=0.33"]], ids=["inpaint", "deblur", "sr", "csmri"])
def test_a_restoration_task_trains_and_evaluates_through_the_cli(task, tiny_overrides, tmp_path, capsys) -> None:
    """The plain loop on shards of photos: batches carry each sample's operator; validation and ``evaluate``
    score the checkpoint on its training task (the restoration convention), better than Aᵀy."""
    import json

    from PIL import Image
    from skimage import data as skdata

    from sparsefold.cli import main

    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(skdata.camera()[100:196, 150:246]).save(val / "camera.png")
    over = [o for o in tiny_overrides if not o.startswith("model.")] + [
        "model.name=pgnet", "model.depth=3", "model.filters=8", "model.kernel_size=5", "noise.sigma=5",
        "data.patch_size=32", f"data.val={val}", "trainer.max_steps=30", "trainer.val_every=30",
        "trainer.ckpt_every=30", "optim.lr=5e-3", *task]
    assert main(["train", *over]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["evaluate", run["checkpoint"], str(val), "--sigma", "5"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["task"] == task[0].split("=")[1]
    assert scored["psnr"] == pytest.approx(run["val_psnr"], abs=1e-6)  # validation is the same convention
    assert scored["psnr"] > scored["input_psnr"] + 0.5, scored  # 30 steps: +0.8 (deblur) to +9 dB (inpaint)
    _restore_matches_evaluate(run["checkpoint"], val, task[0].split("=")[1], scored["psnr"], tmp_path, capsys)


def _restore_matches_evaluate(checkpoint: str, val: Path, kind: str, psnr: float, tmp_path: Path, capsys) -> None:
    """``restore --simulate`` draws y as ``evaluate`` does (same PSNR); ``restore`` of that y written to files
    (image + --mask / --kernel, k-space .npy) gives the same restoration; missing --mask is one line."""
    from sparsefold.cli import main

    out = tmp_path / "restored"
    assert main(["restore", checkpoint, str(val), str(out), "--simulate", "--sigma", "5",
                 "--measurement", str(tmp_path / "aty")]) == 0
    err = capsys.readouterr().err
    assert f"-> {psnr:.2f} dB ({kind})" in err, err
    assert (tmp_path / "aty" / "camera.png").is_file()
    assert main(["restore", checkpoint, str(val), str(out), "--simulate"]) == 2  # exists: never replaced
    assert "exists" in capsys.readouterr().err

    _, meta = load_model(checkpoint)
    task = TaskConfig(**meta["run"]["task"])
    x, y, _, op = measured_versions([load_image(val / "camera.png")], task, NoiseConfig(sigma=5))[0]
    extra, src = [], tmp_path / "y.png"
    if kind == "csmri":
        src = tmp_path / "y.npy"
        np.save(src, y[0, 0].numpy())
        np.save(tmp_path / "mask.npy", op.params()["mask"][0, 0].numpy())
        extra = ["--mask", str(tmp_path / "mask.npy")]
    else:
        save_image(y[0].clamp(0, 1), src)  # 8-bit: the restoration moves by the quantization only
        if kind == "inpaint":
            save_image(op.params()["mask"][0], tmp_path / "mask.png")
            extra = ["--mask", str(tmp_path / "mask.png")]
        if kind == "deblur":
            np.save(tmp_path / "kernel.npy", op.params()["kernel"][0, 0].numpy())
            extra = ["--kernel", str(tmp_path / "kernel.npy")]
    if kind in ("inpaint", "csmri"):
        assert main(["restore", checkpoint, str(src), str(tmp_path / "r.png")]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: task {kind}: give the mask")
    assert main(["restore", checkpoint, str(src), str(tmp_path / "r.png"), "--sigma", "5", *extra]) == 0
    restored = load_image(tmp_path / "r.png")
    simulated = load_image(out / "camera.png")
    assert restored.shape == x.shape
    assert (restored - simulated).abs().mean() < (0 if kind == "csmri" else 2) / 255 + 1e-6


def test_restore_with_a_denoiser_is_denoise(tmp_path, capsys) -> None:
    """``restore`` generalizes ``denoise``: a denoising checkpoint gives denoise's output, file for file."""
    from PIL import Image
    from skimage import data as skdata

    from sparsefold.cli import main

    src = tmp_path / "noisy.png"
    Image.fromarray(skdata.camera()[:64, :80]).save(src)
    assert main(["denoise", "cscnet", str(src), str(tmp_path / "d.png"), "--sigma", "25"]) == 0
    assert main(["restore", "cscnet", str(src), str(tmp_path / "r.png"), "--sigma", "25"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "d.png"), str(tmp_path / "r.png")]
    assert torch.equal(load_image(tmp_path / "d.png"), load_image(tmp_path / "r.png"))
    assert main(["restore", "cscnet", str(src), str(tmp_path / "x.png"), "--simulate", "--mask", str(src)]) == 2

"""One source of truth at the edges: the data-spec fallback syntax and the evaluation noise level are each
defined once, and every consumer reads them the same way (they used to disagree on stray separators,
spaces and σ ranges)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

from sparsefold.cli import noise_for
from sparsefold.config import DataConfig, NoiseConfig, check_data_paths, spec_options
from sparsefold.datasets.prepare import val_files
from sparsefold.launch import _only_relative
from sparsefold.trainers.storage import absolute_paths


@pytest.mark.parametrize(("spec", "options"), [
    ("a|b", ["a", "b"]),
    (" a | b ", ["a", "b"]),
    ("a||", ["a"]),
    ("|", []),
    ("", []),
    ("pipe:cat x | tee y", ["pipe:cat x | tee y"]),  # a shell command, not fallbacks
    ("builtin:skimage", ["builtin:skimage"]),
])
def test_spec_options(spec, options):
    assert spec_options(spec) == options


def test_every_consumer_reads_the_fallbacks_alike(tmp_path, monkeypatch):
    """`` missing | folder|`` (spaces, a stray separator): the preflight accepts it, the data layer uses the
    folder, the run identity names both options absolutely, and launch sees two relative paths."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "val"
    folder.mkdir()
    Image.new("L", (24, 24), 128).save(folder / "a.png")
    spec = " missing | val|"
    data = DataConfig(val=spec)
    check_data_paths(data)  # no error: one option exists
    assert [p.name for p in val_files(data)] == ["a.png"]
    assert absolute_paths(spec) == f"{tmp_path / 'missing'}|{folder}"
    assert _only_relative(spec) == ["missing", "val"]
    assert _only_relative("missing|builtin:skimage") == []  # not every option is a relative path


def test_evaluation_sigma_is_defined_once():
    rng = NoiseConfig(sigma=15, sigma_max=35)
    assert rng.eval_sigma == 25 and rng.at_evaluation() == NoiseConfig(sigma=25)
    assert NoiseConfig(kind="poisson", peak=4).eval_sigma == 0.0
    args = argparse.Namespace(noise=None, sigma=None, peak=None, trials=None)
    meta = {"run": {"noise": {"kind": "gaussian", "sigma": 15, "sigma_max": 35}}}
    assert noise_for(args, meta) == NoiseConfig(sigma=25)  # what evaluate scores a σ-range checkpoint with
    args.sigma = 50
    assert noise_for(args, meta).eval_sigma == 50


def test_a_missing_only_option_is_refused_with_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=r"data.val: nope \|: no such image folder"):
        check_data_paths(DataConfig(val="nope |"))
    assert not Path("nope").exists()

"""``trainer.init_from``: a new run (new optimizer, step 0, its own directory) that starts from another
checkpoint's weights; shapes must match the config, or one line says which tensor differs."""

from __future__ import annotations

import pytest
import torch

from sparsefold.cli import main
from sparsefold.config import load_config
from sparsefold.errors import InputError
from sparsefold.trainers.loop import Dist, start, train
from sparsefold.trainers.storage import default_run_name, latest_checkpoint, run_dir_of

pytestmark = pytest.mark.usefixtures("one_thread")
FEW = ["trainer.max_steps=3", "trainer.val_every=3", "trainer.ckpt_every=3", "data.val_images=1"]


@pytest.fixture
def source(tiny_overrides):
    """A 3-step tiny CSCNet run (in the test's runs folder): the checkpoint fine-tuning starts from."""
    return train(load_config(None, tiny_overrides + FEW + ["trainer.run_name=source"]))["checkpoint"]


def test_a_fine_tuning_run_starts_from_the_weights_at_step_0(source, tiny_overrides, capsys):
    from safetensors.torch import load_file

    cfg = load_config(None, tiny_overrides + FEW + [f"trainer.init_from={source}", "noise.sigma=30"])
    run = start(cfg, Dist())
    weights = load_file(f"{source}/model.safetensors")
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in weights.items())
    assert run.state.step == 0 and run.resumed_from is None and not run.opt.state  # not a resume
    assert f"starts from the weights of {source}" in capsys.readouterr().err


def test_the_fine_tuning_run_is_its_own_run_and_resumes_as_usual(source, tiny_overrides, capsys):
    scratch = load_config(None, tiny_overrides + FEW)
    tuned = load_config(None, tiny_overrides + FEW + [f"trainer.init_from={source}"])
    assert default_run_name(tuned) != default_run_name(scratch)  # never resumes the scratch run, nor it
    first = train(tuned)
    assert first["steps"] == 3 and latest_checkpoint(run_dir_of(tuned)) is not None
    assert "starts from the weights" in capsys.readouterr().err
    longer = load_config(None, tiny_overrides + FEW[1:] + ["trainer.max_steps=5", f"trainer.init_from={source}"])
    again = train(longer)  # same run: resumed from its own step 3, the source's weights not loaded again
    assert again["resumed_from_step"] == 3 and again["steps"] == 5
    assert "starts from the weights" not in capsys.readouterr().err


def test_a_checkpoint_of_another_shape_is_one_line_naming_the_tensor(source, tiny_overrides):
    cfg = load_config(None, tiny_overrides + FEW + [f"trainer.init_from={source}", "model.filters=8"])
    with pytest.raises(InputError, match=r"^trainer\.init_from: .*wrong shape \['A'.* is \(16, 1, 7, 7\) there, "
                                         r"\(8, 1, 7, 7\) here.*model\.\* must describe"):
        start(cfg, Dist())


def test_from_the_cli_a_missing_checkpoint_is_exit_2(tiny_overrides, tmp_path, capsys):
    assert main(["train", *tiny_overrides, *FEW, f"trainer.init_from={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.init_from:" in err[0] and "nope" in err[0]

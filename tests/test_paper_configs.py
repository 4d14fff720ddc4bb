"""The paper recipes (sparsefold/configs/papers/<model>.yaml): one per zoo model, each loads and validates,
builds its model with the paper's parameter count, and its lr schedule ends where the paper's does. No
training. Also the two trainer options only the recipes use: ``optim.kind=sgd`` and ``loss.kind=log_mse``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsefold
from sparsefold.config import ConfigError, LossConfig, NoiseConfig, OptimConfig, load_config
from sparsefold.models import MODELS, build_model, count_parameters
from sparsefold.trainers.loop import lr_at, make_optimizer
from sparsefold.trainers.losses import Objective

PAPERS = Path(sparsefold.__file__).resolve().parent / "configs" / "papers"
FILES = sorted(PAPERS.glob("*.yaml"))

# The papers' parameter counts, with their source (the official code / released weights). LISTA: the paper
# gives none for an image denoiser (it trains an encoder of codes), so it has no entry.
PAPER_PARAMS = {
    "cscnet": 63_700,  # 3·175·1·11² + 175: apply_A/B/C + threshold of CSCNet's trained_models/sigma_25.model
    "cdlnet": 64_000,  # 2·K·M·P² + 2·K·M, K=20 M=32 P=7 (CDLNet-OJSP args.json): the paper's "64k"
    "dcea_c": 20_618,  # 169·11² + 169: DEA2Dtied of dea src/model.py with conf.py's peak-4 config
    "dcea_uc": 61_516,  # 3·169·11² + 169: DEA2Dfree, same config
    "deep_ksvd": 35_138,  # D 64·256 + MLP 18,689 + c + mask 64 (Deep-K-SVD DKSVD_train_model.py)
    "lidia": 61_589,  # the trainable tensors of LIDIA-denoiser models/model_state_sigma_25_bw.pt
    "dncnn": 556_096,  # DnCNN-S 17×64 with BatchNorm (DnCNN dncnn_pytorch/main_train.py)
    "admmnet": 14_352,  # 16 X layers (8·8 + 8) + 15 × (C 8·8, Z 8·101, M 8) (Deep-ADMM-Net InitNet.m)
    "vdsr": 665_921,  # 20 layers 3×3×64 with biases: the paper's "665k" (no training code released)
}

# The last step's learning rate where the recipe documents it.
FINAL_LR = {
    "dncnn": 1e-4,  # DnCNN Demo_Train_model_64_25_Res_Bnorm_Adam.m: 1e-3 for 30 epochs, then 1e-4
    "lidia": 7.07e-4,  # the LIDIA checkpoints' final lr
    "cscnet": 1.2187421321234438e-4 * 0.7395198651814172 ** 4,  # CSCNet sigma_25.config: 4 decays in 250 epochs
    "dcea_c": 1e-3 * 0.8 ** 15,  # dea conf.py: x0.8 every 25 of 400 epochs: 15 decays by the last (torch < 1.1)
    "vdsr": 0.1 * 800 * 1e-3,  # the paper's 0.1 -> 1e-4 (3 decays), at our loss scale (mean, not sum/2 of 40²)
}


NO_PAPER = {"pgnet": "our unfolded proximal-gradient restorer (issue 18): no paper to reproduce"}


def test_every_zoo_model_has_a_paper_recipe() -> None:
    assert {f.stem for f in FILES} == set(MODELS) - set(NO_PAPER)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_paper_recipe_loads_and_builds_the_papers_model(path: Path) -> None:
    cfg = load_config(path, [])
    assert cfg.model.name == path.stem
    n = count_parameters(build_model(cfg.model, init=False))
    if path.stem in PAPER_PARAMS:
        assert n == PAPER_PARAMS[path.stem]
    if path.stem in FINAL_LR:
        assert lr_at(cfg.trainer.max_steps - 1, cfg) == pytest.approx(FINAL_LR[path.stem], rel=2e-3)
    assert cfg.runtime.use_gpu and cfg.trainer.run_name.startswith(f"paper-{path.stem}-")


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_paper_recipe_header_says_how_to_run_it(path: Path) -> None:
    """The header names the command and how to point at one's own data, and cites the authors' repository
    files, not our shared copies of them or our notes (a clone has neither)."""
    comments = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    text = "\n".join(comments)
    assert comments[0].startswith("# Paper recipe: ")
    assert f"sparsefold train sparsefold/configs/papers/{path.stem}.yaml" in text
    assert "data.train=" in text
    assert "shared/official" not in text and "shared/notes" not in text


def test_sgd_optimizer_and_its_checks() -> None:
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, OptimConfig(kind="sgd", momentum=0.5, lr=0.1, weight_decay=1e-4))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.5 and opt.defaults["weight_decay"] == 1e-4
    assert isinstance(make_optimizer(model, OptimConfig()), torch.optim.Adam)
    with pytest.raises(ConfigError, match=r"^optim\.kind: unknown optimizer 'rmsprop'"):
        load_config(None, ["optim.kind=rmsprop"])
    with pytest.raises(ConfigError, match=r"^optim\.momentum: must be in \[0, 1\)"):
        load_config(None, ["optim.momentum=1"])


def test_log_mse_loss_is_log10_of_the_mse() -> None:
    clean = torch.rand(2, 1, 8, 8)
    noisy = clean + 0.1 * torch.randn(2, 1, 8, 8)

    class Identity(nn.Module):
        def forward(self, y: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
            return y

    loss = Objective(Identity(), LossConfig(kind="log_mse"), NoiseConfig())(noisy, clean)
    assert float(loss) == pytest.approx(math.log10(float(torch.mean((noisy - clean) ** 2))), rel=1e-6)
    assert torch.isfinite(Objective(Identity(), LossConfig(kind="log_mse"), NoiseConfig())(clean, clean))

"""Shared fixtures. Tests never write into the repository or ~/.cache: runs and caches go to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sparsefold-cache")


@pytest.fixture
def tiny_overrides(tmp_path, cache_dir) -> list[str]:
    """A small, fast CSCNet run on the builtin photos (real images), W&B offline into tmp."""
    return [
        "model.name=cscnet", "model.depth=4", "model.filters=16", "model.kernel_size=7", "model.stride=2",
        "data.train=builtin:skimage", "data.val=builtin:skimage", "data.val_images=2", "data.patch_size=48",
        "data.batch_size=4", "data.num_workers=0", f"data.cache_dir={cache_dir}",
        f"trainer.output_dir={tmp_path / 'runs'}", "trainer.progress=false", "trainer.log_every=5",
        "wandb.mode=offline", "optim.lr=2e-3", "optim.schedule=constant",
    ]


@pytest.fixture(scope="module")
def one_thread():
    """Behaviour, not speed: one intra-op thread keeps model tests fast and steady on a shared 2-core box.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

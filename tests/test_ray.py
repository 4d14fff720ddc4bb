"""Ray Train DDP: the same loop on 2 workers (gloo), one report per validation with a checkpoint.

One local Ray cluster for the module; each `fit` costs ~30 s on 2 cores, so there is only one fit here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparsefold.config import load_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    ray.init(num_cpus=2, include_dashboard=None, log_to_driver=False,
             runtime_env={"env_vars": {"WANDB_MODE": "offline", "RAY_CHDIR_TO_TRIAL_DIR": "0"}})
    yield ray
    ray.shutdown()


def test_two_worker_ddp(ray_cluster, tiny_overrides, tmp_path):
    from sparsefold.trainers.checkpoint import load_model
    from sparsefold.trainers.ray_train import fit

    cfg = load_config(None, tiny_overrides + [
        "trainer.use_ray=true", "trainer.workers=2", "trainer.cpus_per_worker=0.9", "trainer.max_steps=16",
        "trainer.val_every=8", "trainer.run_name=ddp", "data.num_workers=1",
    ])
    out = fit(cfg)
    assert out["steps"] == 16
    assert out["samples"] == 16 * 4 * 2  # both ranks' batches count
    assert out["val_psnr"] > 20.0
    ckpt = Path(out["checkpoint"])
    assert ckpt.is_dir() and str(ckpt).startswith(str(tmp_path))
    model, meta = load_model(ckpt)
    assert meta["state"]["step"] == 16

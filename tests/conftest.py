"""Shared fixtures. Tests never write into the repository or ~/.cache: runs and caches go to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sparsefold-cache")


@pytest.fixture
def tiny_overrides(tmp_path, cache_dir) -> list[str]:
    """A small, fast CSCNet run on the builtin photos (real images), W&B disabled: starting a W&B run (even
    offline: a service process) costs seconds; a test that checks what W&B writes opts in with
    ``wandb.mode=offline`` (into tmp)."""
    return [
        "model.name=cscnet", "model.depth=4", "model.filters=16", "model.kernel_size=7", "model.stride=2",
        "data.train=builtin:skimage", "data.val=builtin:skimage", "data.val_images=2", "data.patch_size=48",
        "data.batch_size=4", "data.num_workers=0", f"data.cache_dir={cache_dir}",
        f"trainer.output_dir={tmp_path / 'runs'}", "trainer.progress=false", "trainer.log_every=5",
        "wandb.mode=disabled", "optim.lr=2e-3", "optim.schedule=constant",
    ]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """ONE local Ray cluster (2 CPUs, with the dashboard that sweeps need) for every test that needs one,
    started when the first asks (they run last: :func:`pytest_collection_modifyitems`). What the Train
    controllers and workers read at start is set here, before Ray starts: the health-check interval, W&B
    offline, and ``SPARSEFOLD_FAULT_DIR`` (the fault-injection hook, inert until a test writes its ``hold``
    file). Yields ``.ray`` (the module) and ``.fault_dir``."""
    ray = pytest.importorskip("ray")
    from sparsefold.sweeps.runner import init_local_ray

    fault = tmp_path_factory.mktemp("fault")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    init_local_ray(num_cpus=2, env={"WANDB_MODE": "offline", "SPARSEFOLD_FAULT_DIR": str(fault)},
                   log_to_driver=False)
    yield SimpleNamespace(ray=ray, fault_dir=fault)
    ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the shared Ray cluster run last (stable order otherwise): the cluster starts once, and no
    other test shares the 2 cores with its idle processes or sees Ray already initialized."""
    items.sort(key=lambda item: "ray_cluster" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="module")
def one_thread():
    """Behaviour, not speed: one intra-op thread keeps model tests fast and steady on a shared 2-core box.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

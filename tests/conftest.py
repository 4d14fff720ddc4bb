"""Shared fixtures. Tests never write into the repository or ~/.cache: runs and caches go to tmp dirs."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparsefold.launch import SUBPACKAGES
from sparsefold.trainers.ray_env import use_ray_train_env
from sparsefold.trainers.storage import bundled_models, read_config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tests never log online: wandb.mode=auto goes online whenever wandb could find an API key (README, "W&B"),
# whatever WANDB_MODE says, so none is visible to them (no key variable, an empty netrc).
for _name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
    os.environ.pop(_name, None)
os.environ["NETRC"] = os.devnull

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _only_python(folder: str, names: list[str]) -> list[str]:
    """copytree ``ignore``: keep .py files and sub-folders (no caches, configs, weights)."""
    return [n for n in names if n == "__pycache__" or not (n.endswith(".py") or (Path(folder) / n).is_dir())]


def installed_layout(dest: Path) -> Path:
    """Copy the installed package's sources to ``dest`` in one tree (``sparsefold/models/...``): the
    repository maps four top-level folders onto ``sparsefold.*`` (``[tool.setuptools.package-dir]``), while
    import-linter and mypy read a package from one folder."""
    for name in ("sparsefold", *(f"sparsefold.{sub}" for sub in SUBPACKAGES)):  # the package before its parts
        source = find_spec(name).submodule_search_locations[0]
        shutil.copytree(source, dest.joinpath(*name.split(".")), ignore=_only_python, dirs_exist_ok=True)
    return dest


@pytest.fixture
def package_tree() -> Callable[[Path], Path]:
    """:func:`installed_layout` (a function: ``package_tree(dest)`` fills and returns ``dest``)."""
    return installed_layout


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sparsefold-cache")


def tiny_run(output_dir: Path, cache_dir: Path) -> list[str]:
    """A small, fast CSCNet run on the builtin photos (real images), W&B disabled: starting a W&B run (even
    offline: a service process) costs seconds; a test that checks what W&B writes opts in with
    ``wandb.mode=offline`` (into tmp)."""
    return [
        "model.name=cscnet", "model.depth=4", "model.filters=16", "model.kernel_size=7", "model.stride=2",
        "data.train=builtin:skimage", "data.val=builtin:skimage", "data.val_images=2", "data.patch_size=48",
        "data.batch_size=4", "data.num_workers=0", f"data.cache_dir={cache_dir}",
        f"trainer.output_dir={output_dir}", "trainer.progress=false", "trainer.log_every=5",
        "wandb.mode=disabled", "optim.lr=2e-3", "optim.schedule=constant",
    ]


@pytest.fixture
def tiny_overrides(tmp_path, cache_dir) -> list[str]:
    """:func:`tiny_run` into ``<tmp_path>/runs``."""
    return tiny_run(tmp_path / "runs", cache_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray cluster per test process (2 CPUs, with the dashboard that sweeps need) for its tests,
    started when the first asks (they run last: :func:`pytest_collection_modifyitems`). What the Train
    controllers and workers read at start is set here, before Ray starts (Ray Train propagates the
    ``RAY_TRAIN_*`` variables of the driver): the health-check interval, no preemption watcher (one actor
    process less per fit; a local cluster is never drained), W&B offline. Yields the ``ray`` module."""
    ray = pytest.importorskip("ray")
    from sparsefold.sweeps.runner import init_local_ray

    use_ray_train_env()
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    init_local_ray(num_cpus=2, env={"WANDB_MODE": "offline"}, log_to_driver=False)
    yield ray
    ray.shutdown()


# 2-worker DDP (gloo), a checkpoint every 4 steps, a validation every 8, one restart allowed
DDP = ["ray.enabled=true", "ray.workers=2", "ray.cpus_per_worker=0.9", "ray.max_failures=1", "data.num_workers=1",
       "trainer.max_steps=16", "trainer.val_every=8", "trainer.ckpt_every=4", "trainer.keep_checkpoints=0"]


@pytest.fixture(scope="session")
def ddp_run(ray_cluster, tmp_path_factory, cache_dir) -> SimpleNamespace:
    """ONE uninterrupted Ray Train run of :func:`tiny_run` + :data:`DDP` (a fit costs ~30-50 s of process
    starts on 2 cores): what tests/test_ray.py checks of a DDP run, and the reference that the killed-worker
    run of tests/test_fault_tolerance.py must match. ``.overrides`` (without a run name), ``.out`` (fit's
    result), ``.stderr`` (what the driver printed: rank 0's bar and lines, relayed by trainers/console.py)."""
    from sparsefold.config import load_config
    from sparsefold.trainers.ray_train import fit

    overrides = tiny_run(tmp_path_factory.mktemp("ddp") / "runs", cache_dir) + DDP
    with contextlib.redirect_stderr(io.StringIO()) as err:
        out = fit(load_config(None, overrides + ["trainer.run_name=ddp", "trainer.progress=true"]))
    return SimpleNamespace(overrides=overrides, out=out, stderr=err.getvalue())


def bundled_once() -> list[str]:
    """Bundled model names for the per-bundle CLI and tiling tests: each of our bundles, and of the authors'
    releases bundled by import (config.json ``source``) one per (family, model): the others of a family
    differ only in trained values and peak, which tests/test_import_dcea.py checks file by file."""
    seen, names = set(), []
    for d in bundled_models():
        meta = read_config(d)
        key = (meta.get("source", {}).get("family"), meta["model"]["name"]) if "source" in meta else d.name
        if key not in seen:
            seen.add(key)
            names.append(d.name)
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``bundled_name``: parametrized over :func:`bundled_once`."""
    if "bundled_name" in metafunc.fixturenames:
        metafunc.parametrize("bundled_name", bundled_once())


def ray_group(item: pytest.Item) -> str | None:
    """The pytest-xdist group of a test on a Ray cluster: ``ray-ddp`` for the users of the session's DDP run
    (made once, in one process), ``ray`` for the other tests on a cluster; None without Ray."""
    names = set(getattr(item, "fixturenames", ()))
    return "ray-ddp" if "ddp_run" in names else "ray" if "ray_cluster" in names else None


def uses_ray(item: pytest.Item) -> bool:
    return ray_group(item) is not None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Tests on a Ray cluster form two pytest-xdist groups (:func:`ray_group`): with the README's ``pytest -n 2
    --dist loadgroup`` each group runs in one process on its own local cluster, the two side by side (a Ray
    fit is mostly process start-up and waiting; one group alone was the suite's critical path), and the
    rest fills in around them."""
    group = ray_group(item)
    if group is not None:
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order: under xdist the Ray groups first (the longest units of work: started first, they end with
    the rest); in one process Ray tests last (stable order otherwise): the cluster starts once, and no
    other test shares the cores with its idle processes or sees Ray already initialized."""
    grouped = bool(config.getvalue("loadgroup")) if hasattr(config.option, "loadgroup") else False
    items.sort(key=lambda item: uses_ray(item) != grouped)


@pytest.fixture(scope="module")
def one_thread():
    """Behaviour, not speed: one intra-op thread keeps model tests fast and steady on a shared 2-core box.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

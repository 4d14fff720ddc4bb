"""sparsefold.runtime: the config → device / precision / compile / layout / backend mapping (the GPU branches
with CUDA monkeypatched, no GPU needed), and where a run's files go (paths, URLs, uploads)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from sparsefold import runtime
from sparsefold.config import ConfigError, TrainerConfig, is_url, load_config
from sparsefold.runtime import distributed_backend, runtime_for, select_runtime, upload_tree


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available' with a settable compute capability; set_device recorded, nothing touches a GPU."""
    gpu = {"capability": (8, 0), "set_device": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: gpu["set_device"].append(device))
    return gpu


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# CPU


def test_cpu_default_is_fp32_gloo(monkeypatch):
    monkeypatch.delenv("SPARSEFOLD_CPU_BF16", raising=False)
    rt = select_runtime(use_gpu=False, amp=True)
    assert rt.device == torch.device("cpu") and rt.amp_dtype is None
    assert not rt.uses_grad_scaler and rt.grad_scaler is None
    assert rt.backend == "gloo" and isinstance(rt.autocast(), contextlib.nullcontext)
    assert not rt.compile and not rt.channels_last


@pytest.mark.parametrize(("precision", "amp", "env", "dtype"), [
    ("bf16", True, None, torch.bfloat16),   # explicit opt-in
    ("auto", True, "1", torch.bfloat16),    # the older env opt-in still works
    ("auto", False, "1", None),             # amp=false always means fp32
    ("fp32", True, "1", None),
])
def test_cpu_bf16_opt_in(monkeypatch, precision, amp, env, dtype):
    if env is None:
        monkeypatch.delenv("SPARSEFOLD_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("SPARSEFOLD_CPU_BF16", env)
    rt = select_runtime(False, amp, precision=precision)
    assert rt.amp_dtype == dtype and not rt.uses_grad_scaler
    if dtype is not None:
        with rt.autocast():
            y = nn.Linear(4, 4)(torch.ones(2, 4))
        assert y.dtype == torch.bfloat16


def test_cpu_refuses_fp16_and_unknown_precision():
    with pytest.raises(RuntimeError, match="fp16 needs trainer.use_gpu=true"):
        select_runtime(False, True, precision="fp16")
    with pytest.raises(ValueError, match="trainer.precision: unknown 'fp8'"):
        select_runtime(False, True, precision="fp8")


def test_threads():
    select_runtime(False, True, threads=1)
    assert torch.get_num_threads() == 1


# ------------------------------------------------------------------------------------------------
# GPU (monkeypatched)


@pytest.mark.parametrize(("capability", "precision", "amp", "dtype"), [
    ((8, 0), "auto", True, torch.bfloat16),   # A100/A10G/L4/H100: bf16, no loss scaling
    ((9, 0), "auto", True, torch.bfloat16),
    ((7, 5), "auto", True, torch.float16),    # T4 / V100: fp16 + GradScaler
    ((8, 6), "fp16", True, torch.float16),    # asked for explicitly
    ((8, 0), "bf16", True, torch.bfloat16),
    ((8, 0), "fp32", True, None),
    ((8, 0), "auto", False, None),            # amp=false: fp32
])
def test_gpu_precision_mapping(fake_cuda, capability, precision, amp, dtype):
    fake_cuda["capability"] = capability
    rt = select_runtime(True, amp, local_rank=1, precision=precision)
    assert rt.device == torch.device("cuda", 1) and fake_cuda["set_device"] == [torch.device("cuda", 1)]
    assert rt.amp_dtype == dtype
    assert rt.uses_grad_scaler == (dtype == torch.float16)
    assert rt.backend == "nccl"


def test_gpu_bf16_needs_ampere(fake_cuda):
    fake_cuda["capability"] = (7, 5)
    with pytest.raises(RuntimeError, match=r"sm_75\) has no native bf16"):
        select_runtime(True, True, precision="bf16")


def test_gpu_without_cuda_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_runtime(True, True)


def test_backend():
    assert distributed_backend(True) == "nccl" and distributed_backend(False) == "gloo"


# ------------------------------------------------------------------------------------------------
# compile / channels-last / config fields


def test_channels_last_and_compile_switches(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or ("compiled", m))
    conv = nn.Conv2d(3, 8, 3)
    off = select_runtime(False, True)
    assert off.place(conv) is conv and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert off.compiled(conv) is conv and not compiled
    on = select_runtime(False, True, compile=True, channels_last=True)
    assert on.place(conv).weight.is_contiguous(memory_format=torch.channels_last)
    assert on.compiled(conv) == ("compiled", conv) and compiled == [conv]


def test_runtime_for_reads_the_trainer_config(fake_cuda):
    fake_cuda["capability"] = (7, 0)
    t = TrainerConfig(use_gpu=True, precision="fp16", compile=True, channels_last=True, threads=1)
    rt = runtime_for(t, local_rank=2)
    assert (rt.device, rt.amp_dtype, rt.compile, rt.channels_last) == (torch.device("cuda", 2), torch.float16, True, True)


def test_config_fields_validate_before_anything_starts():
    cfg = load_config(None, ["trainer.compile=true", "trainer.channels_last=true", "trainer.precision=bf16"])
    assert cfg.trainer.compile and cfg.trainer.channels_last and cfg.trainer.precision == "bf16"
    assert TrainerConfig().precision == "auto" and TrainerConfig().amp  # `amp` keeps working as before
    for kwargs, msg in [
        ({"precision": "fp8"}, "precision: unknown 'fp8'"),
        ({"precision": "bf16", "amp": False}, "precision: bf16 needs trainer.amp=true"),
        ({"precision": "fp16"}, "precision: fp16 needs trainer.use_gpu=true"),
        ({"output_dir": "s3://bucket/runs"}, "output_dir: s3://bucket/runs is a URL"),
        ({"output_dir": "file:///tmp/runs"}, "set trainer.use_ray=true"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            TrainerConfig(**kwargs)
    TrainerConfig(precision="fp16", use_gpu=True)
    TrainerConfig(output_dir="gs://bucket/runs", use_ray=True)


def test_the_loop_applies_compile_and_channels_last(monkeypatch, tiny_overrides):
    """The plain loop asks the runtime: the model is placed (channels-last) and the training module compiled."""
    from sparsefold.trainers.loop import train

    placed, compiled = [], []
    place = runtime.Runtime.place
    monkeypatch.setattr(runtime.Runtime, "place", lambda self, m: placed.append(self) or place(self, m))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    cfg = load_config(None, tiny_overrides + [
        "trainer.compile=true", "trainer.channels_last=true", "trainer.max_steps=1", "wandb.mode=disabled",
        "model.filters=4", "model.kernel_size=5", "model.depth=2", "data.patch_size=32", "data.val_images=0"])
    out = train(cfg)
    assert out["steps"] == 1 and out["checkpoint"]
    assert [(r.compile, r.channels_last) for r in placed] == [(True, True)]
    (module,) = compiled  # the training module (model + loss), holding exactly the model's weights
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == out["params"]


# ------------------------------------------------------------------------------------------------
# storage


def test_is_url():
    assert all(is_url(u) for u in ("s3://b/p", "gs://b", "file:///tmp/x", "memory://x"))
    assert not any(is_url(p) for p in ("runs", "/mnt/shared/runs", "~/runs", "C:/runs", "a:b"))


def test_run_dir_and_storage_of_paths_and_urls(monkeypatch, tmp_path):
    from sparsefold.trainers.loop import run_dir_of
    from sparsefold.trainers.ray_train import storage_of

    monkeypatch.setenv("SPARSEFOLD_CACHE", str(tmp_path / "cache"))
    local = load_config(None, [f"trainer.output_dir={tmp_path}/runs", "trainer.run_name=r"])
    assert run_dir_of(local) == tmp_path / "runs" / "r"
    assert storage_of(local) == (str(tmp_path / "runs"), "r", str(tmp_path / "runs" / "r"))
    monkeypatch.chdir(tmp_path)
    rel = load_config(None, ["trainer.output_dir=out", "trainer.run_name=r", "trainer.use_ray=true"])
    assert storage_of(rel)[0] == str(tmp_path / "out")  # absolute on the driver: workers run elsewhere
    url = load_config(None, ["trainer.output_dir=s3://bucket/runs/", "trainer.run_name=r", "trainer.use_ray=true"])
    assert run_dir_of(url) == tmp_path / "cache" / "runs" / "r"  # node-local staging, uploaded at the end
    assert storage_of(url) == ("s3://bucket/runs", "r", "s3://bucket/runs/r")


def test_upload_tree_merges_into_a_url(tmp_path):
    src = tmp_path / "run"
    (src / "wandb" / "offline-run-1" / "files").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "wandb" / "offline-run-1" / "files" / "output.log").write_text("log")
    (src / "wandb" / "latest-run").symlink_to(src / "wandb" / "offline-run-1")
    dest = tmp_path / "store" / "r"
    (dest / "step_0000002").mkdir(parents=True)
    (dest / "step_0000002" / "model.safetensors").write_bytes(b"x")  # Ray's checkpoint: must stay
    n = upload_tree(src, dest.as_uri())
    assert n >= 2
    assert (dest / "config.json").read_text() == "{}"
    assert (dest / "wandb" / "offline-run-1" / "files" / "output.log").read_text() == "log"
    assert (dest / "step_0000002" / "model.safetensors").read_bytes() == b"x"
    with pytest.raises(ValueError, match="not a URL"):
        upload_tree(src, str(dest))


def test_latest_step_uri(tmp_path):
    from sparsefold.trainers.ray_train import latest_step_uri

    root = tmp_path / "r"
    for name in ("step_0000002", "step_0000010", "step_0000011.tmp-7", "checkpoint_2024"):
        (root / name).mkdir(parents=True)
    (root / "step_0000099").write_text("a file, not a checkpoint")
    assert latest_step_uri(root.as_uri()) == f"{root.as_uri()}/step_0000010"
    assert latest_step_uri((tmp_path / "none").as_uri()) is None


def test_data_paths_are_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    """Ray workers run in another directory: fit() hands them absolute local data paths."""
    from sparsefold.runtime import absolute_paths

    monkeypatch.chdir(tmp_path)
    assert absolute_paths("data/set12|builtin:skimage") == f"{tmp_path}/data/set12|builtin:skimage"
    assert absolute_paths("shards/train-{000000..000009}.tar") == f"{tmp_path}/shards/train-{{000000..000009}}.tar"
    for unchanged in ("s3://bucket/train-{0..3}.tar", "builtin:skimage", "", "/abs/dir", "pipe:cat x.tar"):
        assert absolute_paths(unchanged) == unchanged

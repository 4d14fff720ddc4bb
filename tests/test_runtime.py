"""sparsefold.runtime: the config → device / precision / compile / layout / backend mapping (the GPU branches
with CUDA monkeypatched, no GPU needed). Where a run's files go: tests/test_storage.py."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

from sparsefold import runtime
from sparsefold.config import ConfigError, RayConfig, RuntimeConfig, load_config
from sparsefold.runtime import distributed_backend, runtime_for, select_runtime


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
    rt = select_runtime(use_gpu=False)
    assert rt.device == torch.device("cpu") and rt.amp_dtype is None
    assert not rt.uses_grad_scaler and rt.grad_scaler is None
    assert rt.backend == "gloo" and isinstance(rt.autocast(), contextlib.nullcontext)
    assert not rt.compile and not rt.channels_last


@pytest.mark.parametrize(("precision", "env", "dtype"), [
    ("bf16", None, torch.bfloat16),   # explicit opt-in
    ("auto", "1", torch.bfloat16),    # the older env opt-in still works
    ("fp32", "1", None),              # fp32: no autocast, whatever the environment says
    ("auto", None, None),
])
def test_cpu_bf16_opt_in(monkeypatch, precision, env, dtype):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # the warning without it: next test
    if env is None:
        monkeypatch.delenv("SPARSEFOLD_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("SPARSEFOLD_CPU_BF16", env)
    rt = select_runtime(False, precision)
    assert rt.amp_dtype == dtype and not rt.uses_grad_scaler
    if dtype is not None:
        with rt.autocast():
            y = nn.Linear(4, 4)(torch.ones(2, 4))
        assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_without_native_support_warns(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert select_runtime(False, "bf16").amp_dtype == torch.bfloat16  # still what was asked for
    assert [str(w.message) for w in seen if "without native bf16" in str(w.message)] == ([] if native else [
        f"runtime.precision=bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): bf16 "
        "matmuls and convolutions are emulated, 2-300x slower than fp32 (measured on an AVX2 host); use "
        "runtime.precision=fp32"])


def test_cpu_refuses_fp16_and_unknown_precision():
    with pytest.raises(RuntimeError, match="fp16 needs runtime.use_gpu=true"):
        select_runtime(False, "fp16")
    with pytest.raises(ValueError, match="runtime.precision: unknown 'fp8'"):
        select_runtime(False, "fp8")


def test_threads():
    select_runtime(False, threads=1)
    assert torch.get_num_threads() == 1


# ------------------------------------------------------------------------------------------------
# GPU (monkeypatched)


@pytest.mark.parametrize(("capability", "precision", "dtype"), [
    ((8, 0), "auto", torch.bfloat16),   # A100/A10G/L4/H100: bf16, no loss scaling
    ((9, 0), "auto", torch.bfloat16),
    ((7, 5), "auto", torch.float16),    # T4 / V100: fp16 + GradScaler
    ((8, 6), "fp16", torch.float16),    # asked for explicitly
    ((8, 0), "bf16", torch.bfloat16),
    ((8, 0), "fp32", None),             # fp32: no autocast
])
def test_gpu_precision_mapping(fake_cuda, capability, precision, dtype):
    fake_cuda["capability"] = capability
    rt = select_runtime(True, precision, local_rank=1)
    assert rt.device == torch.device("cuda", 1) and fake_cuda["set_device"] == [torch.device("cuda", 1)]
    assert rt.amp_dtype == dtype
    assert rt.uses_grad_scaler == (dtype == torch.float16)
    assert rt.backend == "nccl"


def test_gpu_bf16_needs_ampere(fake_cuda):
    fake_cuda["capability"] = (7, 5)
    with pytest.raises(RuntimeError, match=r"sm_75\) has no native bf16"):
        select_runtime(True, "bf16")


def test_gpu_without_cuda_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_runtime(True)


def test_backend():
    assert distributed_backend(True) == "nccl" and distributed_backend(False) == "gloo"


# ------------------------------------------------------------------------------------------------
# compile / channels-last / config fields


def test_channels_last_and_compile_switches(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or ("compiled", m))
    conv = nn.Conv2d(3, 8, 3)
    off = select_runtime(False)
    assert off.place(conv) is conv and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert off.compiled(conv) is conv and not compiled
    on = select_runtime(False, compile=True, channels_last=True)
    assert on.place(conv).weight.is_contiguous(memory_format=torch.channels_last)
    assert on.compiled(conv) == ("compiled", conv) and compiled == [conv]


def test_runtime_for_reads_the_runtime_section(fake_cuda):
    fake_cuda["capability"] = (7, 0)
    r = RuntimeConfig(use_gpu=True, precision="fp16", compile=True, channels_last=True, threads=1)
    rt = runtime_for(r, local_rank=2)
    assert (rt.device, rt.amp_dtype, rt.compile, rt.channels_last) == (torch.device("cuda", 2), torch.float16, True, True)


def test_config_fields_validate_before_anything_starts():
    cfg = load_config(None, ["runtime.compile=true", "runtime.channels_last=true", "runtime.precision=bf16"])
    assert cfg.runtime.compile and cfg.runtime.channels_last and cfg.runtime.precision == "bf16"
    assert RuntimeConfig().precision == "auto"
    for cls, kwargs, msg in [
        (RuntimeConfig, {"precision": "fp8"}, "precision: unknown 'fp8'"),
        (RuntimeConfig, {"precision": "fp16"}, "precision: fp16 needs runtime.use_gpu=true"),
        (RayConfig, {"workers": 2}, "workers: more than 1 worker needs ray.enabled=true"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            cls(**kwargs)
    for over, msg in [(["trainer.output_dir=s3://bucket/runs"], "trainer.output_dir: s3://bucket/runs is a URL"),
                      (["trainer.output_dir=file:///tmp/runs"], "set ray.enabled=true")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, over)
    RuntimeConfig(precision="fp16", use_gpu=True)
    load_config(None, ["trainer.output_dir=gs://bucket/runs", "ray.enabled=true"])


def test_the_loop_applies_compile_and_channels_last(monkeypatch, tiny_overrides):
    """The plain loop asks the runtime: the model is placed (channels-last) and the training module compiled."""
    from sparsefold.trainers.loop import train

    placed, compiled = [], []
    place = runtime.Runtime.place
    monkeypatch.setattr(runtime.Runtime, "place", lambda self, m: placed.append(self) or place(self, m))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    cfg = load_config(None, tiny_overrides + [
        "runtime.compile=true", "runtime.channels_last=true", "trainer.max_steps=1", "wandb.mode=disabled",
        "model.filters=4", "model.kernel_size=5", "model.depth=2", "data.patch_size=32", "data.val_images=0"])
    out = train(cfg)
    assert out["steps"] == 1 and out["checkpoint"]
    assert [(r.compile, r.channels_last) for r in placed] == [(True, True)]
    (module,) = compiled  # the training module (model + loss), holding exactly the model's weights
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == out["params"]

"""Process-level runtime choices in ONE place: device, precision, compilation, memory layout, threads,
allocator and DDP backend. Models and the training loop ask this module; nothing else decides where
tensors live or which dtype autocast uses. (Where a run's files go: trainers/storage.py.)

Configuration mapping (the ``runtime`` section → :class:`Runtime`), the contract ``tests/test_runtime.py`` checks:

    ==========================  ==================================  ==================================
    runtime.*                   GPU (``use_gpu=true``)              CPU
    ==========================  ==================================  ==================================
    device                      ``cuda:<index>`` (Ray: its device)  ``cpu``
    precision=auto              bf16 on sm_80+ (Ampere and newer),  fp32 (bf16 changes the numerics
                                else fp16 + GradScaler              of the unfolded iterations; opt in
                                                                    with precision=bf16 or
                                                                    SPARSEFOLD_CPU_BF16=1)
    precision=bf16              bf16 (error below sm_80)            bf16 autocast (a warning where the
                                                                    CPU has no native bf16: emulated,
                                                                    many times slower)
    precision=fp16              fp16 autocast + GradScaler          config error (GPU only)
    precision=fp32              fp32 (no autocast)                  fp32
    compile=true                ``torch.compile`` of the (DDP-wrapped) training module
    channels_last=true          weights in channels-last layout (convolutions pick it up)
    fused=true (default)        the soft threshold's forward and backward each one compiled pass over
                                large code maps (``models/prox.py``; eager when compiling fails)
    DDP backend                 nccl                                gloo
    ==========================  ==================================  ==================================
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from sparsefold.config import PRECISIONS, RuntimeConfig
from sparsefold.models.prox import use_fused

_ALLOCATOR_DONE = False


def configure_cpu_allocator() -> bool:
    """Keep freed large blocks in the process heap instead of returning them to the OS.

    glibc serves allocations above 32 MiB with mmap and unmaps them on free, so every new 50–100 MB code
    tensor of an unfolded network page-faults on first touch; on the CI machine kind that made each
    elementwise pass ~3x slower (measured: clamp over 28 M floats 56 ms -> 19 ms). Disabling mmap for
    the heap and raising the trim threshold removes that cost. Linux/glibc only; a no-op elsewhere, and
    skipped when SPARSEFOLD_NO_MALLOPT=1.
    """
    global _ALLOCATOR_DONE
    if _ALLOCATOR_DONE or not sys.platform.startswith("linux") or os.environ.get("SPARSEFOLD_NO_MALLOPT"):
        return _ALLOCATOR_DONE
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except OSError:
        ok = False
    _ALLOCATOR_DONE = ok
    return ok


@dataclass(frozen=True)
class Runtime:
    """Where and how a process computes."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, or None for full fp32
    compile: bool = False
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 on CUDA needs loss scaling; bf16 has fp32's exponent range and does not."""
        return self.device.type == "cuda" and self.amp_dtype == torch.float16

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cuda") if self.uses_grad_scaler else None

    @property
    def backend(self) -> str:
        return distributed_backend(self.device.type == "cuda")

    def place(self, model: nn.Module) -> nn.Module:
        """The model on this device, its 4-D weights channels-last when asked (in place, returned)."""
        if self.channels_last:
            # Module.to takes memory_format at run time (torch._C._nn._parse_to); torch's stubs omit it
            return model.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model.to(self.device)

    def compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` when asked, else ``module``. Compile the DDP-wrapped training
        module (DDP's optimizer splits the graph at bucket boundaries); keep the bare model for
        checkpoints and evaluation (whole images of varying size would recompile)."""
        return cast(nn.Module, torch.compile(module)) if self.compile else module  # an OptimizedModule


def select_runtime(
    use_gpu: bool,
    precision: str = "auto",
    local_rank: int = 0,
    threads: int = 0,
    *,
    compile: bool = False,
    channels_last: bool = False,
) -> Runtime:
    """The one place that maps config to device/precision (table in the module docstring).
    ``threads`` > 0 sets torch's intra-op thread count."""
    if precision not in PRECISIONS:
        raise ValueError(f"runtime.precision: unknown {precision!r} (valid: {', '.join(PRECISIONS)})")
    configure_cpu_allocator()
    if threads > 0:
        torch.set_num_threads(threads)
    flags = {"compile": compile, "channels_last": channels_last}
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.use_gpu=true but CUDA is not available on this node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        major, minor = torch.cuda.get_device_capability(device)
        native_bf16 = major >= 8  # Ampere (sm_80) and newer; older GPUs only emulate bf16
        if precision == "fp32":
            return Runtime(device, None, **flags)
        if precision == "bf16" and not native_bf16:
            raise RuntimeError(f"runtime.precision=bf16: {device} (sm_{major}{minor}) has no native bf16; "
                               "use runtime.precision=fp16 or auto")
        bf16 = precision == "bf16" or (precision == "auto" and native_bf16)
        return Runtime(device, torch.bfloat16 if bf16 else torch.float16, **flags)
    if precision == "fp16":
        raise RuntimeError("runtime.precision=fp16 needs runtime.use_gpu=true (on CPU: bf16 or fp32)")
    cpu_bf16 = precision == "bf16" or (precision == "auto" and os.environ.get("SPARSEFOLD_CPU_BF16") == "1")
    if cpu_bf16 and not cpu_has_native_bf16():
        warnings.warn(f"runtime.precision=bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}"
                      "): bf16 matmuls and convolutions are emulated, 2-300x slower than fp32 (measured on an AVX2 "
                      "host); use runtime.precision=fp32", stacklevel=2)
    return Runtime(torch.device("cpu"), torch.bfloat16 if cpu_bf16 else None, **flags)


def cpu_has_native_bf16() -> bool:
    """oneDNN's bf16 kernels run natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow. False
    where torch has no oneDNN query (a build without it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def runtime_for(config: RuntimeConfig, local_rank: int = 0) -> Runtime:
    """:func:`select_runtime` from the ``runtime`` section of a run config. Also applies
    :func:`configure_cpu_allocator` to this process: the training loop calls this first in every process
    that trains (plain, each Ray Train worker, each sweep trial), not only in the CLI's driver."""
    configure_process(config.fused)
    return select_runtime(config.use_gpu, config.precision, local_rank, config.threads,
                          compile=config.compile, channels_last=config.channels_last)


def configure_process(fused: bool = True) -> None:
    """What a process that computes runs with (training through :func:`runtime_for`, and ``evaluate``,
    ``denoise``): the allocator setting and the fused soft threshold (``models/prox.py``; compiled once per
    process; ``SPARSEFOLD_FUSED=0`` keeps the eager one everywhere)."""
    configure_cpu_allocator()
    use_fused(fused and os.environ.get("SPARSEFOLD_FUSED", "1") != "0")


def distributed_backend(use_gpu: bool) -> str:
    """NCCL on GPUs, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"

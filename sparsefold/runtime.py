"""Process-level runtime choices in ONE place: device, precision (autocast), threads, allocator.

Models and the training loop ask this module; nothing else decides where tensors live.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

import torch

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

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        if self.device.type == "cuda" and self.amp_dtype == torch.float16:
            return torch.amp.GradScaler("cuda")
        return None


def select_runtime(use_gpu: bool, amp: bool, local_rank: int = 0, threads: int = 0) -> Runtime:
    """The one place that maps config to device/precision.

    CUDA: ``cuda:<local_rank>``, autocast bf16 when supported (else fp16 with a GradScaler) if ``amp``.
    CPU: fp32 (bf16 autocast changes the numerics of the unfolded iterations; opt in explicitly with
    SPARSEFOLD_CPU_BF16=1). ``threads`` > 0 sets torch's intra-op thread count.
    """
    configure_cpu_allocator()
    if threads > 0:
        torch.set_num_threads(threads)
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.use_gpu=true but CUDA is not available on this node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None
        return Runtime(device, dtype)
    cpu_bf16 = amp and os.environ.get("SPARSEFOLD_CPU_BF16") == "1"
    return Runtime(torch.device("cpu"), torch.bfloat16 if cpu_bf16 else None)


def distributed_backend(use_gpu: bool) -> str:
    """NCCL on GPUs, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"

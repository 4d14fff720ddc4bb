"""Process-level runtime choices in ONE place: device, precision, compilation, memory layout, threads,
allocator, DDP backend, and where a run's files go. Models and the training loop ask this module;
nothing else decides where tensors live or which dtype autocast uses.

Configuration mapping (``trainer.*`` → :class:`Runtime`), the contract ``tests/test_runtime.py`` checks:

    ==========================  ==================================  ==================================
    trainer.*                   GPU (``use_gpu=true``)              CPU
    ==========================  ==================================  ==================================
    device                      ``cuda:<index>`` (Ray: its device)  ``cpu``
    precision=auto, amp=true    bf16 on sm_80+ (Ampere and newer),  fp32 (bf16 changes the numerics
                                else fp16 + GradScaler              of the unfolded iterations; opt in
                                                                    with precision=bf16 or
                                                                    SPARSEFOLD_CPU_BF16=1)
    precision=bf16              bf16 (error below sm_80)            bf16 autocast
    precision=fp16              fp16 autocast + GradScaler          config error (GPU only)
    precision=fp32 / amp=false  fp32                                fp32
    compile=true                ``torch.compile`` of the (DDP-wrapped) training module
    channels_last=true          weights in channels-last layout (convolutions pick it up)
    DDP backend                 nccl                                gloo
    output_dir                  a path, or a URL (s3://, gs://, file://, ...) on the Ray path only
    ==========================  ==================================  ==================================
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sparsefold.config import PRECISIONS, RunConfig, is_url, split_spec

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
            return model.to(self.device, memory_format=torch.channels_last)
        return model.to(self.device)

    def compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` when asked, else ``module``. Compile the DDP-wrapped training
        module (DDP's optimizer splits the graph at bucket boundaries); keep the bare model for
        checkpoints and evaluation (whole images of varying size would recompile)."""
        return torch.compile(module) if self.compile else module


def select_runtime(
    use_gpu: bool,
    amp: bool = True,
    local_rank: int = 0,
    threads: int = 0,
    *,
    precision: str = "auto",
    compile: bool = False,
    channels_last: bool = False,
) -> Runtime:
    """The one place that maps config to device/precision (table in the module docstring).
    ``threads`` > 0 sets torch's intra-op thread count."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision: unknown {precision!r} (valid: {', '.join(PRECISIONS)})")
    configure_cpu_allocator()
    if threads > 0:
        torch.set_num_threads(threads)
    flags = {"compile": compile, "channels_last": channels_last}
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.use_gpu=true but CUDA is not available on this node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        major, minor = torch.cuda.get_device_capability(device)
        native_bf16 = major >= 8  # Ampere (sm_80) and newer; older GPUs only emulate bf16
        if not amp or precision == "fp32":
            return Runtime(device, None, **flags)
        if precision == "bf16" and not native_bf16:
            raise RuntimeError(f"trainer.precision=bf16: {device} (sm_{major}{minor}) has no native bf16; "
                               "use trainer.precision=fp16 or auto")
        bf16 = precision == "bf16" or (precision == "auto" and native_bf16)
        return Runtime(device, torch.bfloat16 if bf16 else torch.float16, **flags)
    if precision == "fp16":
        raise RuntimeError("trainer.precision=fp16 needs trainer.use_gpu=true (on CPU: bf16 or fp32)")
    cpu_bf16 = amp and (precision == "bf16" or (precision == "auto" and os.environ.get("SPARSEFOLD_CPU_BF16") == "1"))
    return Runtime(torch.device("cpu"), torch.bfloat16 if cpu_bf16 else None, **flags)


def runtime_for(trainer, local_rank: int = 0) -> Runtime:
    """:func:`select_runtime` from a :class:`~sparsefold.config.TrainerConfig`. Also applies
    :func:`configure_cpu_allocator` to this process: the training loop calls this first in every process
    that trains (plain, each Ray Train worker, each sweep trial), not only in the CLI's driver."""
    configure_cpu_allocator()
    return select_runtime(trainer.use_gpu, trainer.amp, local_rank, trainer.threads, precision=trainer.precision,
                          compile=trainer.compile, channels_last=trainer.channels_last)


def distributed_backend(use_gpu: bool) -> str:
    """NCCL on GPUs, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"


# ------------------------------------------------------------------------------------------------
# Storage: trainer.output_dir is a local/NFS path, or (Ray path) a URL that pyarrow opens -- the same
# resolver Ray Train uses for storage_path, so whatever Ray can checkpoint to, results can go to.


def staging_root() -> Path:
    """Node-local directory for the files of runs whose output_dir is a URL (config.json, W&B offline
    files), uploaded to ``<output_dir>/<run>/`` when the run ends: ``$SPARSEFOLD_CACHE/runs`` or
    ``~/.cache/sparsefold/runs``."""
    env = os.environ.get("SPARSEFOLD_CACHE", "")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "sparsefold") / "runs"


def absolute_paths(spec: str) -> str:
    """The local paths of a data spec made absolute and canonical in this process (``~`` expanded, ``..``
    and symlinks resolved); ``A|B`` fallbacks (parts stripped, as ``val_files`` reads them) and brace
    patterns kept; URLs, ``builtin:`` parts, ``pipe:`` specs (a shell command may hold ``|``) and the
    empty string unchanged."""
    if not spec or str(spec).startswith("pipe:"):
        return spec
    def canonical(part: str) -> str:
        keep = is_url(part) or part.startswith("builtin:")
        return part if keep else str(Path(part).expanduser().resolve())

    options = [split_spec(p) for p in str(spec).split("|")]  # val: fallbacks; train: a list of shard specs
    if not any(options):  # nothing but separators: left as given, for the data error to quote
        return spec
    return "|".join(",".join(canonical(part) for part in parts) for parts in options)


def canonical_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its local paths absolute in this process (``data.train``/``val``/``cache_dir`` through
    :func:`absolute_paths`, ``trainer.output_dir`` resolved; URLs kept). The form a run's identity is
    computed from, and the one Ray workers receive: they run in other directories, and the same data
    named relatively from one directory or absolutely from another must give the same run."""
    data = {key: absolute_paths(getattr(cfg.data, key)) for key in ("train", "val", "cache_dir")}
    out = cfg.trainer.output_dir
    out = out if is_url(out) else str(Path(out).expanduser().resolve())
    return replace(cfg, data=replace(cfg.data, **data), trainer=replace(cfg.trainer, output_dir=out))


def url_join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def upload_tree(local_dir: str | Path, url: str) -> int:
    """Copy the files under ``local_dir`` to ``url`` (a directory URL: s3://, gs://, file://, ...),
    creating it; existing files there (Ray's checkpoints) stay. Returns the number of files copied."""
    import pyarrow.fs as pafs

    if not is_url(url):
        raise ValueError(f"upload_tree: {url!r} is not a URL")
    fs, root = pafs.FileSystem.from_uri(url)
    local = Path(local_dir)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:
        dst = f"{root.rstrip('/')}/{p.relative_to(local).as_posix()}"
        fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        with p.open("rb") as src, fs.open_output_stream(dst) as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    return len(files)

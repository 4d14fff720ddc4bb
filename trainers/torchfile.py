"""Reading a ``torch.save`` file without running its pickle: a restricted unpickler for released weights.

Some authors released a whole pickled ``nn.Module`` (DnCNN, DCEA). ``torch.load(weights_only=False)``
would import and call whatever globals the pickle names (``os.system`` included). :func:`read_torch_file`
reads both container formats itself (the zip of ``data.pkl`` + ``data/<key>`` records, and the legacy
stream: magic number, protocol, system info, the object, its storage keys, then the raw storages) and
unpickles every part with :class:`RestrictedUnpickler`, whose ``find_class`` is the only way a pickle
reaches a global (GLOBAL, STACK_GLOBAL, INST and the EXT opcodes all go through it). It resolves only:

* tensor rebuilders, re-implemented here (a storage is a flat tensor; a tensor a strided view of it);
* ``collections.OrderedDict`` and ``set``/``frozenset`` (plain containers); ``torch.device``, read as
  its name (``"cuda:0"``);
* storage types (``torch.FloatStorage``, ...), mapped to their dtype;
* module classes: any ``torch.nn.modules.*`` class and the family's own class names (``DnCNN``) become
  inert :class:`StandIn` classes, which only record the pickled state (``_parameters``, ``_buffers``,
  ``_modules``, ``eps``, ...); nothing of the original class is imported.

Anything else (``os.system``, ``builtins.exec``, ``torch.load``, ...) is refused with one line.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from sparsefold.errors import InputError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


class StandIn:
    """An inert stand-in for a pickled object of an allowed class: construction keeps the arguments,
    ``__setstate__`` keeps the state; no method of the original class exists or runs."""

    pickled_as = ""  # "module.Name" of the class it stands for

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | None):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["state"] = state

    @property
    def class_name(self) -> str:
        return self.pickled_as.rsplit(".", 1)[-1]


class _StorageType:
    """What a pickled storage class (``torch.FloatStorage``) resolves to: its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> Tensor:
    """``torch._utils._rebuild_tensor(_v2)``: a strided view of the flat storage (which the legacy format
    fills only after the object is unpickled: a view sees the data once it is there)."""
    if not isinstance(storage, Tensor):
        raise InputError(f"malformed tensor record (storage is a {type(storage).__name__})")
    needed = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(size) else 0
    if needed > storage.numel():
        raise InputError(f"malformed tensor record (view of {needed} elements on a storage of {storage.numel()})")
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: Tensor, *_: Any) -> Tensor:
    """``torch._utils._rebuild_parameter`` / old ``Parameter(data, requires_grad)``: the plain tensor."""
    return data


def _device(*args: Any) -> str:
    """``torch.device("cuda", 0)`` (a module's ``device`` attribute, DCEA): its name, ``"cuda:0"``."""
    return ":".join(str(a) for a in args[:2])


def _nothing(*_: Any) -> None:
    """``torch.nn.backends.thnn._get_thnn_function_backend`` (a module's ``_backend`` in torch 0.4)."""
    return None


ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _nothing,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED`, storage types and stand-in classes (see
    the module docstring); ``persistent_load`` asks ``storage`` for the flat tensor of a storage record."""

    def __init__(self, file: BinaryIO, source: str, stand_ins: frozenset[str] = frozenset(),
                 storage: Callable[[tuple[Any, ...]], Tensor] | None = None) -> None:
        super().__init__(file)
        self.source, self.stand_ins, self.storage = source, stand_ins, storage
        self.classes: dict[str, type[StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module.startswith("torch.nn.modules.") or name in self.stand_ins:
            key = f"{module}.{name}"
            return self.classes.setdefault(key, type(name, (StandIn,), {"pickled_as": key}))
        raise InputError(f"{self.source}: refused to unpickle {module}.{name} (only tensors, plain containers "
                         "and module state are read; nothing in the file is run)")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module") and len(pid) >= 2:
            return pid[1]  # legacy: (module class, source file, source): the class, already a stand-in
        if isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage") and self.storage is not None:
            return self.storage(pid[1:])
        raise InputError(f"{self.source}: unknown persistent record {str(pid)[:60]!r}")


def _dtype(storage_type: Any, source: str) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise InputError(f"{source}: malformed storage record")
    return storage_type.dtype


def _load(f: BinaryIO, source: str, stand_ins: frozenset[str] = frozenset(),
          storage: Callable[[tuple[Any, ...]], Tensor] | None = None) -> Any:
    return RestrictedUnpickler(f, source, stand_ins, storage).load()


def _read_zip(path: Path, stand_ins: frozenset[str]) -> Any:
    """The zip format: ``<prefix>/data.pkl`` with storages in ``<prefix>/data/<key>``."""
    with zipfile.ZipFile(path) as z:
        pkl = next((n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise InputError(f"{path}: a zip archive without data.pkl, not a torch.save file")
        prefix = pkl[: -len("data.pkl")]
        if prefix + "byteorder" in z.namelist() and z.read(prefix + "byteorder") != b"little":
            raise InputError(f"{path}: big-endian torch.save files are not supported")

        def storage(rec: tuple[Any, ...]) -> Tensor:
            storage_type, key, _location, numel = rec[:4]
            dtype = _dtype(storage_type, str(path))
            raw = z.read(f"{prefix}data/{key}")
            if len(raw) != numel * torch.empty(0, dtype=dtype).element_size():
                raise InputError(f"{path}: storage {key} has {len(raw)} bytes, expected {numel} elements")
            return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)

        return _load(io.BytesIO(z.read(pkl)), str(path), stand_ins, storage)


def _read_legacy(f: BinaryIO, source: str, stand_ins: frozenset[str]) -> Any:
    """The legacy stream (torch < 1.6, or ``_use_new_zipfile_serialization=False``)."""
    if _load(f, source) != LEGACY_MAGIC:
        raise InputError(f"{source}: not a torch.save file (no magic number)")
    if _load(f, source) != LEGACY_PROTOCOL:
        raise InputError(f"{source}: unsupported torch.save protocol version")
    sys_info = _load(f, source)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise InputError(f"{source}: big-endian torch.save files are not supported")
    roots: dict[str, Tensor] = {}

    def storage(rec: tuple[Any, ...]) -> Tensor:
        storage_type, key, _location, numel, view = rec[:5]
        flat = roots.setdefault(str(key), torch.empty(int(numel), dtype=_dtype(storage_type, source)))
        return flat if view is None else flat[int(view[1]): int(view[1]) + int(view[2])]

    result = _load(f, source, stand_ins, storage)
    for key in _load(f, source):
        flat = roots.get(str(key))
        if flat is None:
            raise InputError(f"{source}: storage {key} is listed but never used")
        head = f.read(8)
        nbytes = flat.numel() * flat.element_size()
        raw = f.read(nbytes) if len(head) == 8 and struct.unpack("<q", head)[0] == flat.numel() else b""
        if len(raw) != nbytes:
            raise InputError(f"{source}: truncated or corrupt (storage {key} incomplete)")
        if nbytes:
            flat.copy_(torch.frombuffer(bytearray(raw), dtype=flat.dtype))
    return result


def read_torch_file(path: str | Path, stand_ins: frozenset[str] = frozenset()) -> Any:
    """The object a ``torch.save`` file holds (zip or legacy), rebuilt without running the pickle: tensors,
    containers, and :class:`StandIn` objects for module classes (``torch.nn.modules.*`` and the class names
    in ``stand_ins``). A refused global, a truncated or a non-torch file is one :class:`InputError` line."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path, stand_ins)
        with open(path, "rb") as f:
            return _read_legacy(f, str(path), stand_ins)
    except InputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            zipfile.BadZipFile, struct.error, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: truncated or not a torch.save file ({why})") from None


def module_tensors(obj: StandIn, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``state_dict()`` of a pickled module tree: (dotted name, tensor) of every parameter and persistent
    buffer, in module order (what ``nn.Module.state_dict`` would give)."""
    skip = obj.__dict__.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (obj.__dict__.get(group) or {}).items():
            if t is not None and name not in skip:
                yield prefix + name, t
    for name, child in (obj.__dict__.get("_modules") or {}).items():
        if isinstance(child, StandIn):
            yield from module_tensors(child, f"{prefix}{name}.")

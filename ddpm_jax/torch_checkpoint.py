"""PyTorch ``.pth`` state dicts read as NumPy arrays, without torch and without executing pickled code.

    state = load_state_dict("pt_inception-2015-12-05-6726825d.pth")   # {name: np.ndarray}

``torch.save`` writes a pickle whose opcodes name Python callables (``GLOBAL module name``) that
``pickle.load`` imports and calls: a crafted file runs any code on load. This reader runs the
pickle through a :class:`pickle.Unpickler` whose ``find_class`` resolves only the names a state
dict of tensors needs, to stand-ins defined here (nothing from torch is imported or called):

==========================================  ==================================================
``collections.OrderedDict``                 the state dict itself
``torch._utils._rebuild_tensor_v2``         a tensor: (storage, offset, size, stride, ...)
``torch._utils._rebuild_tensor``            the same, as torch < 0.4 wrote it
``torch._utils._rebuild_parameter``         an ``nn.Parameter`` around such a tensor
``torch.<X>Storage``, ``torch.UntypedStorage``  the storage classes, by dtype (FloatStorage ...)
==========================================  ==================================================

Any other name (``os.system``, ``builtins.eval``, ``torch.load`` ...) is refused before it is
imported, in one line that names it (:class:`UnsafePickleError`). Every opcode that can reach a
callable (GLOBAL, STACK_GLOBAL, INST, OBJ, the EXT registry) goes through ``find_class``, so
nothing outside the table above is ever called.

Two container layouts are read, as ``torch.load`` reads them:

- the zip layout (torch ≥ 1.6): ``<root>/data.pkl`` and one uncompressed entry
  ``<root>/data/<key>`` per storage, the byte order in ``<root>/byteorder`` (little if absent);
- the legacy layout (torch < 1.6; released weights files such as pytorch-fid's are of either age,
  and a state dict saved with ``_use_new_zipfile_serialization=False`` has it): a stream of pickles —
  magic number, protocol version 1001, system info (byte order), the state dict, the list of
  storage keys — followed by each storage as an int64 element count and its raw bytes.

A tensor is the view ``storage[offset + Σ_i k_i·stride_i]`` (k_i < size_i) of its storage, read
with the storage's dtype and byte order; the bounds are checked against the storage's length and
the result is copied into a C-contiguous array in native byte order.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

__all__ = ["CheckpointFormatError", "UnsafePickleError", "load_state_dict", "ALLOWED_GLOBALS", "STORAGE_DTYPES"]

#: torch storage class name -> NumPy dtype name ('bfloat16' comes from ml_dtypes, a JAX dependency).
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch state dict this reader understands (truncated, another container,
    a storage too short for its tensors, ...). One line naming the file."""


class UnsafePickleError(CheckpointFormatError):
    """The pickle names a callable outside the tensor-rebuild set; nothing was imported or called."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only its dtype is used."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A storage's elements as a 1-D NumPy array (filled after unpickling for the legacy layout)."""

    def __init__(self, dtype: np.dtype, numel: int, key: str):
        self.dtype, self.numel, self.key = dtype, int(numel), key
        self.array: Optional[np.ndarray] = None


class _Tensor:
    """A tensor awaiting its storage's bytes (the legacy layout stores them after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _int_tuple(x, what: str) -> Tuple[int, ...]:
    if isinstance(x, int) and not isinstance(x, bool):
        x = (x,)
    if not isinstance(x, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise CheckpointFormatError(f"a tensor's {what} is not a tuple of ints: {x!r}")
    return tuple(int(v) for v in x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view (see the module docstring)."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"_rebuild_tensor_v2 got {type(storage).__name__} instead of a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointFormatError(f"a tensor's storage offset is not a non-negative int: {storage_offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointFormatError(f"a tensor has size {size} and stride {stride}")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """Stand-in for ``torch._utils._rebuild_tensor`` (files of torch < 0.4)."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for ``torch._utils._rebuild_parameter``: the parameter's tensor."""
    del requires_grad, backward_hooks
    if not isinstance(data, _Tensor):
        raise CheckpointFormatError(f"_rebuild_parameter got {type(data).__name__} instead of a tensor")
    return data


#: (module, name) -> stand-in: everything the reader's unpickler resolves.
ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415  (a JAX dependency)

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str, persistent: Optional[Callable] = None):
        super().__init__(file, encoding="utf-8")
        self._where = where
        self._persistent = persistent

    def find_class(self, module, name):
        key = (str(module), str(name))
        if key not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._where}: refusing to load: its pickle calls {key[0]}.{key[1]}, which is not one of the "
                f"tensor-rebuild functions a state dict needs (nothing was executed)")
        return ALLOWED_GLOBALS[key]

    def persistent_load(self, pid):
        if self._persistent is None:
            raise CheckpointFormatError(f"{self._where}: unexpected persistent id {pid!r}")
        return self._persistent(pid)


def _unpickle(data_or_file, where: str, persistent=None):
    f = io.BytesIO(data_or_file) if isinstance(data_or_file, (bytes, bytearray, memoryview)) else data_or_file
    try:
        return _RestrictedUnpickler(f, where, persistent).load()
    except CheckpointFormatError:
        raise
    except Exception as e:  # noqa: BLE001  (a malformed pickle raises many types)
        raise CheckpointFormatError(f"{where}: not a readable PyTorch pickle ({type(e).__name__}: {e})") from None


def _storage_id(pid, where: str, legacy: bool):
    """('storage', storage_type, key, location, numel[, view_metadata]) -> (dtype, key, numel)."""
    n = 6 if legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == n and pid[0] in ("storage", b"storage")):
        raise CheckpointFormatError(f"{where}: unexpected persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType):
        raise CheckpointFormatError(f"{where}: a storage of unknown type {storage_type!r}")
    if legacy and pid[5] is not None:
        raise CheckpointFormatError(f"{where}: storage views (legacy view metadata) are not supported")
    if not isinstance(numel, int) or numel < 0:
        raise CheckpointFormatError(f"{where}: a storage's element count is {numel!r}")
    key = key.decode() if isinstance(key, bytes) else str(key)
    return _np_dtype(storage_type.dtype), key, numel


def _materialise(obj, where: str):
    """Replaces every _Tensor in the unpickled object by its NumPy array; refuses other objects."""
    if isinstance(obj, _Tensor):
        st = obj.storage
        if st.array is None:
            raise CheckpointFormatError(f"{where}: storage {st.key} has no data")
        n = st.array.shape[0]
        if any(s == 0 for s in obj.size):
            return np.zeros(obj.size, st.array.dtype.newbyteorder("="))
        last = obj.offset + sum((s - 1) * t for s, t in zip(obj.size, obj.stride, strict=True))
        if last >= n:
            raise CheckpointFormatError(
                f"{where}: a tensor of size {obj.size}, stride {obj.stride}, offset {obj.offset} reaches element "
                f"{last} of storage {st.key}, which holds {n}")
        item = st.array.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(st.array[obj.offset:], shape=obj.size,
                                               strides=tuple(t * item for t in obj.stride), writeable=False)
        return np.array(view, dtype=st.array.dtype.newbyteorder("="), order="C", copy=True)
    if isinstance(obj, dict):
        return {k: _materialise(v, where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, where) for v in obj)
    if obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return obj
    raise CheckpointFormatError(f"{where}: unexpected object of type {type(obj).__name__} in the state dict")


def _load_zip(raw: bytes, where: str):
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: a damaged zip archive ({e})") from None
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise CheckpointFormatError(f"{where}: a zip archive without exactly one data.pkl: not a torch.save file")
    root = pkl[0][: -len("data.pkl")]
    order = "little"
    if root + "byteorder" in names:
        order = zf.read(root + "byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointFormatError(f"{where}: unknown byte order {order!r}")
    storages: Dict[str, _Storage] = {}

    def persistent(pid):
        dtype, key, numel = _storage_id(pid, where, legacy=False)
        if key not in storages:
            entry = f"{root}data/{key}"
            if entry not in names:
                raise CheckpointFormatError(f"{where}: storage {key} is missing (no entry {entry})")
            dtype = dtype.newbyteorder("<" if order == "little" else ">")
            buf = zf.read(entry)
            if len(buf) < numel * dtype.itemsize:
                raise CheckpointFormatError(f"{where}: storage {key} holds {len(buf)} bytes, fewer than "
                                            f"{numel} elements of {dtype.name}")
            st = _Storage(dtype, numel, key)
            st.array = np.frombuffer(buf, dtype=dtype, count=numel)
            storages[key] = st
        return storages[key]

    try:
        data = zf.read(pkl[0])
    except (zipfile.BadZipFile, OSError, ValueError) as e:  # e.g. a CRC mismatch
        raise CheckpointFormatError(f"{where}: a damaged zip archive ({e})") from None
    return _materialise(_unpickle(data, where, persistent), where)


def _load_legacy(raw: bytes, where: str):
    f = io.BytesIO(raw)
    magic = _unpickle(f, where)
    if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(f"{where}: not a PyTorch file (neither a zip archive nor the legacy magic number)")
    protocol = _unpickle(f, where)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{where}: legacy protocol version {protocol!r}, expected {_LEGACY_PROTOCOL}")
    info = _unpickle(f, where)
    little = bool(info.get("little_endian", True)) if isinstance(info, dict) else True
    storages: Dict[str, _Storage] = {}

    def persistent(pid):
        dtype, key, numel = _storage_id(pid, where, legacy=True)
        if key not in storages:
            storages[key] = _Storage(dtype.newbyteorder("<" if little else ">"), numel, key)
        return storages[key]

    result = _unpickle(f, where, persistent)
    keys = _unpickle(f, where)
    if not isinstance(keys, list):
        raise CheckpointFormatError(f"{where}: the legacy storage key list is {type(keys).__name__}")
    for key in keys:
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in storages:
            raise CheckpointFormatError(f"{where}: storage {key} is listed but not used")
        st = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{where}: truncated before storage {key}")
        (count,) = struct.unpack("<q" if little else ">q", head)
        if count != st.numel:
            raise CheckpointFormatError(f"{where}: storage {key} holds {count} elements, its tensors say {st.numel}")
        nbytes = count * st.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise CheckpointFormatError(f"{where}: truncated in storage {key} ({len(buf)} of {nbytes} bytes)")
        st.array = np.frombuffer(buf, dtype=st.dtype, count=count)
    return _materialise(result, where)


def load_state_dict(source: Union[str, "os.PathLike[str]", bytes], *, where: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Reads a ``torch.save``d state dict (zip or legacy layout) into ``{name: np.ndarray}``.

    Args:
      source: a path, or the file's bytes.
      where: how to name the file in error messages (default: the path).

    Returns:
      dict name -> C-contiguous NumPy array (native byte order; the tensor's dtype and shape).
      Nested containers of tensors come back as nested dicts/lists.

    Raises:
      UnsafePickleError: the pickle names a callable outside :data:`ALLOWED_GLOBALS` (nothing is
        imported or executed; the message names the callable).
      CheckpointFormatError: anything else that is not a readable state dict (the message names
        the file).
      FileNotFoundError: no file at ``source``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw, where = bytes(source), where or "<bytes>"
    else:
        path = os.fspath(source)
        where = where or path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        with open(path, "rb") as fh:
            raw = fh.read()
    if raw[:4] == b"PK\x03\x04":
        return _load_zip(raw, where)
    if raw[:262][257:262] == b"ustar":
        raise CheckpointFormatError(f"{where}: the tar layout of torch < 0.4 is not supported; re-save it with a newer torch")
    return _load_legacy(raw, where)

"""MNIST-family IDX files: one file (:func:`read_idx`) or a directory of the four standard ones
(:func:`load_idx_directory`), gzipped or raw."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Dict, Tuple

import numpy as np

__all__ = ["read_idx", "load_idx_directory", "IDX_FILE_NAMES"]

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    """Reads a file, transparently gunzipping it (by ``.gz`` suffix or by gzip magic bytes)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"IDX file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"IDX file {path!r} is a directory, not a file")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz") or raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(
                f"IDX file {path!r} is not a valid gzip file (corrupt or truncated download?): {e}"
            ) from None
    return raw


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (gzipped ``.gz`` or raw) into a NumPy array.

    The IDX format: a 4-byte magic number ``0x00 0x00 <type> <rank>``, then ``rank`` big-endian
    uint32 dimension sizes, then the payload in C order. MNIST uses ``0x00000803`` (uint8, rank 3:
    images N × H × W) and ``0x00000801`` (uint8, rank 1: labels N). Any rank and the other IDX
    types (int8, int16, int32, float32, float64) are accepted too.

    Args:
      path: the file. Gzip is detected from the ``.gz`` suffix or the gzip magic bytes.

    Returns:
      Array with the shape from the header (e.g. ``(N, H, W)`` uint8 for images, ``(N,)`` uint8 for
      labels), in native byte order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not IDX (bad magic number / type code), its gzip stream is corrupt,
        or its payload does not match the header ("expected N bytes, found M"). Every message
        names the file.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(
            f"IDX file {path!r} is not an IDX file: only {len(data)} bytes, too short for the "
            f"4-byte magic number"
        )
    magic = int.from_bytes(data[:4], "big")
    type_code, rank = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or type_code not in _IDX_DTYPES or rank < 1:
        raise ValueError(
            f"IDX file {path!r} is not an IDX file: bad magic number 0x{magic:08X} (expected "
            f"0x00000803 for images, 0x00000801 for labels, or 0x0000TTRR with a known type TT)"
        )
    header_len = 4 + 4 * rank
    if len(data) < header_len:
        raise ValueError(
            f"IDX file {path!r} is truncated: header of rank {rank} needs {header_len} bytes, "
            f"found {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(
            f"IDX file {path!r} {what}: header says shape {dims} of {dtype.name}, payload "
            f"expected {expected} bytes, found {found}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    # Native byte order, writable, owning its memory (frombuffer over bytes is read-only).
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


# Accepted file names per role, in order of preference. Each base name is also tried with ".gz".
_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


#: role -> the standard (gzipped) file name, as the MNIST-family datasets publish them.
IDX_FILE_NAMES = {role: names[0] + ".gz" for role, names in _IDX_NAMES.items()}


def _idx_candidates(role: str) -> Tuple[str, ...]:
    out = []
    for base in _IDX_NAMES[role]:
        out += [base + ".gz", base]
    return tuple(out)


def load_idx_directory(directory) -> Dict[str, np.ndarray]:
    """Loads an MNIST-family dataset from a directory of IDX files.

    Looks for the standard names ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, each also without ``.gz`` and in
    the dotted variant (``train-images.idx3-ubyte``).

    Returns:
      dict with
        'train_images': (N_train, H, W, C) uint8 (C = 1 for rank-3 IDX images),
        'train_labels': (N_train,) int32,
        'test_images':  (N_test, H, W, C) uint8,
        'test_labels':  (N_test,) int32.

    Raises:
      FileNotFoundError: the directory or one of the four files is missing (the message lists
        every missing file, the names tried and the directory).
      ValueError: a malformed file (see :func:`read_idx`), images that are not uint8 rank 3/4,
        labels that are not rank 1, or image and label counts that differ.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"IDX data directory {directory!r} does not exist (set data.path to a directory "
            f"holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
        )
    paths, missing = {}, []
    for role in _IDX_NAMES:
        names = _idx_candidates(role)
        found = next((n for n in names if os.path.isfile(os.path.join(directory, n))), None)
        if found is None:
            missing.append(f"{role} (tried {', '.join(names)})")
        else:
            paths[role] = os.path.join(directory, found)
    if missing:
        raise FileNotFoundError(
            f"IDX data directory {directory!r} is missing {len(missing)} file(s): "
            + "; ".join(missing)
        )
    out = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"])
        labels = read_idx(paths[f"{split}_labels"])
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"IDX file {paths[f'{split}_images']!r}: expected uint8 images of rank 3 "
                f"(N, H, W) or 4 (N, H, W, C), got {images.dtype.name} of shape {images.shape}"
            )
        if labels.ndim != 1:
            raise ValueError(
                f"IDX file {paths[f'{split}_labels']!r}: expected rank-1 labels (N,), got shape "
                f"{labels.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"IDX data directory {directory!r}: {split} has {images.shape[0]} images "
                f"({os.path.basename(paths[f'{split}_images'])}) but {labels.shape[0]} labels "
                f"({os.path.basename(paths[f'{split}_labels'])})"
            )
        if images.ndim == 3:
            images = images[..., None]
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = labels.astype(np.int32)
    return out

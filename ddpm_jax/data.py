"""Datasets in memory: loading, the source notebook's split, scaling, and deterministic batches.

Everything here works on whole NumPy arrays. MNIST-sized data (70,000 × 28 × 28) fits in memory,
so the training loop never does per-example Python work: a batch is one fancy-indexing operation.

Sources (``data.source`` in the configs):

  'tfds'    TensorFlow Datasets via ``tfds.data_source`` (ArrayRecord files; no TensorFlow needed).
            Downloads on first use, so it needs internet once. Default for users.
  'idx'     A directory of IDX files (``train-images-idx3-ubyte.gz``, …), the MNIST-family format.
            Works offline; ``data.path`` names the directory.
  'arrays'  A dict of arrays shaped like :func:`load_idx_directory`'s result (tests, notebooks).

The split (:func:`load_splits`) follows the source notebook: the official train and test images
are pooled (70,000 for MNIST), permuted with ``seed``, and the first ``train_size`` become the
training set, the next ``val_size`` the validation set. The official test split is kept separately
for evaluation; with this split the validation set overlaps it.

Batches are a pure function of ``(seed, step)`` (:func:`batch_indices`): epoch ``e`` is the
permutation drawn from ``np.random.default_rng([seed, e])``, so a run resumed at global step ``s``
sees exactly the batches it would have seen without the interruption. The global step is the only
"data position" a checkpoint needs. Random horizontal flips (``data.random_flip``) are a pure
function of ``(seed, step, position in the global batch)`` too (:func:`flip_mask`).

Multi-device / multi-host: every process computes the same global batch indices and takes its
contiguous slice ``[process_index * lb : (process_index + 1) * lb]`` (:class:`BatchIterator`);
:func:`shard_batch` assembles the per-process slices into one global ``jax.Array`` sharded along
the batch axis over the 1-D mesh axis ``'data'`` (:func:`make_mesh`); :func:`shard_for_pmap`
reshapes for ``jax.pmap`` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import operator
import os
import zlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "read_idx",
    "load_idx_directory",
    "load_tfds",
    "SCALES",
    "SOURCES",
    "scale_images",
    "unscale_images",
    "Splits",
    "load_splits",
    "splits_from_config",
    "steps_per_epoch",
    "batch_indices",
    "flip_mask",
    "flip_images",
    "BatchIterator",
    "check_batch_divisible",
    "shard_batch",
    "shard_for_pmap",
    "make_mesh",
    "DATA_AXIS",
]

SCALES = ("[0,1]", "[-1,1]")
SOURCES = ("tfds", "idx", "arrays")
DATA_AXIS = "data"

_ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")

# ------------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# TFDS (without TensorFlow)
# ------------------------------------------------------------------------------------------------

_TFDS_HINT = (
    "or use the offline source: data.source=idx with data.path=<directory of IDX files> "
    "(e.g. ../shared/data/mnist)"
)
_TFDS_CHUNK = 4096


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (optional, heavy import)
    except ImportError as e:
        raise ImportError(
            f"data.source=tfds needs tensorflow-datasets (pip install tensorflow-datasets "
            f"array_record), which could not be imported ({e}); {_TFDS_HINT}"
        ) from e
    if importlib.util.find_spec("array_record") is None:
        raise ImportError(
            "data.source=tfds reads ArrayRecord files without TensorFlow and needs the "
            f"'array_record' package (pip install array_record); {_TFDS_HINT}"
        )
    return tfds


def _source_to_arrays(source, name: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a whole TFDS data source (a random-access sequence of example dicts) into arrays."""
    n = len(source)
    if n == 0:
        raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
    getitems = getattr(source, "__getitems__", None)
    images = labels = None
    for start in range(0, n, _TFDS_CHUNK):
        keys = list(range(start, min(start + _TFDS_CHUNK, n)))
        # Decoding is per example inside TFDS; this one-time load is the only place it happens.
        examples = getitems(keys) if getitems is not None else [source[k] for k in keys]
        chunk_images = np.stack([np.asarray(ex["image"]) for ex in examples])
        chunk_labels = np.asarray([ex["label"] for ex in examples])
        if images is None:
            if chunk_images.ndim not in (3, 4):
                raise ValueError(
                    f"TFDS dataset {name!r} split {split!r}: expected images of shape (H, W) or "
                    f"(H, W, C), got {chunk_images.shape[1:]}"
                )
            images = np.empty((n,) + chunk_images.shape[1:], dtype=np.uint8)
            labels = np.empty((n,), dtype=np.int32)
        images[start : start + len(keys)] = chunk_images
        labels[start : start + len(keys)] = chunk_labels
    if images.ndim == 3:
        images = images[..., None]
    return images, labels


def _tfds_error_message(e: BaseException, name: str, split: str, data_dir) -> str:
    detail = str(e).strip()
    lines = detail.splitlines()
    if len(detail) > 400 or len(lines) > 3:  # e.g. DatasetNotFoundError lists every dataset
        detail = (lines[0] if lines else "")[:400] + " [...]"
    head = (
        f"TFDS could not load dataset {name!r} split {split!r} (data_dir={data_dir!r}): "
        f"{type(e).__name__}: {detail}."
    )
    if _mentions_tensorflow(e):
        return (
            f"{head} Reading prepared ArrayRecord files needs no TensorFlow, but TFDS needs it "
            f"once to *generate* {name!r} into data_dir (pip install tensorflow-cpu, run once, "
            f"then it can be uninstalled), {_TFDS_HINT}"
        )
    return f"{head} Check data.name and your internet connection, {_TFDS_HINT}"


def _mentions_tensorflow(e: Optional[BaseException]) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, ImportError) and (e.name or "").split(".")[0] == "tensorflow":
            return True
        if "No module named 'tensorflow'" in str(e):
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


def load_tfds(name: str = "mnist", data_dir=None) -> Dict[str, np.ndarray]:
    """Loads a TFDS image-classification dataset ('train' and 'test' splits) into memory.

    Uses ``tfds.data_source`` with the ArrayRecord file format, so *reading* needs no TensorFlow
    (images are decoded with PIL/OpenCV). Downloads and prepares the dataset on first use (needs
    internet once; cached in ``data_dir``, default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    Note: in TFDS 4.9 the *generation* step of the mnist/cifar10 builders itself calls TensorFlow
    (``tf.io.gfile``, ``tf.image.encode_png``), and pre-built GCS copies are only used for the
    TFRecord format, so the very first preparation needs TensorFlow installed (or ArrayRecord files
    prepared elsewhere and copied into ``data_dir``); the error message says so. Works for
    datasets with ``'image'`` (uint8 H × W × C) and ``'label'`` features: mnist, fashion_mnist,
    cifar10, ...

    Returns:
      dict like :func:`load_idx_directory`: 'train_images' (N_train, H, W, C) uint8,
      'train_labels' (N_train,) int32, 'test_images', 'test_labels'.

    Raises:
      ImportError: tensorflow-datasets or array_record is not installed (the message suggests
        ``data.source=idx``).
      RuntimeError: TFDS could not build or read the dataset (no internet, unknown name, ...);
        the original exception is chained.
    """
    tfds = _import_tfds()
    out = {}
    for split in ("train", "test"):
        try:
            source = tfds.data_source(
                name,
                split=split,
                data_dir=None if data_dir is None else os.fspath(data_dir),
                download=True,
                builder_kwargs={"file_format": "array_record"},
            )
        except Exception as e:  # noqa: BLE001  (TFDS raises many types; re-raise with a hint)
            raise RuntimeError(_tfds_error_message(e, name, split, data_dir)) from e
        images, labels = _source_to_arrays(source, name, split)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


# ------------------------------------------------------------------------------------------------
# Scaling
# ------------------------------------------------------------------------------------------------


def _check_scale(scale) -> str:
    if scale not in SCALES:
        raise ValueError(f"unknown data.scale {scale!r}; valid values: {', '.join(SCALES)}")
    return scale


def scale_images(images_uint8, scale: str = "[0,1]") -> np.ndarray:
    """Maps uint8 pixels to float32 model space.

    Args:
      images_uint8: integer array of pixels in 0..255, any shape (typically (N, H, W, C)).
      scale: '[0,1]' → x / 255 (the source notebook) or '[-1,1]' → x / 127.5 − 1.

    Returns:
      float32 NumPy array of the same shape.

    Raises:
      ValueError: unknown ``scale`` (the message lists :data:`SCALES`).
      TypeError: a floating-point input (probably already scaled).
    """
    _check_scale(scale)
    x = np.asarray(images_uint8)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise TypeError(
            f"scale_images expects integer pixels in 0..255, got dtype {x.dtype} (already scaled?)"
        )
    x = x.astype(np.float32)
    if scale == "[0,1]":
        return x / np.float32(255.0)
    return x / np.float32(127.5) - np.float32(1.0)


def data_range(scale: str) -> Tuple[float, float]:
    """(lo, hi) of model-space pixel values for a ``data.scale``: (0, 1) or (−1, 1)."""
    return (0.0, 1.0) if _check_scale(scale) == "[0,1]" else (-1.0, 1.0)


def unscale_images(x, scale: str = "[0,1]", clip: bool = True):
    """Maps model-space images back to the [0, 1] pixel range, e.g. for image grids and metrics.

    Args:
      x: float array of any shape (NumPy, or a ``jax.Array``, also inside ``jit``).
      scale: the ``data.scale`` the images were produced in (see :func:`scale_images`).
      clip: clip to [0, 1] (default). ``False`` keeps values outside, as the notebook's pixel FID
        sees its unclipped samples.

    Returns:
      float32 array of the same shape and kind (NumPy in, NumPy out; JAX in, JAX out).
    """
    _check_scale(scale)
    xp = np
    try:
        import jax  # noqa: PLC0415

        if isinstance(x, jax.Array):
            import jax.numpy as jnp  # noqa: PLC0415

            xp = jnp
    except ImportError:  # pragma: no cover
        pass
    x = xp.asarray(x).astype(xp.float32)
    if scale == "[-1,1]":
        x = (x + 1.0) * 0.5
    return xp.clip(x, 0.0, 1.0) if clip else x


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Splits:
    """The scaled datasets of one run.

    Attributes:
      train: (N_train, H, W, C) float32, scaled per ``scale``.
      val: (N_val, H, W, C) float32 (N_val may be 0).
      test: (N_test, H, W, C) float32: the official test split, for evaluation. With the
        notebook's split (the default) train and val are drawn from the pooled train+test images,
        so the validation set (and train) overlap this test set; use it for numbers comparable to
        other work, not as a held-out set for this model.
      train_labels: (N_train,) int32.
      val_labels: (N_val,) int32.
      test_labels: (N_test,) int32.
      train_index: (N_train,) int64 indices of the training images in the pool
        (official train images followed by official test images).
      val_index: (N_val,) int64 indices of the validation images in the pool.
      scale: the ``data.scale`` used.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray
    val_labels: np.ndarray
    test_labels: np.ndarray
    train_index: Optional[np.ndarray] = None
    val_index: Optional[np.ndarray] = None
    scale: str = "[0,1]"

    @property
    def image_shape(self) -> Tuple[int, ...]:
        """(H, W, C)."""
        return tuple(self.train.shape[1:])


def _check_arrays(arrays, where: str) -> Dict[str, np.ndarray]:
    if not isinstance(arrays, dict):
        raise TypeError(f"{where} must be a dict with keys {_ARRAY_KEYS}, got {type(arrays)}")
    missing = [k for k in _ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{where} is missing key(s) {missing}; expected {_ARRAY_KEYS}")
    out = {}
    for split in ("train", "test"):
        images = np.asarray(arrays[f"{split}_images"])
        labels = np.asarray(arrays[f"{split}_labels"])
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(
                f"{where}['{split}_images'] must have shape (N, H, W, C) or (N, H, W), got "
                f"{images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{where}: {split} has {images.shape[0]} images but labels of shape {labels.shape}"
            )
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels.astype(np.int32)
    if out["train_images"].shape[1:] != out["test_images"].shape[1:]:
        raise ValueError(
            f"{where}: train images {out['train_images'].shape[1:]} and test images "
            f"{out['test_images'].shape[1:]} have different (H, W, C)"
        )
    return out


def _check_count(value, key: str, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum`` (accepts NumPy/JAX integer scalars)."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {out}")
    return out


def load_splits(
    source: str,
    *,
    name: str = "mnist",
    path=None,
    scale: str = "[0,1]",
    train_size: int = 50000,
    val_size: int = 20000,
    seed: int = 0,
    arrays: Optional[Dict[str, np.ndarray]] = None,
) -> Splits:
    """Loads a dataset and makes the source notebook's train/validation split.

    All official train and test images are pooled (train first, then test: 70,000 for MNIST),
    permuted with ``np.random.default_rng(seed)``; the first ``train_size`` become ``train`` and the
    next ``val_size`` become ``val``. ``test`` is the official test split, unchanged in order.

    Args:
      source: 'tfds' (``name``, ``path`` as the TFDS data_dir), 'idx' (``path``: a directory of
        IDX files) or 'arrays' (``arrays``: a dict like :func:`load_idx_directory` returns).
      name: TFDS dataset name (source 'tfds' only).
      path: IDX directory (source 'idx', required) or TFDS data_dir (source 'tfds', optional).
      scale: one of :data:`SCALES`.
      train_size: number of training images, >= 1.
      val_size: number of validation images, >= 0; train_size + val_size <= the pool size.
      seed: the split's permutation seed.
      arrays: the raw arrays for source 'arrays'.

    Returns:
      :class:`Splits` with float32 images scaled per ``scale`` and int32 labels.

    Raises:
      ValueError: unknown source or scale, missing ``data.path``/``arrays``, or sizes that exceed
        the pool (the message names ``data.train_size`` / ``data.val_size``).
    """
    _check_scale(scale)
    if source == "tfds":
        raw = load_tfds(name, data_dir=path)
    elif source == "idx":
        if path is None:
            raise ValueError(
                "data.source=idx needs data.path: the directory holding the IDX files "
                "(train-images-idx3-ubyte.gz, ...)"
            )
        raw = load_idx_directory(path)
    elif source == "arrays":
        if arrays is None:
            raise ValueError("data.source=arrays needs the arrays= argument (a dict of arrays)")
        raw = arrays
    else:
        raise ValueError(f"unknown data.source {source!r}; valid values: {', '.join(SOURCES)}")
    raw = _check_arrays(raw, f"data from source {source!r}")

    train_size = _check_count(train_size, "data.train_size", 1)
    val_size = _check_count(val_size, "data.val_size", 0)
    n_train_official = raw["train_images"].shape[0]
    pool_size = n_train_official + raw["test_images"].shape[0]
    if train_size + val_size > pool_size:
        raise ValueError(
            f"data.train_size + data.val_size = {train_size} + {val_size} = "
            f"{train_size + val_size} exceeds the {pool_size} images available "
            f"({n_train_official} train + {pool_size - n_train_official} test)"
        )
    perm = np.random.default_rng(seed).permutation(pool_size)
    train_index = perm[:train_size]
    val_index = perm[train_size : train_size + val_size]

    pool_images = np.concatenate([raw["train_images"], raw["test_images"]])
    pool_labels = np.concatenate([raw["train_labels"], raw["test_labels"]])
    return Splits(
        train=scale_images(pool_images[train_index], scale),
        val=scale_images(pool_images[val_index], scale),
        test=scale_images(raw["test_images"], scale),
        train_labels=pool_labels[train_index],
        val_labels=pool_labels[val_index],
        test_labels=raw["test_labels"].copy(),
        train_index=train_index,
        val_index=val_index,
        scale=scale,
    )


# ------------------------------------------------------------------------------------------------
# Deterministic batches
# ------------------------------------------------------------------------------------------------


def splits_from_config(config, *, source: Optional[str] = None, path: Optional[str] = None, arrays=None) -> "Splits":
    """:func:`load_splits` with a training config's ``data`` keys and ``seed`` (what a run trained on);
    ``source`` / ``path`` override ``config.data.source`` / ``config.data.path``."""
    d = config.data
    return load_splits(source or d.source, name=d.name, path=(path or d.path) or None, scale=d.scale,
                       train_size=d.train_size, val_size=d.val_size, seed=config.seed, arrays=arrays)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Number of full batches per epoch (the remainder is dropped).

    Raises:
      ValueError: non-positive sizes, or ``global_batch > num_examples``.
    """
    num_examples = _check_count(num_examples, "num_examples", 1)
    global_batch = _check_count(global_batch, "train.batch_size", 1)
    if global_batch > num_examples:
        raise ValueError(
            f"train.batch_size={global_batch} exceeds the {num_examples} training examples"
        )
    return num_examples // global_batch


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)  # shared through the cache
    return perm


def batch_indices(seed: int, step: int, num_examples: int, global_batch: int) -> np.ndarray:
    """Indices of the global batch at ``step``: a pure function of ``(seed, step)``.

    ``epoch = step // steps_per_epoch``; each epoch is the permutation
    ``np.random.default_rng([seed, epoch]).permutation(num_examples)`` (cached, so consecutive
    steps do not recompute it), and the batch is its ``step % steps_per_epoch``-th block of
    ``global_batch`` indices. Within an epoch no index repeats; the dropped remainder differs
    from epoch to epoch.

    Returns:
      (global_batch,) int64 array of indices into the ``num_examples`` examples.
    """
    seed = _check_count(seed, "seed", 0)
    step = _check_count(step, "step", 0)
    spe = steps_per_epoch(num_examples, global_batch)
    epoch, i = divmod(step, spe)
    perm = _epoch_permutation(seed, epoch, int(num_examples))
    return perm[i * global_batch : (i + 1) * global_batch].copy()


#: Entry of the flips' seed sequence that keeps it apart from the epoch permutations'.
_FLIP_STREAM = 0x666C6970


def flip_mask(seed: int, step: int, global_batch: int) -> np.ndarray:
    """Which examples of the global batch at ``step`` are flipped left-right: ``(global_batch,)``
    bool, ``np.random.default_rng([seed, step, _FLIP_STREAM]).random(global_batch) < 0.5``, a
    pure function of ``(seed, step, position in the global batch)`` (so a resumed run, and every
    process's slice of the batch, sees the same flips)."""
    seed = _check_count(seed, "seed", 0)
    step = _check_count(step, "step", 0)
    return np.random.default_rng([seed, step, _FLIP_STREAM]).random(global_batch) < 0.5


def flip_images(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``images`` ``(B, H, W, C)`` with those where ``mask`` ``(B,)`` is True mirrored along W
    (one vectorised ``np.where``); same dtype."""
    return np.where(np.asarray(mask, bool)[:, None, None, None], images[:, :, ::-1], images)


def check_batch_divisible(global_batch: int, num_devices: int) -> None:
    """Raises ValueError unless ``train.batch_size`` is divisible by the device count."""
    if num_devices < 1 or global_batch % num_devices != 0:
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by the {num_devices} devices; "
            f"choose a multiple of {num_devices}"
        )


class BatchIterator:
    """Deterministic, resumable, process-sharded batches over an in-memory array.

    Iterating yields ``(step, local_batch)`` forever, starting at ``start_step``. ``local_batch``
    is ``images[idx]`` with ``idx`` this process's contiguous slice
    ``[process_index * lb : (process_index + 1) * lb]`` of :func:`batch_indices` (``lb =
    global_batch // process_count``): shape ``(lb,) + images.shape[1:]``, one NumPy fancy-indexing
    operation per batch. Resuming at step ``s`` (``start_step=s``) reproduces exactly the batches
    of an uninterrupted run.

    ``images`` may also be a tuple/list/dict of arrays with the same leading size (e.g. images and
    labels); ``local_batch`` then has the same structure.

    With ``random_flip=True`` each example is mirrored left-right where :func:`flip_mask` (over
    the global batch, this process's slice of it) says so; only rank-4 ``(N, H, W, C)`` arrays
    are flipped (labels pass through).
    """

    def __init__(
        self,
        images,
        global_batch: int,
        *,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        random_flip: bool = False,
    ):
        self.arrays = images
        self.random_flip = bool(random_flip)
        leaves = _leaves(images)
        if not leaves:
            raise ValueError("BatchIterator needs at least one array")
        self.num_examples = int(leaves[0].shape[0])
        for leaf in leaves[1:]:
            if leaf.shape[0] != self.num_examples:
                raise ValueError(
                    f"BatchIterator arrays differ in leading size: {self.num_examples} vs "
                    f"{leaf.shape[0]}"
                )
        self.global_batch = _check_count(global_batch, "train.batch_size", 1)
        self.steps_per_epoch = steps_per_epoch(self.num_examples, self.global_batch)
        self.seed = _check_count(seed, "seed", 0)
        self.step = _check_count(start_step, "start_step", 0)
        process_count = _check_count(process_count, "process_count", 1)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if self.global_batch % process_count:
            raise ValueError(
                f"train.batch_size={self.global_batch} is not divisible by the {process_count} "
                f"processes"
            )
        self.process_index, self.process_count = int(process_index), process_count
        self.local_batch = self.global_batch // process_count

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def local_indices(self, step: int) -> np.ndarray:
        """(local_batch,) indices of this process's part of the global batch at ``step``."""
        idx = batch_indices(self.seed, step, self.num_examples, self.global_batch)
        lo = self.process_index * self.local_batch
        return idx[lo : lo + self.local_batch]

    def batch(self, step: int):
        """This process's batch at ``step`` (random access; does not move the iterator)."""
        idx = self.local_indices(step)
        if not self.random_flip:
            return _map(lambda a: a[idx], self.arrays)
        lo = self.process_index * self.local_batch
        mask = flip_mask(self.seed, step, self.global_batch)[lo : lo + self.local_batch]
        return _map(lambda a: flip_images(a[idx], mask) if a.ndim == 4 else a[idx], self.arrays)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self):
        step = self.step
        out = (step, self.batch(step))
        self.step = step + 1
        return out

    def take(self, num_steps: int) -> Iterator:
        """Yields the next ``num_steps`` ``(step, local_batch)`` pairs, advancing the iterator."""
        for _ in range(_check_count(num_steps, "num_steps", 0)):
            yield next(self)


def _leaves(tree) -> list:
    if isinstance(tree, dict):
        return [a for k in sorted(tree) for a in _leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [a for t in tree for a in _leaves(t)]
    return [tree]


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(fn, t) for t in tree)
    return fn(tree)


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------


def make_mesh(devices: Optional[Sequence] = None):
    """A 1-D ``jax.sharding.Mesh`` with axis name ``'data'``.

    Args:
      devices: the devices (default: all devices of all processes, ordered by process index then
        device id, so each process's devices form a contiguous block in process order and the
        global array built by :func:`shard_batch` equals the global batch of
        :func:`batch_indices`).
    """
    import jax  # noqa: PLC0415

    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = np.asarray(list(devices), dtype=object)
    if devices.size == 0:
        raise ValueError("make_mesh needs at least one device")
    return jax.sharding.Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(batch_size: int):
    """``NamedSharding`` splitting axis 0 of a ``(batch_size, ...)`` array over this process's
    devices, or None (no split) with one device, several processes, or a batch size they do not
    divide. For outputs a single process computes whole, e.g. a batch of samples."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    devices = jax.local_devices()
    if len(devices) == 1 or jax.process_count() > 1 or batch_size % len(devices):
        return None
    return NamedSharding(make_mesh(devices), P(DATA_AXIS))


def shard_batch(local_batch, mesh):
    """Places this process's batch on the mesh as one global, batch-sharded ``jax.Array``.

    Args:
      local_batch: (local_batch, ...) NumPy array (or a pytree of them) from this process: its
        contiguous slice of the global batch (:class:`BatchIterator`).
      mesh: a mesh with axis ``'data'`` (:func:`make_mesh`).

    Returns:
      ``jax.Array`` of shape (global_batch, ...) = (local_batch × process_count, ...), sharded along
      axis 0 over ``'data'`` (``NamedSharding(mesh, P('data'))``). Works unchanged on one host or
      many (``jax.make_array_from_process_local_data``).

    Raises:
      ValueError: the local batch is not divisible by this process's devices in the mesh.
    """
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    n_local = len(mesh.local_devices)
    for leaf in jax.tree_util.tree_leaves(local_batch):
        b = np.shape(leaf)[0]
        if b % n_local:
            raise ValueError(
                f"local batch of {b} examples is not divisible by this process's {n_local} "
                f"devices (train.batch_size must be divisible by the total device count)"
            )
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, local_batch)


def shard_for_pmap(local_batch, num_local_devices: int):
    """Reshapes (local_batch, ...) → (num_local_devices, local_batch // num_local_devices, ...).

    Accepts a NumPy array or a pytree (tuple/list/dict) of them.

    Raises:
      ValueError: the local batch is not divisible by ``num_local_devices``.
    """
    n = _check_count(num_local_devices, "num_local_devices", 1)

    def reshape(a):
        a = np.asarray(a)
        if a.shape[0] % n:
            raise ValueError(
                f"local batch of {a.shape[0]} examples is not divisible by the {n} local devices"
            )
        return a.reshape((n, a.shape[0] // n) + a.shape[1:])

    return _map(reshape, local_batch)

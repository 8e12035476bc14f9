"""TensorFlow Datasets, read without TensorFlow (``tfds.data_source`` over ArrayRecord files), for
datasets outside the MNIST family (:mod:`ddpm_jax.data.download` serves those)."""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["load_tfds"]

_TFDS_HINT = (
    "or use the offline source: data.source=idx with data.path=<directory of IDX files>"
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

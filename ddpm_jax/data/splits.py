"""Scaling to model space and the source notebook's train/validation split of a loaded dataset.

The split (:func:`load_splits`): the official train and test images are pooled (70,000 for
MNIST), permuted with ``seed``, and the first ``train_size`` become the training set, the next
``val_size`` the validation set. The official test split is kept separately for evaluation; with
this split the validation set overlaps it.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Dict, Optional, Tuple

import numpy as np

from ddpm_jax.data import sources

__all__ = ["SCALES", "scale_images", "data_range", "unscale_images", "Splits", "load_splits", "splits_from_config"]

SCALES = ("[0,1]", "[-1,1]")


_ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


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
    url: Optional[str] = None,
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
      source, name, path, url, arrays: where the data come from
        (:func:`ddpm_jax.data.sources.load_raw`: 'auto', 'idx', 'tfds', 'folder', 'arrays').
      scale: one of :data:`SCALES`.
      train_size: number of training images, >= 1.
      val_size: number of validation images, >= 0; train_size + val_size <= the pool size.
      seed: the split's permutation seed.

    Returns:
      :class:`Splits` with float32 images scaled per ``scale`` and int32 labels.

    Raises:
      ValueError: unknown source or scale, missing ``data.path``/``arrays``, bad data, or sizes that exceed
        the pool (the message names ``data.train_size`` / ``data.val_size``).
    """
    _check_scale(scale)
    raw = sources.load_raw(source, name=name, path=path, url=url, arrays=arrays)
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


def splits_from_config(config, *, source: Optional[str] = None, path: Optional[str] = None, arrays=None) -> "Splits":
    """:func:`load_splits` with a training config's ``data`` keys and ``seed`` (what a run trained on);
    ``source`` / ``path`` override ``config.data.source`` / ``config.data.path``."""
    d = config.data
    return load_splits(source or d.source, name=d.name, path=(path or d.path) or None, url=d.get("url", "") or None, scale=d.scale,
                       train_size=d.train_size, val_size=d.val_size, seed=config.seed, arrays=arrays)

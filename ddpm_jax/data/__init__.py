"""Datasets in memory: sources, the source notebook's split, scaling, and deterministic batches.

Everything works on whole NumPy arrays. MNIST-sized data (70,000 × 28 × 28) fits in memory, so
the training loop does no per-example Python work: a batch is one fancy-indexing operation.

  sources.py   ``data.source``: 'auto' (IDX files from data.path, the cache or an HTTPS download
               for the MNIST family; TFDS otherwise), 'idx', 'tfds', 'folder', 'arrays'
  idx.py       reading IDX files;  download.py  the checked download and cache
  tfds.py      TensorFlow Datasets without TensorFlow;  folder.py  a directory of PNG/JPEG images
  splits.py    scaling to model space and the train/validation split (:func:`load_splits`)
  batches.py   batches as a pure function of (seed, step), resumable, sliced per process

The mesh and the batch shardings live in :mod:`ddpm_jax.sharding` (re-exported here).
"""

from ddpm_jax.data.batches import BatchIterator, batch_indices, flip_images, flip_mask, steps_per_epoch
from ddpm_jax.data.download import DownloadError, default_cache_dir, fetch
from ddpm_jax.data.folder import load_image_folder
from ddpm_jax.data.idx import load_idx_directory, read_idx
from ddpm_jax.data.sources import SOURCES, load_raw
from ddpm_jax.data.splits import SCALES, Splits, data_range, load_splits, scale_images, splits_from_config, unscale_images
from ddpm_jax.data.tfds import load_tfds
from ddpm_jax.sharding import DATA_AXIS, batch_sharding, make_mesh, shard_batch, shard_for_pmap

__all__ = [
    "read_idx", "load_idx_directory", "load_tfds", "load_image_folder", "fetch", "default_cache_dir", "DownloadError",
    "SOURCES", "load_raw", "SCALES", "scale_images", "data_range", "unscale_images", "Splits", "load_splits",
    "splits_from_config", "steps_per_epoch", "batch_indices", "flip_mask", "flip_images", "BatchIterator",
    "shard_batch", "shard_for_pmap", "make_mesh", "batch_sharding", "DATA_AXIS",
]

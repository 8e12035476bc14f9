"""``data.source``: where a dataset's raw arrays come from.

  'auto'    The default. MNIST-family names ('mnist', 'fashion_mnist'): the IDX files in
            ``data.path`` when given, else the per-user cache, downloading into it over HTTPS
            what is missing (:mod:`ddpm_jax.data.download`; no TensorFlow needed). Any other
            name: TensorFlow Datasets, ``data.path`` as its data_dir.
  'idx'     A directory of IDX files (``data.path``, required): train-images-idx3-ubyte.gz, ...
  'tfds'    TensorFlow Datasets (``tfds.data_source`` over ArrayRecord files).
  'folder'  A directory of PNG/JPEG images (``data.path``; :mod:`ddpm_jax.data.folder`).
  'arrays'  A dict of arrays shaped like :func:`load_idx_directory`'s result (tests, notebooks).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ddpm_jax.data import download
from ddpm_jax.data.folder import load_image_folder
from ddpm_jax.data.idx import load_idx_directory
from ddpm_jax.data.tfds import load_tfds

__all__ = ["SOURCES", "load_raw"]

SOURCES = ("auto", "tfds", "idx", "folder", "arrays")


def load_raw(source: str, *, name: str = "mnist", path=None, url: Optional[str] = None,
             arrays: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """The raw dataset: 'train_images' (N, H, W, C) uint8, 'train_labels' (N,), 'test_images',
    'test_labels', from ``source`` (one of :data:`SOURCES`; see the module docstring).

    ``url``: a mirror for the MNIST-family download (source 'auto' without ``path``).

    Raises:
      ValueError: an unknown source, a source without the ``path`` / ``arrays`` it needs, or
        what the source itself raises (a malformed file, a failed checksum).
      FileNotFoundError: ``path`` or one of its files does not exist.
      download.DownloadError: the download found no server (the message says how to pass data.path).
    """
    if source == "auto":
        if name in download.DATASETS:
            return load_idx_directory(path if path else download.fetch(name, base_url=url))
        return load_tfds(name, data_dir=path)
    if source in ("idx", "folder"):
        if not path:
            raise ValueError(f"data.source={source} needs data.path: the directory holding the "
                             + ("IDX files (train-images-idx3-ubyte.gz, ...)" if source == "idx" else "images"))
        return load_idx_directory(path) if source == "idx" else load_image_folder(path)
    if source == "tfds":
        return load_tfds(name, data_dir=path)
    if source == "arrays":
        if arrays is None:
            raise ValueError("data.source=arrays needs the arrays= argument (a dict of arrays)")
        return arrays
    raise ValueError(f"unknown data.source {source!r}; valid values: {', '.join(SOURCES)}")

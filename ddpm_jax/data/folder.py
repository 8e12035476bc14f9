"""A directory of your own images (PNG or JPEG) as a dataset: ``data.source='folder'``.

Layouts (``path`` is the directory):

  path/*.png                          unlabelled: every label is 0
  path/<class>/*.png                  one sub-directory per class: labels 0..K-1 in sorted name order
  path/train/..., path/test/...       the two splits given, each in one of the layouts above

Without ``train/`` and ``test/``, a fixed seventh of the images (at least one; a permutation
with seed 0 of the sorted file names) becomes the test split, as MNIST's 10,000 of 70,000.
Every image must have one size. Images are read as RGB (an alpha channel is dropped); if no
pixel of any image has colour (R = G = B everywhere), the dataset is grayscale, (H, W, 1).
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _list(directory: str) -> Tuple[List[str], List[int], List[str]]:
    """(files, labels, class names) of one split's directory (flat or one sub-directory per class)."""
    entries = sorted(os.listdir(directory))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(directory, e)) and not e.startswith(".")]
    flat = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(directory, e))]
    if subdirs and flat:
        raise ValueError(f"{directory} holds both images ({flat[0]}, ...) and class sub-directories ({subdirs[0]}, ...): "
                         "put every image in a class sub-directory, or none")
    if not subdirs:
        return [os.path.join(directory, f) for f in flat], [0] * len(flat), []
    files, labels = [], []
    for k, sub in enumerate(subdirs):
        names = sorted(n for n in os.listdir(os.path.join(directory, sub)) if _is_image(n))
        files += [os.path.join(directory, sub, n) for n in names]
        labels += [k] * len(names)
    return files, labels, subdirs


def _read(files: List[str]) -> Tuple[np.ndarray, bool]:
    """(N, H, W, 3) uint8 RGB, or (N, H, W, 1) when no image has colour; one size for all, else ValueError."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (Pillow: matplotlib's dependency)

    images, colour, first = [], False, None
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                size = im.size
                arr = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise ValueError(f"images differ in size: {first[0]} is {first[1][0]}x{first[1][1]}, {path} is {size[0]}x{size[1]} "
                             "(resize them to one size first)")
        colour = colour or bool((arr[..., 0] != arr[..., 1]).any() or (arr[..., 1] != arr[..., 2]).any())
        images.append(arr)
    x = np.stack(images)
    return (x if colour else x[..., :1]), colour


def load_image_folder(path) -> Dict[str, np.ndarray]:
    """The images under ``path`` (see the module docstring for the layouts).

    Returns:
      dict like :func:`ddpm_jax.data.load_idx_directory`: 'train_images' (N_train, H, W, C) uint8,
      'train_labels' (N_train,) int32, 'test_images', 'test_labels'.

    Raises:
      FileNotFoundError: ``path`` is not a directory.
      ValueError: no images, images of different sizes, an unreadable file (each message names
        the file), or train/ and test/ with different class sub-directories.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist (data.path: a directory of PNG/JPEG images)")
    split_dirs = [os.path.join(path, s) for s in ("train", "test")]
    if all(os.path.isdir(d) for d in split_dirs):
        (tr_files, tr_labels, tr_classes), (te_files, te_labels, te_classes) = map(_list, split_dirs)
        if tr_classes != te_classes:
            raise ValueError(f"{path}: train/ and test/ have different class sub-directories ({tr_classes} vs {te_classes})")
        files, labels = tr_files + te_files, tr_labels + te_labels
        n_train = len(tr_files)
        if not tr_files or not te_files:
            raise ValueError(f"{path}: {'train' if not tr_files else 'test'}/ holds no PNG or JPEG images")
    else:
        files, labels, _ = _list(path)
        n_train = None
    if not files:
        raise ValueError(f"image folder {path!r} holds no PNG or JPEG images ({', '.join(IMAGE_EXTENSIONS)})")
    images, _ = _read(files)
    labels = np.asarray(labels, np.int32)
    if n_train is None:  # a fixed seventh, at least one image, as the test split
        if len(files) < 2:
            raise ValueError(f"image folder {path!r} holds one image: at least two are needed (a training and a test image)")
        order = np.random.default_rng(0).permutation(len(files))
        n_test = max(1, len(files) // 7)
        test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    else:
        train_idx, test_idx = np.arange(n_train), np.arange(n_train, len(files))
    return {"train_images": images[train_idx], "train_labels": labels[train_idx],
            "test_images": images[test_idx], "test_labels": labels[test_idx]}

"""The samples file: what ``experiments.sample`` writes and ``experiments.evaluate --samples`` reads.

``samples.npz`` holds ``samples`` (N, H, W, C) float32 in the run's data scale, ``images`` (the
same mapped to [0, 1] and clipped, for viewing), ``scale`` (the data scale, e.g. ``'[0,1]'``) and
``meta``: a JSON object saying what drew them (the sampler's options and tag, seed, checkpoint
step, EMA or raw params, the run's workdir, and the provenance of the command,
:mod:`ddpm_jax.provenance`), which :func:`read_meta` returns and evaluation reports.
It is written atomically (:func:`ddpm_jax.files.save_npz`): an interrupted write leaves the
previous file as it was.

:func:`load_samples` and :func:`check_samples` refuse, with one line each, every input that
would otherwise give wrong numbers without a word: a file that is not an archive, a damaged
archive, a missing key, integer (0..255) pixels, the wrong shape, NaN/Inf, values in another
scale.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Optional, Sequence, Tuple

import numpy as np

from ddpm_jax import data
from ddpm_jax.files import save_npz

__all__ = ["SamplesError", "save_samples", "load_samples", "read_meta", "check_samples", "OUT_OF_RANGE_LIMIT"]

#: At most this fraction of sample values may lie more than half the data range outside it
#: (for [0, 1]: below -0.5 or above 1.5). A model's samples overshoot the range by a little;
#: images in another scale (0..255, or [-1, 1] for a [0, 1] run) put most values far outside.
OUT_OF_RANGE_LIMIT = 0.01


class SamplesError(ValueError):
    """A samples file or array cannot be evaluated as the run's samples; one line says why."""


def save_samples(path: str, samples: np.ndarray, *, scale: str, labels=None, meta: Optional[dict] = None) -> str:
    """Writes ``samples`` (N, H, W, C) in data scale ``scale`` with their [0, 1] ``images`` (and
    ``labels`` (N,), the class each was drawn for, when given; ``meta``, a JSON-able dict of how
    they were drawn, stored as a JSON string)."""
    samples = np.asarray(samples, np.float32)
    images = np.asarray(data.unscale_images(samples, scale), np.float32)
    extra = {} if labels is None else {"labels": np.asarray(labels, np.int32)}
    if meta is not None:
        extra["meta"] = np.asarray(json.dumps(meta))
    return save_npz(path, samples=samples, images=images, scale=np.asarray(scale), **extra)


def read_meta(path: str) -> Optional[dict]:
    """The ``meta`` dict a samples file records (None for a ``.npy`` array or a file without one).
    Call after :func:`load_samples` has accepted the file. Raises :class:`SamplesError` (one line)
    if the record is unreadable."""
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            return None
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            return None
        try:
            meta = json.loads(str(z["meta"]))
        except (ValueError, OSError) as e:
            raise SamplesError(f"--samples {path}: its 'meta' record is not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SamplesError(f"--samples {path}: its 'meta' record is not a JSON object")
    return meta


def load_samples(path: str) -> Tuple[np.ndarray, Optional[str]]:
    """``(samples, scale)`` from a ``.npz`` with a ``samples`` array (``scale`` None if the file
    does not record one) or from a ``.npy`` array. Raises :class:`SamplesError` or
    ``FileNotFoundError`` with one line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--samples {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        try:
            return np.load(path, allow_pickle=False), None
        except (ValueError, OSError) as e:
            raise SamplesError(f"--samples {path}: cannot read the .npy array ({e})") from None
    if not zipfile.is_zipfile(path):
        if magic.startswith(b"PK\x03\x04"):  # an archive's first entry, but no directory at the end: cut short
            raise SamplesError(f"--samples {path} is a damaged (truncated) archive; draw the samples again")
        raise SamplesError(f"--samples {path} is not a .npz archive (as experiments.sample writes) nor a .npy array")
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise SamplesError(f"--samples {path} is a damaged archive ({e}); draw the samples again") from None
    if damaged is not None:
        raise SamplesError(f"--samples {path} is a damaged archive (member {damaged} fails its checksum); draw the samples again")
    with np.load(path, allow_pickle=False) as z:
        if "samples" not in z.files:
            raise SamplesError(f"--samples {path} has no 'samples' array (it has: {', '.join(z.files) or 'nothing'})")
        try:
            samples = z["samples"]
            scale = str(z["scale"]) if "scale" in z.files else None
        except (ValueError, OSError) as e:
            raise SamplesError(f"--samples {path}: cannot read its arrays ({e})") from None
    return samples, scale


def check_samples(samples: np.ndarray, *, image_shape: Sequence[int], scale: str, file_scale: Optional[str] = None,
                  real_mean: Optional[float] = None, check_range: bool = True, where: str = "samples") -> np.ndarray:
    """Returns ``samples`` as float32 after checking that they can be the run's samples.

    Args:
      samples: the array to check, expected (N, H, W, C) with (H, W, C) = ``image_shape``.
      scale: the run's data scale; ``file_scale``: the scale the file records, if any.
      real_mean: the real data's mean value in ``scale``; with it, samples whose mean is more
        than a quarter of the data range away are refused (images in [0, 1] given to a [-1, 1] run).
      check_range: the two value checks above and :data:`OUT_OF_RANGE_LIMIT` (off: evaluate a
        model whose samples leave the range, as they are). They apply to arrays that do not record
        their scale; a file from ``experiments.sample`` records it, and its values are the model's
        own, in range or not (the report's ``fraction_outside_data_range`` says how far).

    Raises:
      SamplesError: one line naming the first problem.
    """
    x = np.asarray(samples)
    shape = tuple(int(d) for d in image_shape)
    if file_scale is not None and file_scale != scale:
        raise SamplesError(f"{where} were saved in data scale {file_scale}, but the run's data.scale is {scale}")
    if x.dtype.kind in "iub":
        raise SamplesError(f"{where} are {x.dtype} (pixel values 0..255?); give float32 values in the run's data scale {scale}")
    if x.dtype.kind != "f":
        raise SamplesError(f"{where} have dtype {x.dtype}; expected float32 images")
    if x.ndim != 4 or x.shape[1:] != shape:
        hint = ""
        if x.ndim == 3 and x.shape[1:] == shape[:2] and shape[2] == 1:
            hint = " (add the channel axis: x[..., None])"
        elif x.ndim == 4 and x.shape[1:3] == shape[:2]:
            hint = f" ({x.shape[3]} channels where the run's images have {shape[2]})"
        raise SamplesError(f"{where} have shape {x.shape}; the run's images are (N,) + {shape}{hint}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = x.size - int(finite.sum())
        raise SamplesError(f"{where} hold {bad} NaN/Inf values (in {int((~finite).reshape(len(x), -1).any(1).sum())} of "
                           f"{len(x)} images); a diverged model or a broken file")
    if check_range and file_scale is None:  # a file that records the run's scale is in it
        lo, hi = data.data_range(scale)
        half = (hi - lo) / 2
        outside = float(np.mean((x < lo - half) | (x > hi + half)))
        if outside > OUT_OF_RANGE_LIMIT:
            raise SamplesError(
                f"{outside:.0%} of the {where}' values lie outside [{lo - half:g}, {hi + half:g}], the data range {scale} "
                f"widened by half: are they in another scale (e.g. 0..255)? Rescale them to {scale}, or pass "
                "--allow_out_of_range to evaluate them as they are")
        if real_mean is not None and abs(float(x.mean()) - real_mean) > (hi - lo) / 4:
            raise SamplesError(
                f"the {where}' mean value {float(x.mean()):.3f} is far from the real data's {real_mean:.3f} in {scale}: "
                "are they in another scale? Rescale them, or pass --allow_out_of_range to evaluate them as they are")
    return x.astype(np.float32, copy=False)

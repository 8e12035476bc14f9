"""Fréchet distance between feature distributions (FID), in float64 NumPy.

The Fréchet (Wasserstein-2) distance between two Gaussians N(μ1, Σ1) and N(μ2, Σ2) is

    FID = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}),

where μ, Σ are the mean and (ddof = 1) covariance of a feature extractor's outputs on two sets of
images. The value is in squared feature units, so it is only comparable between statistics from
the same extractor (and the same version of it): :func:`fid_from_statistics` refuses anything else.

How the source notebook computes its "pixel FID"
-------------------------------------------------
The notebook's features are the raw pixels: images in [0, 1] (uint8 / 255; generated samples are
fed *unclipped*) flattened to (N, 784) for MNIST, with ``np.cov(rowvar=False)`` covariances and
the matrix square root taken by two symmetric eigendecompositions. :func:`pixel_features` builds
the same features (extractor id ``"pixels"``), so ``fid_from_features(pixel_features(x),
pixel_features(y))`` is on the notebook's scale. Images in [−1, 1] must be mapped back to [0, 1]
first: the distance scales with the square of the pixel scale.

The finite-sample floor matters: FID is a biased estimator, and two disjoint sets of 1,000 *real*
MNIST training images are already ≈ 3.0 apart in pixel space (≈ 1.8 for 1,000 vs the 10,000 test
images; docs/results.md). A model's 1,000-sample FID of ≈ 5 is therefore ≈ 2 above
the floor, not ≈ 5 above a perfect model. Compare FIDs only at equal sample sizes.

Numerics
--------
Σ^{1/2} is computed by ``eigh`` of the symmetrised covariance, with eigenvalues that are negative
only through rounding clipped to 0 (a covariance with a clearly negative eigenvalue is refused).
The trace of the cross term uses the identity

    Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2} = ‖Σ1^{1/2} Σ2^{1/2}‖_*   (sum of singular values),

because A = Σ1^{1/2} Σ2^{1/2} satisfies A Aᵀ = Σ1^{1/2} Σ2 Σ1^{1/2}. Taking singular values of A
instead of square roots of the eigenvalues of A Aᵀ avoids the √ε amplification that rounding gets
on the (many) zero eigenvalues of a rank-deficient covariance (fewer samples than features, or
constant border pixels): the FID of a set with itself is then ≈ d·ε·Tr Σ, not ≈ √ε per null
direction. The traces are those of the clipped (nearest positive semi-definite) covariances, so the
result is ≥ 0 up to float64 rounding; a negative result within 1e-8·(Tr Σ1 + Tr Σ2) of 0 is
rounding and is returned as 0.0 (anything more negative raises, it would be a bug). Where
``scipy.linalg.sqrtm`` is well defined (full-rank, well-conditioned covariances) the two agree to
~1e-12 relative. pytorch-fid's ``calculate_frechet_distance`` (the real part of
``sqrtm(Σ1 Σ2)``, a non-symmetric product whose round-off eigenvalues may be negative or complex)
gives the same value to 1e-6 relative, nearly singular covariances included (tests/test_fid.py);
the Inception FID of :mod:`ddpm_jax.metrics.inception_metrics` is this function on pool3 statistics.

Public API
----------
  frechet_distance(mu1, sigma1, mu2, sigma2) -> float
  feature_statistics(features) -> (mu, sigma)
  fid_from_features(a, b) -> float
  pixel_features(images) -> (N, D) float32            (extractor "pixels", version PIXELS_VERSION)
  compute_statistics(features, extractor_id, extractor_version) -> dict
  save_statistics(path, mu, sigma, n, extractor_id, extractor_version, extra=None) -> path
  load_statistics(path) -> dict(mu, sigma, n, extractor_id, extractor_version)
  fid_from_statistics(s1, s2) -> float                (dicts or paths of saved statistics)
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple, Union

import numpy as np

__all__ = [
    "PIXELS_ID",
    "PIXELS_VERSION",
    "STATS_FORMAT",
    "compute_statistics",
    "feature_statistics",
    "fid_from_features",
    "fid_from_statistics",
    "frechet_distance",
    "load_statistics",
    "pixel_features",
    "save_statistics",
]

PIXELS_ID = "pixels"
"""Extractor id of :func:`pixel_features` (flattened pixels in [0, 1], the notebook's FID)."""
PIXELS_VERSION = "1"

STATS_FORMAT = "ddpm_jax.fid_statistics.v1"
"""Marker stored in every statistics file written by :func:`save_statistics`."""

# A covariance eigenvalue below −_PSD_RTOL·λ_max is an invalid input, not rounding. Generous enough
# for covariances computed (or stored) in float32.
_PSD_RTOL = 1e-5
# A final FID in [−_RESULT_RTOL·(Tr Σ1 + Tr Σ2), 0) is float64 rounding and is returned as 0.
_RESULT_RTOL = 1e-8
_CHUNK = 4096

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------------
# Core
# ----------------------------------------------------------------------------------------------
def _check_mu_sigma(mu, sigma, which: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be a vector of shape (D,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"sigma{which} must have shape (D, D) = ({d}, {d}) to match mu{which} of shape ({d},), "
            f"got {sigma.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{which}/sigma{which} contain NaN or inf")
    scale = np.max(np.abs(sigma)) if sigma.size else 0.0
    if np.max(np.abs(sigma - sigma.T), initial=0.0) > 1e-5 * scale:
        raise ValueError(f"sigma{which} is not symmetric (max |Σ − Σᵀ| > 1e-5·max |Σ|)")
    return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(sigma: np.ndarray, which: str) -> Tuple[np.ndarray, np.ndarray]:
    """(Σ^{1/2}, clipped eigenvalues) of a symmetric PSD matrix via eigh."""
    w, v = np.linalg.eigh(sigma)
    w_max = float(np.max(np.abs(w), initial=0.0))
    if w.size and w[0] < -_PSD_RTOL * w_max:
        raise ValueError(
            f"sigma{which} is not positive semi-definite: smallest eigenvalue {w[0]:.3e} vs largest "
            f"{w_max:.3e} (only negatives within {_PSD_RTOL:g}·max are treated as rounding)"
        )
    w = np.clip(w, 0.0, None)  # negatives here are rounding
    return (v * np.sqrt(w)) @ v.T, w


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2).

        FID = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2})

    computed in float64 as ‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2 − 2 ‖Σ1^{1/2} Σ2^{1/2}‖_* with Σ^{1/2} from
    ``eigh`` (rounding-level negative eigenvalues clipped to 0; see the module docstring).

    Args:
      mu1, mu2: (D,) means.
      sigma1, sigma2: (D, D) symmetric positive semi-definite covariances; rank-deficient is fine.

    Returns:
      A finite, real, non-negative Python float (a result negative only by float64 rounding,
      ≥ −1e-8·(Tr Σ1 + Tr Σ2), is returned as 0.0).

    Raises:
      ValueError: wrong shapes or mismatched dimensions (the message names them), NaN/inf, a
        non-symmetric Σ or one with a clearly negative eigenvalue.
    """
    mu1, sigma1 = _check_mu_sigma(mu1, sigma1, "1")
    mu2, sigma2 = _check_mu_sigma(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimension mismatch: mu1/sigma1 have D = {mu1.shape[0]}, "
            f"mu2/sigma2 have D = {mu2.shape[0]}"
        )
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    if mu1.shape[0] == 0:
        return mean_term
    s1h, w1 = _psd_sqrt(sigma1, "1")
    s2h, w2 = _psd_sqrt(sigma2, "2")
    # Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2} = nuclear norm of Σ1^{1/2} Σ2^{1/2}.
    cross = float(np.sum(np.linalg.svd(s1h @ s2h, compute_uv=False)))
    tr1, tr2 = float(np.sum(w1)), float(np.sum(w2))
    fid = mean_term + (tr1 + tr2 - 2.0 * cross)
    if not np.isfinite(fid):
        raise FloatingPointError(f"FID is not finite ({fid}); overflow in the covariances?")
    if fid < 0.0:
        tol = _RESULT_RTOL * (tr1 + tr2)
        if fid < -tol:  # impossible for PSD inputs beyond rounding
            raise FloatingPointError(
                f"FID {fid:.3e} is negative beyond rounding (tolerance {tol:.3e}); please report"
            )
        fid = 0.0  # rounding
    return float(fid)


def feature_statistics(features, chunk_size: int = _CHUNK) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature matrix, in float64.

    Args:
      features: (N, D) array (any real dtype, may be a memmap), N ≥ 2.
      chunk_size: rows converted to float64 at a time (memory ≈ chunk_size·D·8 bytes + D²·8).

    Returns:
      (mu, sigma): (D,) and (D, D) float64, sigma with ddof = 1 — the same as
      ``features.mean(0), np.cov(features, rowvar=False)`` (two passes: the mean, then the centred
      cross-products; no N×N matrix and no float64 copy of the whole input).

    Raises:
      ValueError: not 2-D, N < 2, or NaN/inf in the features.
    """
    x = features if hasattr(features, "shape") and hasattr(features, "dtype") else np.asarray(features)
    if len(x.shape) != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(x.shape)}")
    n, d = (int(s) for s in x.shape)
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance (ddof=1), got N = {n}")
    chunk_size = max(1, int(chunk_size))
    total = np.zeros(d, np.float64)
    for i in range(0, n, chunk_size):
        total += np.asarray(x[i : i + chunk_size], dtype=np.float64).sum(axis=0)
    mu = total / n
    cross = np.zeros((d, d), np.float64)
    for i in range(0, n, chunk_size):
        xc = np.asarray(x[i : i + chunk_size], dtype=np.float64) - mu
        cross += xc.T @ xc
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(cross))):
        raise ValueError("features contain NaN or inf")
    sigma = cross / (n - 1)
    return mu, 0.5 * (sigma + sigma.T)


def fid_from_features(a, b) -> float:
    """FID between two feature sets: ``frechet_distance(*feature_statistics(a), *feature_statistics(b))``.

    Args:
      a: (N1, D) features; b: (N2, D) features (same extractor, same D; N1 ≠ N2 is allowed).
    """
    a_shape = tuple(np.shape(a))
    b_shape = tuple(np.shape(b))
    if len(a_shape) == 2 and len(b_shape) == 2 and a_shape[1] != b_shape[1]:
        raise ValueError(f"feature dimension mismatch: a has shape {a_shape}, b has shape {b_shape}")
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def pixel_features(images) -> np.ndarray:
    """The notebook's pixel-FID features: images flattened to (N, H·W·C) float32 in [0, 1].

    Integer (uint8) images are divided by 255, as the notebook does; floating-point images are
    taken as already in [0, 1] and are not clipped (the notebook feeds its samples unclipped).
    Map [−1, 1] images to [0, 1] before calling this. Extractor id :data:`PIXELS_ID`, version
    :data:`PIXELS_VERSION`.

    Args:
      images: (N, ...) array, e.g. (N, 28, 28, 1) or (N, 1, 28, 28).
    """
    x = np.asarray(images)
    if x.ndim < 2:
        raise ValueError(f"images must have shape (N, ...), got {x.shape}")
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        x = x.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    else:
        raise TypeError(f"images must be integer or floating point, got dtype {x.dtype}")
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# Cached statistics
# ----------------------------------------------------------------------------------------------
def _check_ident(value, what: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, (str, int, np.integer)) or isinstance(value, bool) or str(value) == "":
        raise ValueError(f"{what} must be a non-empty string (or int), got {value!r}")
    return str(value)


def compute_statistics(features, extractor_id: str, extractor_version) -> dict:
    """Statistics dict (mu, sigma, n, extractor_id, extractor_version) of an (N, D) feature set."""
    mu, sigma = feature_statistics(features)
    return {
        "mu": mu,
        "sigma": sigma,
        "n": int(np.shape(features)[0]),
        "extractor_id": _check_ident(extractor_id, "extractor_id"),
        "extractor_version": _check_ident(extractor_version, "extractor_version"),
    }


def save_statistics(path: PathLike, mu, sigma, n: int, extractor_id: str, extractor_version,
                    extra: Optional[Mapping[str, str]] = None) -> str:
    """Writes FID statistics to an ``.npz`` file (exactly at ``path``; atomically replaced).

    The keys ``mu`` and ``sigma`` are those of pytorch-fid's and TTUR's statistics files, so they
    read it as well.

    Args:
      path: destination file.
      mu: (D,) mean; sigma: (D, D) covariance (stored as float64).
      n: number of feature vectors they were computed from (≥ 2).
      extractor_id: names the feature extractor (e.g. :data:`PIXELS_ID`).
      extractor_version: its version (str or int; stored as str).
      extra: further string entries to store (e.g. ``provenance`` as JSON text); their names must
        not be those above.

    Returns:
      ``path`` as a string.
    """
    mu, sigma = _check_mu_sigma(mu, sigma, "")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 2:
        raise ValueError(f"n must be an integer ≥ 2 (the number of feature vectors), got {n!r}")
    extractor_id = _check_ident(extractor_id, "extractor_id")
    extractor_version = _check_ident(extractor_version, "extractor_version")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_KEYS))
    if clash or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError(f"extra must map new key names to strings (clashing: {clash})")
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.asarray(STATS_FORMAT),
                mu=mu,
                sigma=sigma,
                n=np.asarray(int(n), np.int64),
                extractor_id=np.asarray(extractor_id),
                extractor_version=np.asarray(extractor_version),
                **{k: np.asarray(v) for k, v in extra.items()},
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


_KEYS = ("format", "mu", "sigma", "n", "extractor_id", "extractor_version")


def load_statistics(path: PathLike) -> dict:
    """Reads statistics written by :func:`save_statistics`.

    Returns:
      dict with 'mu' (D,) float64, 'sigma' (D, D) float64, 'n' int, 'extractor_id' str,
      'extractor_version' str.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: not a statistics file, truncated/corrupt, missing keys or inconsistent shapes
        (the message names the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file {path!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)}")
            data = {k: z[k] for k in _KEYS}
    except Exception as e:  # noqa: BLE001 - any failure to parse is a corrupt file
        raise ValueError(
            f"FID statistics file {path!r} is corrupt or not a statistics file: {type(e).__name__}: {e}"
        ) from None
    try:
        fmt = str(data["format"].item())
        if fmt != STATS_FORMAT:
            raise ValueError(f"format {fmt!r}, expected {STATS_FORMAT!r}")
        mu, sigma = _check_mu_sigma(data["mu"], data["sigma"], "")
        n = int(data["n"].item())
        if n < 2:
            raise ValueError(f"n = {n} < 2")
        extractor_id = _check_ident(data["extractor_id"], "extractor_id")
        extractor_version = _check_ident(data["extractor_version"], "extractor_version")
    except ValueError as e:
        raise ValueError(f"FID statistics file {path!r} is invalid: {e}") from None
    return {"mu": mu, "sigma": sigma, "n": n, "extractor_id": extractor_id, "extractor_version": extractor_version}


def _as_stats(s, which: str) -> dict:
    if isinstance(s, (str, os.PathLike)):
        return load_statistics(s)
    if not isinstance(s, Mapping):
        raise TypeError(f"statistics {which} must be a dict or a path, got {type(s).__name__}")
    missing = [k for k in ("mu", "sigma", "extractor_id", "extractor_version") if k not in s]
    if missing:
        raise ValueError(f"statistics {which} lack key(s) {', '.join(missing)}")
    return dict(s)


def fid_from_statistics(s1, s2) -> float:
    """FID between two statistics dicts (or paths of files from :func:`save_statistics`).

    Refuses (ValueError) statistics from different extractors, different extractor versions or
    of different feature dimension: such distances are in different units and meaningless.
    """
    s1, s2 = _as_stats(s1, "1"), _as_stats(s2, "2")
    id1 = _check_ident(s1["extractor_id"], "extractor_id")
    id2 = _check_ident(s2["extractor_id"], "extractor_id")
    v1 = _check_ident(s1["extractor_version"], "extractor_version")
    v2 = _check_ident(s2["extractor_version"], "extractor_version")
    d1, d2 = int(np.shape(s1["mu"])[0]), int(np.shape(s2["mu"])[0])
    if (id1, v1) != (id2, v2) or d1 != d2:
        what = "feature extractors" if (id1, v1) != (id2, v2) else "feature dimensions"
        raise ValueError(
            f"refusing to compare FID statistics from different {what}: "
            f"{id1!r} version {v1!r} (D={d1}) vs {id2!r} version {v2!r} (D={d2})"
        )
    return frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])

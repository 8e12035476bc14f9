"""The sample metrics papers report, on the FID Inception-v3's outputs (:mod:`ddpm_jax.metrics.inception`):
Inception FID, Inception Score, KID, precision and recall; and FID statistics files in pytorch-fid's
``.npz`` layout.

Definitions (G: N generated images, R: real images; f = pool3 features (2048-d), ℓ = unbiased logits):

- **FID** (Heusel et al. 2017): ``frechet_distance(μ_G, Σ_G, μ_R, Σ_R)`` of the pool3 features'
  mean and (ddof = 1) covariance, in float64, by the symmetric form of
  :func:`ddpm_jax.metrics.fid.frechet_distance` (no complex ``sqrtm``). A full-rank 2048 × 2048
  covariance needs N > 2048 images (:data:`MIN_IMAGES_FOR_FID`); fewer are refused, since such an
  FID is dominated by its finite-sample bias and is not comparable with the field's (50,000 vs
  the training set).
- **Inception Score** (Salimans et al. 2016), torch-fidelity's ``isc_features_to_metric``: the
  rows of ℓ = pool3 · W (the 1008-way head *without* its bias, torch-fidelity's
  ``logits_unbiased``, as the improved-GAN TensorFlow code reads the graph) are permuted with
  ``np.random.RandomState(2020)``, cut into 10 splits [i·N/10, (i+1)·N/10), and each split scores
  exp(mean_x KL(p(y|x) ‖ p(y))) with p(y) the split's mean softmax; the result is the mean and the
  (ddof = 0) standard deviation over splits. float64.
- **KID** (Bińkowski et al. 2018), torch-fidelity's ``kid_features_to_metric``: 100 subsets of
  1,000 rows drawn without replacement from each set (``np.random.RandomState(2020).choice``, G
  then R per subset), the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, and the MMD² estimate
  [Σ_{i≠j} k(g_i, g_j) + Σ_{i≠j} k(r_i, r_j)] / (m(m−1)) − 2 Σ_{i,j} k(g_i, r_j) / m² per subset;
  mean and (ddof = 0) standard deviation over subsets. The subset size is capped at min(N_G, N_R)
  (torch-fidelity refuses sets smaller than it instead). float64 (torch-fidelity computes in its
  features' dtype, float32 by default, which moves KID ≈ 1e-3 by cancellation at this size).
- **Precision and recall** (Kynkäänniemi et al. 2019), torch-fidelity's ``prc_features_to_metric``
  with k = 3: each sample's radius is the distance to its k-th nearest neighbour in its own set;
  precision is the fraction of generated samples inside some real sample's ball, recall the
  fraction of real samples inside some generated sample's ball (``dist ≤ radius``). Here on the
  Inception pool3 features, as torch-fidelity does; **the original paper uses VGG-16 features**,
  so these numbers are not that paper's. Distances in float32 on the accelerator, chunked (memory
  O(chunk · N)).

Statistics files are pytorch-fid's layout (``mu`` (2048,), ``sigma`` (2048, 2048)) plus the keys
of :func:`ddpm_jax.metrics.fid.save_statistics` (``format``, ``n``, ``extractor_id`` =
'inception_v3_fid', ``extractor_version`` = the weights' SHA-256): pytorch-fid and TTUR read
them, and :func:`load_statistics` reads theirs (a file with only ``mu`` and ``sigma`` is taken as
pytorch-fid's extractor with its published weights). Statistics of different extractors, weights
or dimensions are never compared (:func:`ddpm_jax.metrics.fid.fid_from_statistics` refuses).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional

import numpy as np

from ddpm_jax.metrics import fid

__all__ = [
    "MIN_IMAGES_FOR_FID", "PR_FEATURES_NOTE", "check_fid_size", "check_reference", "evaluate_images", "format_line",
    "inception_score", "kernel_inception_distance", "load_statistics", "precision_recall", "sample_metrics",
    "save_statistics", "statistics_from_features",
]

MIN_IMAGES_FOR_FID = 2049
"""N > 2048: the fewest images whose 2048-d pool3 covariance can have full rank."""

PR_FEATURES_NOTE = "Inception-v3 pool3 features (torch-fidelity's choice); Kynkäänniemi et al. use VGG-16 features"


def check_fid_size(n: int, what: str = "images", hint: str = "") -> None:
    """Raises ValueError unless n > 2048 (a full-rank pool3 covariance); ``hint`` ends the message."""
    if int(n) < MIN_IMAGES_FOR_FID:
        raise ValueError(f"Inception FID needs N > 2048 {what} for a full-rank 2048 x 2048 covariance (the field "
                         f"reports N = 50,000), got N = {int(n)}{'; ' + hint if hint else ''}")


# ------------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))


def inception_score(logits, splits: int = 10, *, shuffle: bool = True, seed: int = 2020) -> Dict[str, float]:
    """Inception Score of (N, C) logits (``logits_unbiased``), torch-fidelity's definition.

        IS_s = exp( (1/|s|) Σ_{x∈s} Σ_y p(y|x) [log p(y|x) − log p_s(y)] ),  p_s(y) = mean_{x∈s} p(y|x)

    over ``splits`` consecutive splits s of the rows (permuted with ``RandomState(seed)`` first
    when ``shuffle``). Returns {'mean', 'std' (ddof 0), 'splits'}.
    """
    x = np.asarray(logits, np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"logits must have shape (N, C) with N >= 1, got {x.shape}")
    n = x.shape[0]
    if isinstance(splits, bool) or int(splits) < 1 or int(splits) > n:
        raise ValueError(f"splits must be in 1..N = {n}, got {splits!r}")
    if not np.all(np.isfinite(x)):
        raise ValueError("logits contain NaN or inf")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    log_p = _log_softmax(x)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_s, log_p_s = p[lo:hi], log_p[lo:hi]
        log_q = np.log(p_s.mean(axis=0, keepdims=True))
        scores.append(float(np.exp((p_s * (log_p_s - log_q)).sum(axis=1).mean())))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "splits": int(splits)}


# ------------------------------------------------------------------------------------------------
# KID
# ------------------------------------------------------------------------------------------------


def _poly_kernel(x, y, degree, gamma, coef0):
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(k_xx, k_xy, k_yy) -> float:
    m = k_xx.shape[0]
    kt_xx = k_xx.sum() - np.trace(k_xx)
    kt_yy = k_yy.sum() - np.trace(k_yy)
    return float((kt_xx + kt_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features_gen, features_real, *, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: Optional[float] = None, coef0: float = 1.0,
                              seed: int = 2020) -> Dict[str, Any]:
    """KID between two (N, d) feature sets, torch-fidelity's definition (module docstring).

    Args:
      features_gen, features_real: (N_G, d), (N_R, d).
      subsets, subset_size: torch-fidelity's 100 and 1,000; the size is capped at min(N_G, N_R).
      degree, gamma, coef0: the kernel (x·y·gamma + coef0)^degree, gamma = 1/d when None.
      seed: ``np.random.RandomState(seed)`` draws the subsets (gen, then real, per subset).

    Returns:
      {'mean', 'std' (ddof 0), 'subsets', 'subset_size'} (subset_size as used).
    """
    g = np.asarray(features_gen, np.float64)
    r = np.asarray(features_real, np.float64)
    if g.ndim != 2 or r.ndim != 2 or g.shape[1] != r.shape[1]:
        raise ValueError(f"KID needs (N, d) feature sets of one d, got {g.shape} and {r.shape}")
    m = min(int(subset_size), g.shape[0], r.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {g.shape[0]} and {r.shape[0]}")
    if isinstance(subsets, bool) or int(subsets) < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets!r}")
    gamma = 1.0 / g.shape[1] if gamma is None else float(gamma)
    rng = np.random.RandomState(seed)
    mmds = np.zeros(int(subsets))
    for i in range(int(subsets)):
        a = g[rng.choice(g.shape[0], m, replace=False)]
        b = r[rng.choice(r.shape[0], m, replace=False)]
        mmds[i] = _mmd2_unbiased(_poly_kernel(a, a, degree, gamma, coef0), _poly_kernel(a, b, degree, gamma, coef0),
                                 _poly_kernel(b, b, degree, gamma, coef0))
    return {"mean": float(mmds.mean()), "std": float(mmds.std()), "subsets": int(subsets), "subset_size": int(m)}


# ------------------------------------------------------------------------------------------------
# Precision and recall
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _pr_kernels():
    """(kth, inside), jitted once per process: squared k-NN radii of a chunk of rows, and whether
    each row of a chunk lies in some ball of the other set."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    hi = jax.lax.Precision.HIGHEST

    def sqdist(a, b, b_sq):
        d2 = jnp.sum(a * a, axis=1)[:, None] + b_sq[None, :] - 2.0 * jnp.dot(a, b.T, precision=hi)
        return jnp.maximum(d2, 0.0)

    @functools.partial(jax.jit, static_argnames="kk")
    def kth(a, b, b_sq, kk):  # kk = k + 1: the sample itself is its own nearest neighbour
        return -jax.lax.top_k(-sqdist(a, b, b_sq), kk)[0][:, -1]

    @jax.jit
    def inside(a, b, b_sq, r2_b):
        return jnp.any(sqdist(a, b, b_sq) <= r2_b[None, :], axis=1)

    return kth, inside


def precision_recall(features_gen, features_real, *, k: int = 3, chunk: int = 1024) -> Dict[str, Any]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii, torch-fidelity's
    ``prc_features_to_metric``: r(x) = distance from x to its k-th nearest neighbour in its own set;

        precision = mean_{g∈G} 1[∃ r∈R: ‖g − r‖ ≤ r(r)],  recall = mean_{r∈R} 1[∃ g∈G: ‖r − g‖ ≤ r(g)].

    On the Inception features these are not the paper's numbers (it uses VGG-16; see
    :data:`PR_FEATURES_NOTE`). Squared distances ‖a‖² + ‖b‖² − 2a·b in float32 (full-precision
    products), ``chunk`` rows at a time.

    Returns {'precision', 'recall', 'f_score', 'k', 'features'}.
    """
    import jax.numpy as jnp  # noqa: PLC0415

    g = np.asarray(features_gen, np.float32)
    r = np.asarray(features_real, np.float32)
    if g.ndim != 2 or r.ndim != 2 or g.shape[1] != r.shape[1]:
        raise ValueError(f"precision/recall need (N, d) feature sets of one d, got {g.shape} and {r.shape}")
    if isinstance(k, bool) or int(k) < 1 or min(g.shape[0], r.shape[0]) < int(k) + 1:
        raise ValueError(f"precision/recall with k = {k} need more than k samples per set, got {g.shape[0]} and {r.shape[0]}")
    kth, inside = _pr_kernels()
    kk = int(k) + 1
    c = max(1, min(int(chunk), max(g.shape[0], r.shape[0])))
    gd, rd = jnp.asarray(g), jnp.asarray(r)
    g_sq, r_sq = jnp.sum(gd * gd, axis=1), jnp.sum(rd * rd, axis=1)

    def rows(a, fn):
        out = []
        for s in range(0, a.shape[0], c):
            block = a[s:s + c]
            m = block.shape[0]
            if m < c:  # one compiled shape per call: pad the last chunk
                block = np.concatenate([block, np.zeros((c - m, a.shape[1]), a.dtype)])
            out.append(np.asarray(fn(jnp.asarray(block)))[:m])
        return np.concatenate(out)

    r2_g = rows(g, lambda a: kth(a, gd, g_sq, kk))
    r2_r = rows(r, lambda a: kth(a, rd, r_sq, kk))
    precision = float(np.mean(rows(g, lambda a: inside(a, rd, r_sq, jnp.asarray(r2_r)))))
    recall = float(np.mean(rows(r, lambda a: inside(a, gd, g_sq, jnp.asarray(r2_g)))))
    f = 2 * precision * recall / max(1e-5, precision + recall)
    return {"precision": precision, "recall": recall, "f_score": f, "k": int(k), "features": PR_FEATURES_NOTE}


# ------------------------------------------------------------------------------------------------
# Statistics files
# ------------------------------------------------------------------------------------------------


def statistics_from_features(features, weights_sha256: str, *, allow_small_n: bool = False) -> Dict[str, Any]:
    """FID statistics dict of (N, 2048) pool3 features (mu, sigma float64, n, extractor id and
    version = the weights' SHA-256). Refuses N ≤ 2048 unless ``allow_small_n``."""
    n = int(np.shape(features)[0])
    if not allow_small_n:
        check_fid_size(n)
    from ddpm_jax.metrics import inception  # noqa: PLC0415

    return fid.compute_statistics(features, inception.EXTRACTOR_ID, weights_sha256)


def save_statistics(path, stats: Dict[str, Any], extra: Optional[Dict[str, str]] = None) -> str:
    """Writes a statistics dict (:func:`statistics_from_features`) as an ``.npz`` that pytorch-fid
    and TTUR read (``mu``, ``sigma``) with this project's extra keys (and ``extra`` strings, e.g.
    ``provenance``); atomically."""
    return fid.save_statistics(path, stats["mu"], stats["sigma"], stats["n"], stats["extractor_id"],
                               stats["extractor_version"], extra=extra)


def load_statistics(path) -> Dict[str, Any]:
    """Reads FID statistics: a file of :func:`save_statistics` (any extractor), or pytorch-fid's /
    TTUR's layout (only ``mu`` and ``sigma``), which is taken as pytorch-fid's FID Inception with
    its published weights (``n`` None).

    Raises:
      FileNotFoundError: no file. ValueError: not an ``.npz`` with ``mu`` and ``sigma`` of shapes
        (D,) and (D, D), or invalid values (the message names the file).
    """
    from ddpm_jax.metrics import inception  # noqa: PLC0415

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "format" not in keys:
                if not {"mu", "sigma"} <= keys:
                    raise ValueError(f"keys {sorted(keys)}; expected 'mu' and 'sigma'")
                mu, sigma = z["mu"], z["sigma"]
    except Exception as e:  # noqa: BLE001  (np.load raises many types on a foreign file)
        raise ValueError(f"statistics file {path} is not an .npz of FID statistics ({type(e).__name__}: {e})") from None
    if "format" in keys:  # this project's file: fid.load_statistics reads and checks it
        return fid.load_statistics(path)
    try:
        mu, sigma = fid._check_mu_sigma(mu, sigma, "")  # noqa: SLF001  (the same validation as fid's files)
    except ValueError as e:
        raise ValueError(f"statistics file {path} is invalid: {e}") from None
    return {"mu": mu, "sigma": sigma, "n": None, "extractor_id": inception.EXTRACTOR_ID,
            "extractor_version": inception.FID_WEIGHTS_SHA256}


# ------------------------------------------------------------------------------------------------
# All four, as experiments.evaluate reports them
# ------------------------------------------------------------------------------------------------


def sample_metrics(gen: Dict[str, np.ndarray], weights_sha256: str, *, reference: Optional[Dict[str, Any]] = None,
                   real: Optional[np.ndarray] = None, floor: Optional[Dict[str, np.ndarray]] = None,
                   allow_small_n: bool = False) -> Dict[str, Any]:
    """FID, IS, KID and precision/recall of generated images' Inception outputs.

    Args:
      gen: {'pool3': (N, 2048), 'logits_unbiased': (N, 1008)} of the generated images
        (:func:`ddpm_jax.metrics.inception.extract`).
      weights_sha256: the weights' SHA-256 (the extractor version).
      reference: statistics (:func:`load_statistics`); FID 'vs_reference' when given.
      real: (M, 2048) pool3 features of real images: FID 'vs_real' (when no reference is given),
        and the reference set of KID and precision/recall.
      floor: {'a': (N, 2048), 'b': (N, 2048)} features of two independent real sets of the same N:
        their FID, KID and precision/recall are what real images score ('floor').
      allow_small_n: compute the FIDs with N ≤ 2048 (tests); refused otherwise.

    Returns a JSON-ready dict.
    """
    n = int(gen["pool3"].shape[0])
    if not allow_small_n:
        check_fid_size(n, "samples")
    from ddpm_jax.metrics import inception  # noqa: PLC0415

    g_stats = fid.compute_statistics(gen["pool3"], inception.EXTRACTOR_ID, weights_sha256)
    out: Dict[str, Any] = {"num_samples": n, "extractor": inception.EXTRACTOR_ID, "weights_sha256": weights_sha256,
                           "fid": {}}
    if reference is not None:
        out["fid"]["vs_reference"] = fid.fid_from_statistics(g_stats, reference)
        if reference.get("n") is not None:
            out["reference_n"] = int(reference["n"])
    if real is not None and reference is None:
        out["fid"]["vs_real"] = fid.fid_from_statistics(
            g_stats, fid.compute_statistics(real, inception.EXTRACTOR_ID, weights_sha256))
    out["inception_score"] = inception_score(gen["logits_unbiased"], splits=min(10, n))
    if real is not None:
        out["num_real"] = int(real.shape[0])
        out["kid"] = kernel_inception_distance(gen["pool3"], real)
        out["precision_recall"] = precision_recall(gen["pool3"], real)
    if floor is not None:
        a, b = floor["a"], floor["b"]
        fl = {"n": int(a.shape[0]), "fid_real_vs_real": fid.fid_from_features(a, b),
              "kid_real_vs_real": kernel_inception_distance(a, b)["mean"]}
        if reference is not None:
            fl["fid_real_vs_reference"] = fid.fid_from_statistics(
                fid.compute_statistics(a, inception.EXTRACTOR_ID, weights_sha256), reference)
        pr = precision_recall(a, b)
        fl["precision_real_vs_real"], fl["recall_real_vs_real"] = pr["precision"], pr["recall"]
        out["floor"] = fl
    return out


def check_reference(reference: Dict[str, Any], weights_sha256: str) -> None:
    """Raises ValueError unless ``reference`` statistics are pool3 statistics of these weights
    (extractor, weights' SHA-256 and dimension 2048): checked before any image is processed."""
    from ddpm_jax.metrics import inception  # noqa: PLC0415

    d = int(np.shape(reference["mu"])[0])
    if d != inception.FEATURE_DIM:
        raise ValueError(f"refusing to compare FID statistics of different feature dimensions: the reference has "
                         f"D = {d}, pool3 features D = {inception.FEATURE_DIM}")
    if reference["extractor_id"] != inception.EXTRACTOR_ID or reference["extractor_version"] != weights_sha256:
        raise ValueError(f"refusing to compare FID statistics from different feature extractors: the reference holds "
                         f"{reference['extractor_id']!r} version {str(reference['extractor_version'])[:16]!r}, the "
                         f"samples get {inception.EXTRACTOR_ID!r} version {weights_sha256[:16]!r}")


def evaluate_images(gen, weights, *, real=None, held_out=None, reference: Optional[Dict[str, Any]] = None,
                    seed: int = 0, batch_size: int = 200, progress: bool = False,
                    allow_small_n: bool = False) -> Dict[str, Any]:
    """:func:`sample_metrics` of generated images against real ones, from the images.

    Args:
      gen: (N, H, W, C) generated images in [0, 1].
      weights: :class:`ddpm_jax.metrics.inception.InceptionWeights`.
      real: real images in [0, 1] (the training set: the field's reference); min(N, M) of them,
        drawn at random with ``seed``, are KID's and precision/recall's reference set, and FID's
        when ``reference`` is None.
      held_out: other real images, disjoint from ``real`` (experiments.evaluate: the validation
        split); when it holds ≥ N, N of them against N of ``real`` (and against ``reference``)
        give the real-vs-real floor at this N.
      reference: statistics (:func:`load_statistics`), checked against the weights first.

    Returns the dict of :func:`sample_metrics`.
    """
    from ddpm_jax.metrics import inception  # noqa: PLC0415

    n = int(np.shape(gen)[0])
    if not allow_small_n:
        check_fid_size(n, "samples")
    if reference is not None:
        check_reference(reference, weights.sha256)
    if reference is None and real is None:
        raise ValueError("Inception metrics need real images or reference statistics")
    rng = np.random.default_rng([seed, 37])

    def pick(x, m):
        return x[np.sort(rng.choice(x.shape[0], m, replace=False))]

    real_n = None if real is None else pick(real, min(n, real.shape[0]))
    test_n = None if held_out is None or held_out.shape[0] < n or real_n is None or real_n.shape[0] < n else pick(held_out, n)
    kw = dict(batch_size=batch_size, progress=progress)
    g = inception.extract(gen, weights, outputs=("pool3", "logits_unbiased"), desc="Inception: samples", **kw)
    r = None if real_n is None else inception.extract(real_n, weights, outputs=("pool3",), desc="Inception: real", **kw)["pool3"]
    floor = None
    if test_n is not None:
        floor = {"a": inception.extract(test_n, weights, outputs=("pool3",), desc="Inception: held-out", **kw)["pool3"],
                 "b": r}
    return sample_metrics(g, weights.sha256, reference=reference, real=r, floor=floor, allow_small_n=allow_small_n)


def format_line(report: Dict[str, Any]) -> str:
    """One line of :func:`sample_metrics`' numbers for a console table."""
    parts = [f"{k} {v:.3f}" for k, v in report["fid"].items()]
    s = report["inception_score"]
    parts.append(f"IS {s['mean']:.3f} ± {s['std']:.3f}")
    if "kid" in report:
        parts.append(f"KID {report['kid']['mean']:.5f} ± {report['kid']['std']:.5f}")
    if "precision_recall" in report:
        pr = report["precision_recall"]
        parts.append(f"precision {pr['precision']:.4f} recall {pr['recall']:.4f} (Inception features)")
    if "floor" in report:
        fl = report["floor"]
        parts.append("floor: real-vs-real FID " + f"{fl['fid_real_vs_real']:.3f}"
                     + (f", vs reference {fl['fid_real_vs_reference']:.3f}" if "fid_real_vs_reference" in fl else ""))
    return f"{'Inception (pytorch-fid)':30s}" + "  ".join(parts)

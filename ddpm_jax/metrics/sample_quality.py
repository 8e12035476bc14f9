r"""The lecture's sample-quality table, vectorised, and trajectory metrics.

The source lecture reports, for ε-prediction + DDPM sampling on MNIST: NN-MSE 0.193, div/real
1.013, meanGap 0.0194, stdGap 0.0262, centroid coverage 7/10, entropy 0.819. Its exact
definitions are not available; this module implements the definitions below, so numbers computed
here are comparable with each other, and only approximately with the lecture's.

Notation: images are ``(N, H, W, C)`` floats in [0, 1] (any ``(N, ...)`` works); d = H·W·C; for
two images a, b, MSE(a, b) = ‖a − b‖² / d. Generated images are x_1..x_N, real ones y_1..y_M.

* ``nearest_real_mse``  NN-MSE = (1/N) Σ_i min_j MSE(x_i, y_j)   (fidelity; 0 = memorised copies)
* ``diversity_mse``     div(x) = 1/(N(N−1)) Σ_{i≠j} MSE(x_i, x_j)
                                = 2N/(N−1) · (mean_i ‖x_i‖² − ‖x̄‖²) / d
                                = (2/d) Σ_p var̂_p(x)   (var̂: unbiased per-pixel variance)
* ``div_real_ratio``    div/real = div(gen) / div(real)          (1 = as diverse as the data)
* ``mean_gap``          (1/d) Σ_p |mean_i x_{i,p} − mean_j y_{j,p}|
* ``std_gap``           (1/d) Σ_p |std_i x_{i,p} − std_j y_{j,p}|   (population std, ddof = 0)
* ``class_centroids``   c_k = mean of the real images with label k, k = 0..K−1
* ``centroid_assignments``  a_i = argmin_k MSE(x_i, c_k)
* ``coverage_and_entropy``  with n_k = #{i : a_i = k} and p_k = n_k / N:
      coverage = #{k : p_k ≥ f}, f = ``min_fraction``, default 1/(2K) — half the uniform share,
      so a class counts as covered when it gets at least half the samples it would get if the
      sampler covered the classes evenly (with K = 10: ≥ 5 % of the samples);
      entropy  = −Σ_k p_k log p_k / log K   (0 log 0 = 0; 1 = uniform, 0 = one class).
  The same two numbers from a classifier's predicted labels (``clf_coverage``, ``clf_entropy``)
  take the labels as input, so this module does not depend on the classifier.
* ``trajectory_metrics``  over a sampler trajectory (``sampling.sample(..., return_trajectory=True)``,
  'x' (S+1, B, ...) with x_T first, 'x0' and 'eps' (S, B, ...)), with Δa_s = a_{s+1} − a_s:
      M_eps = mean_{s<S−1, b, p} (Δε̂_s)²,  M_dx = mean_{s<S, b, p} (Δx_s)²,  M_x0 = mean_{s<S−1, b, p} (Δx̂0_s)²
  i.e. how much each quantity moves per step. A coherent sampler's ε̂ changes little from step to
  step (small M_eps); a sampler that re-draws its noise each step has large ones.

``nearest_real_mse`` is blocked: the squared distances of a block of generated images to a block
of real ones come from ‖x‖² + ‖y‖² − 2 x·y (one matmul, HIGHEST precision, jitted, one compile),
so 10,000 × 60,000 at d = 784 runs in bounded memory (``gen_block`` × ``real_block`` floats);
the nearest image found that way is then re-scored exactly as mean((x − y)²), so an image that is
in the real set scores exactly 0. Moments are accumulated in float64 in chunks.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "centroid_assignments",
    "class_centroids",
    "class_histogram",
    "coverage_and_entropy",
    "div_real_ratio",
    "diversity_mse",
    "mean_gap",
    "nearest_real",
    "nearest_real_mse",
    "pixel_moments",
    "sample_quality_table",
    "std_gap",
    "trajectory_metrics",
]

_CHUNK = 8192  # rows per float64 accumulation chunk


def _flat(x, where: str, min_rows: int = 1) -> np.ndarray:
    """(N, ...) float images → (N, d) array (a view when possible); refuses integer pixels."""
    a = x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{where}: expects float images in [0, 1], got dtype {a.dtype} (scale uint8 pixels first)")
    if a.ndim < 2:
        raise ValueError(f"{where}: expects (N, ...) images, got shape {tuple(a.shape)}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{where}: needs at least {min_rows} image(s), got {a.shape[0]}")
    return a.reshape(a.shape[0], -1)


# ------------------------------------------------------------------------------------------------
# Nearest neighbours (blocked)
# ------------------------------------------------------------------------------------------------


@jax.jit
def _block_argmin(gb, real_blocks, real_sq):
    """Index of the nearest real row for each row of ``gb`` (B, d); real_blocks (K, R, d), real_sq (K, R)."""
    g_sq = jnp.sum(jnp.square(gb), axis=1)
    R = real_blocks.shape[1]

    def body(carry, inp):
        best_d, best_i = carry
        rb, r_sq, k = inp
        cross = jnp.dot(gb, rb.T, precision=jax.lax.Precision.HIGHEST)
        d2 = jnp.maximum(g_sq[:, None] + r_sq[None, :] - 2.0 * cross, 0.0)
        j = jnp.argmin(d2, axis=1)
        dj = jnp.take_along_axis(d2, j[:, None], axis=1)[:, 0]
        better = dj < best_d  # ties keep the earlier (lower-index) real image
        return (jnp.where(better, dj, best_d), jnp.where(better, k * R + j, best_i)), None

    init = (jnp.full(gb.shape[:1], jnp.inf, gb.dtype), jnp.zeros(gb.shape[:1], jnp.int32))
    ks = jnp.arange(real_blocks.shape[0], dtype=jnp.int32)
    (_, best_i), _ = jax.lax.scan(body, init, (real_blocks, real_sq, ks))
    return best_i


@jax.jit
def _exact_mse(gb, real, idx):
    return jnp.mean(jnp.square(gb - real[idx]), axis=1)


def nearest_real(gen, real, *, gen_block: int = 1000, real_block: int = 5000) -> Tuple[np.ndarray, np.ndarray]:
    """For each generated image, its nearest real image in MSE.

    Returns:
      ``(mse, index)``: ``(N,)`` float MSE(x_i, y_{index_i}) = min_j MSE(x_i, y_j) (recomputed
      exactly from the difference), and ``(N,)`` int32 indices into ``real``.
    """
    g = jnp.asarray(_flat(gen, "nearest_real(gen)"))
    r = jnp.asarray(_flat(real, "nearest_real(real)"))
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"nearest_real: gen has {g.shape[1]} values per image, real has {r.shape[1]}")
    if gen_block < 1 or real_block < 1:
        raise ValueError(f"nearest_real: gen_block={gen_block} and real_block={real_block} must be >= 1")
    dtype = jnp.result_type(g.dtype, r.dtype)
    g, r = g.astype(dtype), r.astype(dtype)
    n, m, d = g.shape[0], r.shape[0], g.shape[1]
    rb = min(real_block, m)
    k = -(-m // rb)
    r_pad = jnp.pad(r, ((0, k * rb - m), (0, 0)))
    r_sq = jnp.where(jnp.arange(k * rb) < m, jnp.sum(jnp.square(r_pad), axis=1), jnp.inf)  # padding never wins
    r_blocks, r_sq = r_pad.reshape(k, rb, d), r_sq.reshape(k, rb)
    gb_size = min(gen_block, n)
    mses, idxs = [], []
    for start in range(0, n, gb_size):  # every block has shape (gb_size, d): one compile
        gb = g[start : start + gb_size]
        valid = gb.shape[0]
        if valid < gb_size:
            gb = jnp.pad(gb, ((0, gb_size - valid), (0, 0)))
        idx = _block_argmin(gb, r_blocks, r_sq)
        mse = _exact_mse(gb, r, idx)
        mses.append(np.asarray(mse)[:valid])
        idxs.append(np.asarray(idx)[:valid])
    return np.concatenate(mses), np.concatenate(idxs).astype(np.int32)


def nearest_real_mse(gen, real, *, gen_block: int = 1000, real_block: int = 5000) -> float:
    """NN-MSE = (1/N) Σ_i min_j MSE(x_i, y_j) (see the module docstring); blocked, bounded memory."""
    mse, _ = nearest_real(gen, real, gen_block=gen_block, real_block=real_block)
    return float(np.mean(mse, dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# Moments, diversity, gaps
# ------------------------------------------------------------------------------------------------


def pixel_moments(x) -> Tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and population variance (ddof 0), float64, two chunked passes: ``(d,)`` each."""
    a = _flat(x, "pixel_moments")
    n = a.shape[0]
    s = np.zeros(a.shape[1], np.float64)
    for i in range(0, n, _CHUNK):
        s += np.sum(np.asarray(a[i : i + _CHUNK], np.float64), axis=0)
    mean = s / n
    ss = np.zeros_like(s)
    for i in range(0, n, _CHUNK):
        ss += np.sum(np.square(np.asarray(a[i : i + _CHUNK], np.float64) - mean), axis=0)
    return mean, ss / n


def diversity_mse(x, num_pairs: Optional[int] = None, key=None) -> float:
    """Mean MSE over distinct pairs: div(x) = 1/(N(N−1)) Σ_{i≠j} MSE(x_i, x_j).

    Exact by default, in O(N·d) via mean_{i≠j} ‖x_i − x_j‖² = 2N/(N−1) · (mean_i ‖x_i‖² − ‖x̄‖²).
    With ``num_pairs``, a Monte-Carlo estimate over that many uniformly drawn pairs i ≠ j
    (``key`` required).
    """
    a = _flat(x, "diversity_mse", min_rows=2)
    n = a.shape[0]
    if num_pairs is None:
        _, var = pixel_moments(a)
        return float(2.0 * n / (n - 1) * np.mean(var))
    if key is None:
        raise ValueError("diversity_mse: num_pairs needs a jax.random key")
    if num_pairs < 1:
        raise ValueError(f"diversity_mse: num_pairs must be >= 1, got {num_pairs}")
    ki, kj = jax.random.split(key)
    i = jax.random.randint(ki, (num_pairs,), 0, n)
    j = (i + jax.random.randint(kj, (num_pairs,), 1, n)) % n  # uniform over j ≠ i
    a = jnp.asarray(a)
    total = 0.0
    for s in range(0, num_pairs, _CHUNK):
        ii, jj = i[s : s + _CHUNK], j[s : s + _CHUNK]
        total += float(jnp.sum(jnp.mean(jnp.square(a[ii] - a[jj]), axis=1)))
    return total / num_pairs


def div_real_ratio(gen, real) -> float:
    """div/real = diversity_mse(gen) / diversity_mse(real)."""
    return diversity_mse(gen) / diversity_mse(real)


def _check_same_d(g, r, where):
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"{where}: gen has {g.shape[1]} values per image, real has {r.shape[1]}")


def mean_gap(gen, real) -> float:
    """(1/d) Σ_p |mean_gen(p) − mean_real(p)|."""
    g, r = _flat(gen, "mean_gap(gen)"), _flat(real, "mean_gap(real)")
    _check_same_d(g, r, "mean_gap")
    return float(np.mean(np.abs(pixel_moments(g)[0] - pixel_moments(r)[0])))


def std_gap(gen, real) -> float:
    """(1/d) Σ_p |std_gen(p) − std_real(p)| with population standard deviations (ddof 0)."""
    g, r = _flat(gen, "std_gap(gen)"), _flat(real, "std_gap(real)")
    _check_same_d(g, r, "std_gap")
    return float(np.mean(np.abs(np.sqrt(pixel_moments(g)[1]) - np.sqrt(pixel_moments(r)[1]))))


# ------------------------------------------------------------------------------------------------
# Class centroids, coverage, entropy
# ------------------------------------------------------------------------------------------------


def _check_labels(labels, n, num_classes, where) -> np.ndarray:
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer) or lab.ndim != 1:
        raise ValueError(f"{where}: labels must be a 1-D integer array, got {lab.dtype} {lab.shape}")
    if n is not None and lab.shape[0] != n:
        raise ValueError(f"{where}: {lab.shape[0]} labels for {n} images")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"{where}: labels must be in [0, {num_classes}), got [{lab.min()}, {lab.max()}]")
    return lab.astype(np.int64)


def class_centroids(real, labels, num_classes: int = 10) -> np.ndarray:
    """Mean image per class: ``(num_classes, *image_shape)`` float32; every class must be present."""
    a = _flat(real, "class_centroids")
    lab = _check_labels(labels, a.shape[0], num_classes, "class_centroids")
    counts = np.bincount(lab, minlength=num_classes)
    if np.any(counts == 0):
        raise ValueError(f"class_centroids: no images for class(es) {np.flatnonzero(counts == 0).tolist()}")
    sums = np.zeros((num_classes, a.shape[1]), np.float64)
    eye = np.eye(num_classes, dtype=np.float64)
    for i in range(0, a.shape[0], _CHUNK):
        sums += eye[lab[i : i + _CHUNK]].T @ np.asarray(a[i : i + _CHUNK], np.float64)
    cent = sums / counts[:, None]
    return cent.reshape((num_classes,) + tuple(np.shape(real)[1:])).astype(np.float32)


def centroid_assignments(gen, centroids) -> np.ndarray:
    """Index of the nearest centroid in MSE for each generated image: ``(N,)`` int32."""
    return nearest_real(gen, centroids)[1]


def class_histogram(assignments, num_classes: int = 10) -> np.ndarray:
    """Counts n_k of each class among the assignments (or predicted labels): ``(num_classes,)`` int64."""
    lab = _check_labels(assignments, None, num_classes, "class_histogram")
    return np.bincount(lab, minlength=num_classes)


def coverage_and_entropy(assignments, num_classes: int = 10, min_fraction: Optional[float] = None) -> Tuple[int, float]:
    """(coverage, normalised entropy) of the class histogram of ``assignments``.

    coverage = #{k : n_k / N ≥ min_fraction}, ``min_fraction`` defaulting to 1/(2·num_classes)
    (half the uniform share); entropy = −Σ p_k log p_k / log(num_classes), in [0, 1].
    Works for nearest-centroid assignments and for a classifier's predicted labels alike.
    """
    counts = class_histogram(assignments, num_classes)
    n = int(counts.sum())
    if n == 0:
        raise ValueError("coverage_and_entropy: no assignments")
    if num_classes < 2:
        raise ValueError(f"coverage_and_entropy: num_classes must be >= 2, got {num_classes}")
    f = 1.0 / (2 * num_classes) if min_fraction is None else float(min_fraction)
    if min_fraction is None:
        covered = counts * (2 * num_classes) >= n  # exact integer form of n_k / n >= 1 / (2K)
    else:
        covered = counts >= f * n * (1.0 - 1e-12)  # tolerate rounding of f·n at the threshold
    p = counts[counts > 0] / n
    entropy = float(-np.sum(p * np.log(p)) / math.log(num_classes))
    return int(np.sum(covered)), max(0.0, entropy)


# ------------------------------------------------------------------------------------------------
# Trajectory metrics
# ------------------------------------------------------------------------------------------------


@jax.jit
def _per_step_sq_change(a):
    """(S, B, ...) → (S−1,) mean over examples and pixels of (a[s+1] − a[s])²."""
    return jnp.mean(jnp.square(a[1:] - a[:-1]), axis=tuple(range(1, a.ndim)))


def trajectory_metrics(traj, per_step: bool = False) -> Dict[str, float]:
    """Per-step movement of ε̂, x and x̂_0 along a sampler trajectory (see the module docstring).

    Args:
      traj: dict with 'x' (S+1, B, ...), 'x0' (S, B, ...), 'eps' (S, B, ...), as returned by
        ``ddpm_jax.sampling.sample(..., return_trajectory=True)``.
      per_step: also return 'M_eps_per_step' (S−1,), 'M_dx_per_step' (S,), 'M_x0_per_step' (S−1,).

    Returns:
      {'M_eps', 'M_dx', 'M_x0'} as floats (NaN where the trajectory has a single entry, i.e.
      M_eps and M_x0 when S = 1); each is the mean over consecutive steps s, examples b and
      pixels p of (a_{s+1} − a_s)², steps weighted equally.
    """
    out = {}
    for name, key in (("M_eps", "eps"), ("M_dx", "x"), ("M_x0", "x0")):
        if key not in traj:
            raise KeyError(f"trajectory_metrics: trajectory has no {key!r} entry (keys: {sorted(traj)})")
        a = jnp.asarray(traj[key])
        if a.ndim < 2:
            raise ValueError(f"trajectory_metrics: traj[{key!r}] must be (steps, B, ...), got shape {a.shape}")
        steps = np.asarray(_per_step_sq_change(a), np.float64) if a.shape[0] > 1 else np.zeros((0,))
        out[name] = float(np.mean(steps)) if steps.size else float("nan")
        if per_step:
            out[name + "_per_step"] = steps
    return out


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def sample_quality_table(
    gen,
    real,
    real_labels,
    gen_pred_labels=None,
    *,
    num_classes: int = 10,
    min_fraction: Optional[float] = None,
    gen_block: int = 1000,
    real_block: int = 5000,
) -> Dict[str, float]:
    """All of the lecture's table metrics for generated images ``gen`` against ``real``.

    Args:
      gen: (N, H, W, C) generated images in [0, 1].
      real: (M, H, W, C) real images in [0, 1] (the training set is the natural reference).
      real_labels: (M,) int labels of ``real`` (for the class centroids).
      gen_pred_labels: optional (N,) labels predicted for ``gen`` by a classifier
        (e.g. ``ddpm_jax.metrics.classifier.predict(gen)``).

    Returns:
      dict with 'nn_mse', 'div_mse' (of gen), 'real_div_mse', 'div_real', 'mean_gap', 'std_gap',
      'coverage' (int), 'entropy' (nearest-centroid assignments over the 'centroid_classes' classes
      present in ``real_labels``; None when fewer than two are), and 'clf_coverage' (int),
      'clf_entropy' when ``gen_pred_labels`` is given.
    """
    g, r = _flat(gen, "sample_quality_table(gen)", 2), _flat(real, "sample_quality_table(real)", 2)
    _check_same_d(g, r, "sample_quality_table")
    div_g, div_r = diversity_mse(g), diversity_mse(r)
    (mg, vg), (mr, vr) = pixel_moments(g), pixel_moments(r)
    # Centroids of the classes present in ``real`` (all 10 for MNIST; a small or filtered set may
    # lack some): coverage and entropy are then over those K classes.
    lab = _check_labels(real_labels, r.shape[0], num_classes, "sample_quality_table(real_labels)")
    present, dense = np.unique(lab, return_inverse=True)
    k = int(present.size)
    if k >= 2:
        cent = class_centroids(real, dense.reshape(-1), k)
        cov, ent = coverage_and_entropy(centroid_assignments(gen, cent), k, min_fraction)
    else:
        cov, ent = None, None  # one class: coverage and entropy say nothing
    table = {
        "nn_mse": nearest_real_mse(g, r, gen_block=gen_block, real_block=real_block),
        "div_mse": div_g,
        "real_div_mse": div_r,
        "div_real": div_g / div_r,
        "mean_gap": float(np.mean(np.abs(mg - mr))),
        "std_gap": float(np.mean(np.abs(np.sqrt(vg) - np.sqrt(vr)))),
        "coverage": cov,
        "entropy": ent,
        "centroid_classes": k,
    }
    if gen_pred_labels is not None:
        _check_labels(gen_pred_labels, g.shape[0], num_classes, "sample_quality_table(gen_pred_labels)")
        table["clf_coverage"], table["clf_entropy"] = coverage_and_entropy(gen_pred_labels, num_classes, min_fraction)
    return table

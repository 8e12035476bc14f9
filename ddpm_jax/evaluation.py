"""Evaluation of generated images against real ones: FIDs with their real-vs-real floors and
the lecture's sample-quality table.

:func:`evaluate_samples` takes N generated images (in the data's model space) and the run's data
splits and returns a nested dict:

- ``fid_pixel``: pixel-space FID (images in [0, 1], clipped) against N random validation images,
  N random official test images, and the floor: N random training images vs those same N test
  images (what fresh real images would score against that reference set).
- ``fid_pixel_notebook``: the source notebook's protocol — *unclipped* samples against N random
  images of the whole pool (train + validation = all 70,000 MNIST images by default), with its
  floor (two disjoint random N-subsets of the pool).
- ``fid_classifier``: the same comparisons as ``fid_pixel`` on the features of
  :mod:`ddpm_jax.metrics.classifier` (MNIST-shaped images only).
- ``sample_quality``: :func:`ddpm_jax.metrics.sample_quality.sample_quality_table` against the
  training images (with classifier-predicted classes), and ``sample_quality_floor``: the same for
  N real test images, i.e. what a perfect generator would score.

A floor is the FID between two independent real samples of the same size: finite-sample bias
makes FID positive even for a perfect model, so a number means something only next to its floor.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Optional

import numpy as np

from ddpm_jax import data
from ddpm_jax.metrics import classifier, fid, sample_quality

__all__ = ["classifier_statistics", "evaluate_samples", "format_report", "paired_fid_draws", "sample_classifier_fid"]


def _pick(rng: np.random.Generator, x: np.ndarray, n: int, exclude: Optional[np.ndarray] = None):
    idx = np.arange(x.shape[0]) if exclude is None else np.setdiff1d(np.arange(x.shape[0]), exclude)
    if idx.size < n:
        return None, None
    chosen = rng.choice(idx, size=n, replace=False)
    return x[chosen], chosen


def _fids(features, gen, refs: Dict[str, Optional[np.ndarray]], floor_pair) -> Dict[str, float]:
    g = features(gen)
    out = {}
    for name, ref in refs.items():
        if ref is not None:
            out[name] = fid.fid_from_features(g, features(ref))
    if floor_pair[0] is not None and floor_pair[1] is not None:
        out["floor_train_vs_test"] = fid.fid_from_features(features(floor_pair[0]), features(floor_pair[1]))
    return out


def evaluate_samples(samples: np.ndarray, splits: data.Splits, *, scale: str, seed: int = 0,
                     trajectory: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """All metrics for ``samples`` (N, H, W, C) in model space (``scale`` = the run's data.scale).

    Real reference sets are random N-subsets drawn with ``seed``; sets the split is too small for
    are skipped. ``trajectory`` (from ``sampling.sample(..., return_trajectory=True)``) adds the
    trajectory metrics. Returns a JSON-serialisable nested dict (see the module docstring).
    """
    n = samples.shape[0]
    rng = np.random.default_rng(seed)
    gen_raw = np.asarray(data.unscale_images(samples, scale, clip=False), np.float32)
    gen = np.clip(gen_raw, 0.0, 1.0)
    to01 = lambda x: None if x is None else np.asarray(data.unscale_images(x, scale), np.float32)  # noqa: E731

    val, _ = _pick(rng, splits.val, n)
    test, _ = _pick(rng, splits.test, n)
    train, _ = _pick(rng, splits.train, n)
    pool = np.concatenate([splits.train, splits.val])
    pool_a, idx_a = _pick(rng, pool, n)
    pool_b, _ = _pick(rng, pool, n, exclude=idx_a)
    val, test, train, pool_a, pool_b = map(to01, (val, test, train, pool_a, pool_b))

    report: Dict[str, Any] = {"num_samples": int(n), "seed": int(seed),
                              "fraction_outside_data_range": float(np.mean((gen_raw < -0.05) | (gen_raw > 1.05)))}
    report["fid_pixel"] = _fids(fid.pixel_features, gen, {"val": val, "test": test}, (train, test))
    nb = {}
    if pool_a is not None:
        nb["vs_pool"] = fid.fid_from_features(fid.pixel_features(gen_raw), fid.pixel_features(pool_a))
        nb["vs_pool_clipped"] = fid.fid_from_features(fid.pixel_features(gen), fid.pixel_features(pool_a))
    if pool_a is not None and pool_b is not None:
        nb["floor_pool_vs_pool"] = fid.fid_from_features(fid.pixel_features(pool_a), fid.pixel_features(pool_b))
    report["fid_pixel_notebook"] = nb

    mnist_like = tuple(samples.shape[1:]) == (28, 28, 1)
    if mnist_like:
        report["fid_classifier"] = _fids(classifier.features, gen, {"val": val, "test": test}, (train, test))
        report["classifier"] = {"id": classifier.EXTRACTOR_ID, "version": classifier.extractor_version()}
    train01 = to01(splits.train)
    pred = classifier.predict(gen) if mnist_like else None
    report["sample_quality"] = sample_quality.sample_quality_table(gen, train01, splits.train_labels, pred)
    if test is not None:
        test_labels_pred = classifier.predict(test) if mnist_like else None
        report["sample_quality_floor"] = sample_quality.sample_quality_table(test, train01, splits.train_labels, test_labels_pred)
    if trajectory is not None:
        report["trajectory"] = sample_quality.trajectory_metrics(trajectory)
    return report


def format_report(report: Dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_samples`' result."""
    lines = [f"N = {report['num_samples']} samples ({100 * report['fraction_outside_data_range']:.1f}% of pixels outside the data range)"]
    for key, title in (("fid_pixel", "pixel FID"), ("fid_classifier", "classifier FID"), ("fid_pixel_notebook", "pixel FID, notebook protocol")):
        if report.get(key):
            lines.append(f"{title:30s}" + "  ".join(f"{k} {v:.3f}" for k, v in report[key].items()))
    for key, title in (("sample_quality", "samples"), ("sample_quality_floor", "real test images (floor)")):
        if key in report:
            q = report[key]
            lines.append(f"{title:30s}" + "  ".join(f"{k} {'n/a' if v is None else format(v, '.4g')}" for k, v in q.items()))
    if "trajectory" in report:
        lines.append(f"{'trajectory':30s}" + "  ".join(f"{k} {v:.4g}" for k, v in report["trajectory"].items()))
    return "\n".join(lines)


def paired_fid_draws(sets: Dict[str, np.ndarray], pool: np.ndarray, num: int, draws: int, seed: int) -> Dict[str, Any]:
    """The notebook's pixel-FID protocol repeated over ``draws`` draws, paired across sample sets.

    ``sets``: name -> samples (≥ draws·num, ...) in [0, 1] (unclipped); ``pool``: real images
    (M ≥ 2·num, ...) in [0, 1]. Draw i scores samples [i·num, (i+1)·num) of every set against
    the same real subset pool[perm_i[:num]] (perm_i = default_rng(seed + i).permutation(M)), and
    the floor pool[perm_i[:num]] vs pool[perm_i[num:2·num]]. Returns a JSON-ready dict: per set the
    FIDs with mean, sd, min, max; per pair (a, b) the per-draw differences FID_a − FID_b with their
    mean and standard error sd/√draws (shared real images cancel much of the noise); the floors.
    """
    feats = lambda x: fid.pixel_features(np.asarray(x, np.float32))  # noqa: E731
    out = {name: {"fid": []} for name in sets}
    floors = []
    for i in range(draws):
        idx = np.random.default_rng(seed + i).permutation(pool.shape[0])
        real, partner = feats(pool[idx[:num]]), feats(pool[idx[num:2 * num]])
        floors.append(fid.fid_from_features(real, partner))
        for name, x in sets.items():
            out[name]["fid"].append(fid.fid_from_features(feats(x[i * num:(i + 1) * num]), real))
    summary = lambda v: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "min": float(np.min(v)), "max": float(np.max(v))}  # noqa: E731
    for name in sets:
        out[name].update(summary(out[name]["fid"]))
    pairs = {}
    for a, b in itertools.combinations(sets, 2):
        diff = np.asarray(out[a]["fid"]) - np.asarray(out[b]["fid"])
        pairs[f"{a} - {b}"] = {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(draws)), "per_draw": diff.tolist()}
    return {"num": num, "draws": draws, "seed": seed, "sets": out, "paired_differences": pairs,
            "floor": {"fid": floors, **summary(floors)},
            "protocol": "draw i: samples [i*N, (i+1)*N) of each set, unclipped, vs real pool[perm_i[:N]]; "
                        "floor: pool[perm_i[:N]] vs pool[perm_i[N:2N]], perm_i = default_rng(seed + i).permutation"}


def classifier_statistics(images01) -> dict:
    """FID statistics (``fid.compute_statistics``: mu (128,), sigma (128, 128), n, extractor id and
    version) of the classifier features of MNIST-shaped images ``(N, 28, 28, 1)`` in [0, 1]."""
    return fid.compute_statistics(classifier.features(np.asarray(images01, np.float32)), classifier.EXTRACTOR_ID,
                                  classifier.extractor_version())


def sample_classifier_fid(run, num: int, seed: int, reference, *, batch_size: Optional[int] = None,
                          progress: bool = False) -> float:
    """Classifier FID of ``num`` samples of ``run`` (a ``ddpm_jax.runs.Run`` of MNIST-shaped
    images; its config's sampler, EMA params, key ``PRNGKey(seed)``, ``batch_size`` per compiled
    batch, default all at once) against ``reference`` (:func:`classifier_statistics`, a dict or the
    path of a file of ``fid.save_statistics``). The reference is a whole split, so the value is the
    N-sample bias plus the model's distance: compare it only with values of the same ``num``."""
    import jax

    from ddpm_jax import sampling

    batch = min(batch_size or num, num)
    samples = sampling.sample_in_batches(run.make_sampler(batch, run.sampler_options()), num, batch,
                                         jax.random.PRNGKey(seed), progress=progress)
    gen = np.clip(np.asarray(data.unscale_images(samples, run.data_scale, clip=False), np.float32), 0.0, 1.0)
    return fid.fid_from_statistics(classifier_statistics(gen), reference)

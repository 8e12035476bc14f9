"""Sample-quality metrics on hand-built inputs with known answers (NumPy brute force as reference)."""

import itertools
import math

import jax
import numpy as np
import pytest

from ddpm_jax.metrics import sample_quality as sq


def _imgs(rng, n, h=4, w=3, c=1):
    return rng.random((n, h, w, c)).astype(np.float32)


def _brute_nn(gen, real):
    g = gen.reshape(len(gen), -1).astype(np.float64)
    r = real.reshape(len(real), -1).astype(np.float64)
    d = ((g[:, None, :] - r[None, :, :]) ** 2).mean(-1)
    return d.min(1), d.argmin(1)


# ------------------------------------------------------------------------------------------------
# nearest_real_mse
# ------------------------------------------------------------------------------------------------


def test_nearest_real_matches_brute_force():
    rng = np.random.default_rng(0)
    gen, real = _imgs(rng, 37), _imgs(rng, 53)
    want_mse, want_idx = _brute_nn(gen, real)
    mse, idx = sq.nearest_real(gen, real)
    np.testing.assert_allclose(mse, want_mse, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(idx, want_idx)
    assert sq.nearest_real_mse(gen, real) == pytest.approx(want_mse.mean(), rel=1e-5)


def test_nearest_real_is_exactly_zero_for_subset():
    rng = np.random.default_rng(1)
    real = _imgs(rng, 40, 28, 28)
    pick = rng.permutation(40)[:15]
    mse, idx = sq.nearest_real(real[pick], real, gen_block=4, real_block=7)
    assert np.all(mse == 0.0)
    np.testing.assert_array_equal(idx, pick)
    assert sq.nearest_real_mse(real[pick], real) == 0.0


@pytest.mark.parametrize("gen_block,real_block", [(1, 1), (3, 5), (7, 53), (100, 2)])
def test_blocked_equals_unblocked(gen_block, real_block):
    rng = np.random.default_rng(2)
    gen, real = _imgs(rng, 23), _imgs(rng, 53)
    ref_mse, ref_idx = sq.nearest_real(gen, real, gen_block=10_000, real_block=10_000)
    mse, idx = sq.nearest_real(gen, real, gen_block=gen_block, real_block=real_block)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(mse, ref_mse, rtol=1e-6, atol=0)


def test_nearest_real_rejects_bad_input():
    rng = np.random.default_rng(3)
    with pytest.raises(TypeError):
        sq.nearest_real_mse(np.zeros((2, 4, 4, 1), np.uint8), _imgs(rng, 3, 4, 4))
    with pytest.raises(ValueError):
        sq.nearest_real_mse(_imgs(rng, 2, 4, 4), _imgs(rng, 3, 5, 4))


# ------------------------------------------------------------------------------------------------
# diversity, ratio, gaps
# ------------------------------------------------------------------------------------------------


def test_diversity_identity_equals_pairs():
    rng = np.random.default_rng(4)
    x = _imgs(rng, 17)
    flat = x.reshape(17, -1).astype(np.float64)
    pairs = [((flat[i] - flat[j]) ** 2).mean() for i, j in itertools.permutations(range(17), 2)]
    assert sq.diversity_mse(x) == pytest.approx(np.mean(pairs), rel=1e-10)


def test_diversity_two_images_and_constant_set():
    a = np.zeros((1, 2, 2, 1), np.float32)
    b = np.full((1, 2, 2, 1), 0.5, np.float32)
    assert sq.diversity_mse(np.concatenate([a, b])) == pytest.approx(0.25)
    assert sq.diversity_mse(np.repeat(b, 5, axis=0)) == 0.0
    with pytest.raises(ValueError):
        sq.diversity_mse(a)


def test_diversity_random_pairs_estimate():
    rng = np.random.default_rng(5)
    x = _imgs(rng, 50)
    est = sq.diversity_mse(x, num_pairs=20_000, key=jax.random.PRNGKey(0))
    assert est == pytest.approx(sq.diversity_mse(x), rel=0.03)
    with pytest.raises(ValueError):
        sq.diversity_mse(x, num_pairs=10)


def test_div_real_ratio():
    rng = np.random.default_rng(6)
    x = _imgs(rng, 30)
    assert sq.div_real_ratio(x, x.copy()) == pytest.approx(1.0, abs=1e-12)
    # Halving the spread around the mean quarters every squared distance.
    shrunk = (x.mean(0) + 0.5 * (x - x.mean(0))).astype(np.float32)
    assert sq.div_real_ratio(shrunk, x) == pytest.approx(0.25, rel=1e-5)


def test_mean_and_std_gaps():
    # gen: every pixel alternates 0.2 / 0.4 across 4 images → mean 0.3, std 0.1.
    # real: pixel 0 is constant 0.5 (mean 0.5, std 0); the other 3 pixels alternate 0 / 0.6 (mean 0.3, std 0.3).
    gen = np.array([0.2, 0.4, 0.2, 0.4], np.float32)[:, None] * np.ones((1, 4), np.float32)
    real = np.tile(np.array([[0.5, 0.0, 0.0, 0.0], [0.5, 0.6, 0.6, 0.6]], np.float32), (3, 1))
    gen, real = gen.reshape(4, 2, 2, 1), real.reshape(6, 2, 2, 1)
    assert sq.mean_gap(gen, real) == pytest.approx((0.2 + 0 + 0 + 0) / 4, abs=1e-7)
    assert sq.std_gap(gen, real) == pytest.approx((0.1 + 0.2 + 0.2 + 0.2) / 4, abs=1e-7)
    assert sq.mean_gap(real, real) == 0.0 and sq.std_gap(real, real) == 0.0


# ------------------------------------------------------------------------------------------------
# centroids, coverage, entropy
# ------------------------------------------------------------------------------------------------


def test_class_centroids_and_assignments():
    # Three classes on 1×2 images; class k's images average to (k, −k).
    real = np.array([[0, 0], [0, 0], [0.5, -1.5], [1.5, -0.5], [2, -2], [1, -1], [3, -3]], np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    cent = sq.class_centroids(real.reshape(7, 1, 2, 1), labels, num_classes=3)
    assert cent.shape == (3, 1, 2, 1)
    np.testing.assert_allclose(cent.reshape(3, 2), [[0, 0], [1, -1], [2, -2]], atol=1e-7)
    gen = np.array([[0.1, 0.0], [1.2, -0.9], [5, -5], [0.9, -1.1]], np.float32).reshape(4, 1, 2, 1)
    np.testing.assert_array_equal(sq.centroid_assignments(gen, cent), [0, 1, 2, 1])
    with pytest.raises(ValueError, match="class"):
        sq.class_centroids(real.reshape(7, 1, 2, 1), labels, num_classes=4)  # class 3 empty


def test_coverage_entropy_uniform_and_single_class():
    uniform = np.repeat(np.arange(10), 7)
    assert sq.coverage_and_entropy(uniform) == (10, pytest.approx(1.0, abs=1e-12))
    cov, ent = sq.coverage_and_entropy(np.full(50, 3))
    assert (cov, ent) == (1, 0.0)


def test_coverage_threshold_default_and_custom():
    # 100 samples, default threshold 1/20 → 5 samples. Classes with 5 are covered, 4 are not.
    counts = [5, 4, 91, 0, 0, 0, 0, 0, 0, 0]
    a = np.repeat(np.arange(10), counts)
    cov, ent = sq.coverage_and_entropy(a)
    assert cov == 2
    p = np.array([5, 4, 91]) / 100
    assert ent == pytest.approx(-(p * np.log(p)).sum() / math.log(10), rel=1e-12)
    # Custom threshold exactly at 0.04 (4 of 100) admits the class with 4; at 0.05 it does not.
    assert sq.coverage_and_entropy(a, min_fraction=0.04)[0] == 3
    assert sq.coverage_and_entropy(a, min_fraction=0.05)[0] == 2
    # Two classes, 3 of 60 = exactly 1/20 each side of the threshold: 3 covered, 2 not.
    b = np.repeat(np.arange(3), [3, 2, 55])
    assert sq.coverage_and_entropy(b, num_classes=10)[0] == 2
    assert sq.coverage_and_entropy(np.repeat([0, 1], [1, 3]), num_classes=2) == (2, pytest.approx(0.8112781244591328))


def test_coverage_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        sq.coverage_and_entropy(np.array([0, 10]))
    with pytest.raises(ValueError):
        sq.coverage_and_entropy(np.array([], np.int32))


# ------------------------------------------------------------------------------------------------
# trajectory metrics
# ------------------------------------------------------------------------------------------------


def test_trajectory_metrics_known_changes():
    S, B = 4, 3
    shape = (B, 2, 2, 1)
    # x moves by a constant 0.5 per step → M_dx = 0.25; eps is constant → M_eps = 0;
    # x0 steps by 1, 2, 3 (all pixels) → per-step changes 1, 4, 9 → M_x0 = 14/3.
    x = np.stack([np.full(shape, 0.5 * s, np.float32) for s in range(S + 1)])
    eps = np.broadcast_to(np.random.default_rng(0).random(shape, dtype=np.float32), (S,) + shape)
    x0 = np.stack([np.full(shape, v, np.float32) for v in (0, 1, 3, 6)])
    out = sq.trajectory_metrics({"x": x, "x0": x0, "eps": eps}, per_step=True)
    assert out["M_dx"] == pytest.approx(0.25)
    assert out["M_eps"] == 0.0
    assert out["M_x0"] == pytest.approx(14 / 3)
    np.testing.assert_allclose(out["M_x0_per_step"], [1, 4, 9])
    assert out["M_dx_per_step"].shape == (S,) and out["M_eps_per_step"].shape == (S - 1,)


def test_trajectory_metrics_mixed_examples():
    # Only example 0's first pixel changes (by 2): per-step mean over B·d = 2·4 values is 4/8.
    x = np.zeros((3, 2, 4), np.float32)
    x[1:, 0, 0] = 2.0
    x[2:, 0, 0] = 0.0
    out = sq.trajectory_metrics({"x": x, "x0": x[:2], "eps": x[1:]})
    assert out["M_dx"] == pytest.approx(0.5)  # two steps, each 4/8
    assert out["M_x0"] == pytest.approx(0.5) and out["M_eps"] == pytest.approx(0.5)


def test_trajectory_metrics_single_step_and_missing_key():
    x = np.zeros((2, 1, 3), np.float32)
    out = sq.trajectory_metrics({"x": x, "x0": x[:1], "eps": x[:1]})
    assert out["M_dx"] == 0.0 and math.isnan(out["M_eps"]) and math.isnan(out["M_x0"])
    with pytest.raises(KeyError):
        sq.trajectory_metrics({"x": x})


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def test_sample_quality_table_real_vs_itself():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(10), 6)
    real = (_imgs(rng, 60, 6, 6) * 0.1 + labels[:, None, None, None] / 10).astype(np.float32)
    table = sq.sample_quality_table(real, real, labels, gen_pred_labels=labels)
    assert table["nn_mse"] == 0.0
    assert table["div_real"] == pytest.approx(1.0, abs=1e-12)
    assert table["mean_gap"] == 0.0 and table["std_gap"] == 0.0
    assert table["coverage"] == 10 and table["entropy"] == pytest.approx(1.0)
    assert table["clf_coverage"] == 10 and table["clf_entropy"] == pytest.approx(1.0)
    gen = real[:20]  # classes 0..3 only (6, 6, 6, 2 images): class 3 has 2/20 = 10 % ≥ 5 %
    t2 = sq.sample_quality_table(gen, real, labels)
    assert t2["coverage"] == 4 and "clf_coverage" not in t2
    assert t2["nn_mse"] == 0.0
    assert set(table) == {"nn_mse", "div_mse", "real_div_mse", "div_real", "mean_gap", "std_gap",
                          "coverage", "entropy", "centroid_classes", "clf_coverage", "clf_entropy"}
    assert table["centroid_classes"] == 10


def test_sample_quality_table_with_classes_missing_from_the_real_set():
    """A reference set with only classes 3 and 7 (a small or filtered dataset): the centroid
    metrics are over those two classes, not an error."""
    rng = np.random.default_rng(8)
    labels = np.repeat(np.array([3, 7]), 10)
    real = (_imgs(rng, 20, 6, 6) * 0.1 + (labels == 7)[:, None, None, None] * 0.8).astype(np.float32)
    table = sq.sample_quality_table(real[:10], real, labels)  # all of class 3
    assert table["centroid_classes"] == 2
    assert table["coverage"] == 1 and table["entropy"] == 0.0
    both = sq.sample_quality_table(real, real, labels)  # 10 and 10: uniform over the 2 present classes
    assert both["coverage"] == 2 and both["entropy"] == pytest.approx(1.0)
    one = sq.sample_quality_table(real[:10], real[:10], labels[:10])
    assert one["centroid_classes"] == 1 and one["coverage"] is None and one["entropy"] is None

"""evaluate_samples: every comparison is present, real images score at their floor, and a
broken generator scores far above it."""

import numpy as np
import pytest

from ddpm_jax import data
from ddpm_jax.evaluation import evaluate_samples, format_report


def _splits(n=1200, seed=0, scale="[0,1]"):
    """MNIST-shaped toy data: class k is a bar at row 2 + 2k, so classes differ in pixels."""
    rng = np.random.default_rng(seed)

    def make(m):
        labels = rng.integers(0, 10, m)
        x = np.zeros((m, 28, 28, 1), np.uint8)
        x[np.arange(m), 2 + 2 * labels, 4:24, 0] = 255
        x += rng.integers(0, 30, x.shape, dtype=np.uint8)
        return x, labels.astype(np.int32)

    tr, trl = make(n)
    te, tel = make(n)
    return data.load_splits("arrays", arrays={"train_images": tr, "train_labels": trl, "test_images": te, "test_labels": tel},
                            train_size=n // 2, val_size=n // 2, seed=seed, scale=scale)


@pytest.fixture(scope="module")
def splits():
    return _splits()


def test_real_images_score_at_the_floor_and_noise_far_above(splits):
    n = 400  # ≥ 20 per class on average, so each of the 10 classes clears the 5 % coverage threshold
    real = splits.test[:n]  # model-space [0,1]; the evaluation draws its own disjoint references
    good = evaluate_samples(real, splits, scale="[0,1]", seed=1)
    for key in ("fid_pixel", "fid_classifier"):
        assert set(good[key]) == {"val", "test", "floor_train_vs_test"}
    assert set(good["fid_pixel_notebook"]) == {"vs_pool", "vs_pool_clipped", "floor_pool_vs_pool"}
    # Real images drawn from the same distribution: their FID is of the order of the floor
    # (both are finite-sample FIDs of equal-size independent real sets).
    floor = good["fid_pixel"]["floor_train_vs_test"]
    assert 0 < good["fid_pixel"]["val"] < 2 * floor
    bad = evaluate_samples(np.random.default_rng(0).uniform(-0.5, 1.5, real.shape).astype(np.float32), splits, scale="[0,1]", seed=1)
    assert bad["fid_pixel"]["val"] > 10 * floor
    assert bad["fid_pixel_notebook"]["vs_pool"] > bad["fid_pixel_notebook"]["vs_pool_clipped"]  # unclipped noise is worse
    assert bad["fraction_outside_data_range"] > 0.3 and good["fraction_outside_data_range"] == 0.0
    # Real images score like the floor table (another draw of real test images, same N): the
    # normalised entropy of 400 multinomial class assignments has sd ~0.01, so 0.05 is generous.
    q, floor_q = good["sample_quality"], good["sample_quality_floor"]
    assert abs(q["entropy"] - floor_q["entropy"]) < 0.05 and q["coverage"] >= floor_q["coverage"] - 1
    assert bad["sample_quality"]["nn_mse"] > 5 * q["nn_mse"]
    assert "samples" in format_report(good)


def test_minus_one_one_scale_is_mapped_back(splits):
    real01 = splits.test[:50]
    a = evaluate_samples(real01, splits, scale="[0,1]", seed=2)
    b = evaluate_samples(real01 * 2.0 - 1.0, _splits(scale="[-1,1]"), scale="[-1,1]", seed=2)
    # same images, same references: equal up to float32 rounding of the affine map (~1e-7 relative)
    np.testing.assert_allclose(a["fid_pixel"]["val"], b["fid_pixel"]["val"], rtol=1e-4)


def test_non_mnist_shapes_skip_the_classifier():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 255, (80, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 80).astype(np.int32)
    sp = data.load_splits("arrays", arrays={"train_images": imgs[:60], "train_labels": labels[:60], "test_images": imgs[60:], "test_labels": labels[60:]},
                          train_size=40, val_size=20, seed=0)
    rep = evaluate_samples(sp.test[:10], sp, scale="[0,1]")
    assert "fid_classifier" not in rep and "val" in rep["fid_pixel"]

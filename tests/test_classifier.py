"""The shipped MNIST classifier: weights file, shapes, determinism, accuracy on the real test split."""

import hashlib
import os

import jax
import numpy as np
import pytest

from ddpm_jax.metrics import classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MNIST = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")


def _synthetic(n, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def test_shipped_weights_file_and_version():
    path = classifier.WEIGHTS_PATH
    assert os.path.isfile(path), path
    assert os.path.getsize(path) < 1_000_000
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert classifier.EXTRACTOR_ID == "mnist_cnn"
    assert classifier.EXTRACTOR_VERSION == digest[:12] == classifier.extractor_version()
    params = classifier.load_classifier()
    assert classifier.load_classifier() is params  # cached
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
    assert n_params == 98_442
    assert classifier.weights_meta()["test_accuracy"] >= 0.99


def test_predict_and_features_shapes_on_synthetic_input():
    x = _synthetic(7)
    pred = classifier.predict(x)
    assert pred.shape == (7,) and pred.dtype == np.int32
    assert np.all((pred >= 0) & (pred < 10))
    f1 = classifier.features(x)
    assert f1.shape == (7, classifier.FEATURE_DIM) == (7, 128) and f1.dtype == np.float32
    np.testing.assert_array_equal(classifier.features(x), f1)  # deterministic
    f_small = classifier.features(x, batch_size=3)  # padded last batch: same numbers
    np.testing.assert_allclose(f_small, f1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(classifier.features(x[..., 0]), f1)  # (N, 28, 28) accepted
    assert classifier.logits(x).shape == (7, 10)
    assert classifier.features(x[:0]).shape == (0, 128)


def test_input_checks():
    x = _synthetic(2)
    with pytest.raises(TypeError):
        classifier.predict((x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier.features(x * 2 - 1)  # [-1, 1] data
    with pytest.raises(ValueError, match="shape"):
        classifier.features(np.zeros((2, 32, 32, 1), np.float32))


def test_weights_file_roundtrip_and_missing(tmp_path):
    params = classifier.init_params(jax.random.PRNGKey(3))
    path = tmp_path / "w.msgpack"
    digest = classifier.save_weights_file(path, params, {"note": "test"})
    loaded, meta, digest2 = classifier.load_weights_file(path)
    assert digest == digest2 and meta == {"note": "test"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)
    x = _synthetic(4)
    np.testing.assert_allclose(classifier.features(x, params=loaded), classifier.features(x, params=params))
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        classifier.load_weights_file(tmp_path / "missing.msgpack")


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="full MNIST not available at ../shared/data/mnist")
def test_accuracy_on_official_test_split():
    from ddpm_jax import data

    arrays = data.load_idx_directory(SHARED_MNIST)
    x = data.scale_images(arrays["test_images"], "[0,1]")
    assert x.shape == (10_000, 28, 28, 1)
    pred = classifier.predict(x)
    acc = float(np.mean(pred == arrays["test_labels"]))
    assert acc >= 0.99, acc
    f = classifier.features(x[:2000])
    assert f.shape == (2000, 128) and np.all(np.isfinite(f))
    assert np.all(f.std(axis=0) > 0.1)  # no constant (dead) feature dimensions


def test_training_loop_runs_on_tiny_data():
    from experiments import train_classifier

    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    params = train_classifier.train(x, y, epochs=1, seed=0, batch_size=32, learning_rate=1e-3, max_shift=2, progress=False)
    init = classifier.init_params(jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init)
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(params))
    assert classifier.predict(x[:5], params=params).shape == (5,)

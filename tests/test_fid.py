"""Tests for ddpm_jax.metrics.fid (Fréchet distance on features, float64 NumPy).

Tolerances, and why:
- scipy reference (``scipy.linalg.sqrtm``) on well-conditioned covariances: both computations are
  backward stable, so they differ by ~1e-14 relative in practice; 1e-6 is the contract (from the
  design brief) and leaves many orders of margin for other BLAS/LAPACK builds.
- A set against itself: the cross term reproduces the clipped eigenvalues of Σ to ~d·ε·‖Σ‖, so
  the residual is far below 1e-8·Tr Σ (≈ 1e4 times float64 rounding at d ≤ 200).
- Pure shift: the covariances agree up to the rounding of ``a + c``; 1e-9 relative.
"""

import os
import time
import warnings

import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.metrics import fid as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)  # tiny imaginary parts from the non-symmetric product
    d = mu1 - mu2
    return float(d @ d + np.trace(s1 + s2 - 2.0 * covmean))


def _eigh_fid(mu1, s1, mu2, s2):
    """The direct form (the notebook's): eigh of Σ1, then eigh of Σ1^{1/2} Σ2 Σ1^{1/2}."""
    w1, v1 = np.linalg.eigh(s1)
    s1h = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    ws = np.linalg.eigvalsh(s1h @ s2 @ s1h)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(np.clip(ws, 0, None))))


def _gram_fid(a, b):
    """Exact small-sample form: Tr(Σ1^{1/2}Σ2Σ1^{1/2})^{1/2} = ‖A Bᵀ‖_* / √((n1−1)(n2−1)) for
    centred A, B (the nonzero eigenvalues of Σ1Σ2 are those of (A Bᵀ)(B Aᵀ)/((n1−1)(n2−1)))."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    A, B = a - a.mean(0), b - b.mean(0)
    n1, n2 = len(a), len(b)
    d = a.mean(0) - b.mean(0)
    cross = np.linalg.svd(A @ B.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(d @ d + (A * A).sum() / (n1 - 1) + (B * B).sum() / (n2 - 1) - 2.0 * cross)


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)  # eigenvalues in ~[0.5, 4.5]: well conditioned


# ----------------------------------------------------------------------------------------------
# frechet_distance
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    got = F.frechet_distance(mu1, s1, mu2, s2)
    want = _scipy_fid(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-6)
    # Equal means: the trace term alone must also agree (not hidden by a large ‖Δμ‖²).
    assert F.frechet_distance(mu1, s1, mu1, s2) == pytest.approx(_scipy_fid(mu1, s1, mu1, s2), rel=1e-6)


def test_symmetric_in_its_arguments():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = _random_cov(rng, 16), _random_cov(rng, 16)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(F.frechet_distance(mu2, s2, mu1, s1), rel=1e-12)


def test_identical_sets_are_zero():
    rng = np.random.default_rng(4)
    for n, d in [(500, 20), (50, 200)]:  # full rank and rank-deficient
        a = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d) + rng.normal(size=d)
        _, sigma = F.feature_statistics(a)
        got = F.fid_from_features(a, a)
        assert 0.0 <= got <= 1e-8 * np.trace(sigma), (n, d, got)


def test_pure_shift_equals_mean_term():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20))
    c = rng.normal(size=20) * 3.0
    got = F.fid_from_features(a, a + c)
    assert got == pytest.approx(float(c @ c), rel=1e-9)


def test_rank_deficient_fewer_samples_than_features():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(50, 200))
    b = rng.normal(size=(50, 200)) * 1.3 + 0.1
    mu1, s1 = F.feature_statistics(a)
    mu2, s2 = F.feature_statistics(b)
    assert np.linalg.matrix_rank(s1) == 49  # n − 1 < d
    got = F.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float) and np.isfinite(got) and got >= 0.0
    # Exact reference from the 50×50 Gram matrix (no d×d square roots at all).
    assert got == pytest.approx(_gram_fid(a, b), rel=1e-10)
    # Direct eigh-based float64 computation: its 151 zero eigenvalues of Σ1^{1/2}Σ2Σ1^{1/2} come
    # out as ±O(ε·‖·‖), whose square roots add O(√ε) each — measured ≈ 2e-8 relative here.
    assert got == pytest.approx(_eigh_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(7)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.01, 4.0, size=d), rng.uniform(0.01, 4.0, size=d)
    v1[:5] = 0.0  # degenerate directions are fine too
    want = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-12)


def test_shape_validation():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="dimension mismatch.*D = 3.*D = 4"):
        F.frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma1 must have shape \(D, D\) = \(3, 3\)"):
        F.frechet_distance(mu, np.eye(4), mu, s)
    with pytest.raises(ValueError, match="mu2 must be a vector"):
        F.frechet_distance(mu, s, np.zeros((3, 1)), s)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        F.frechet_distance(mu, -np.eye(3), mu, s)
    with pytest.raises(ValueError, match="not symmetric"):
        F.frechet_distance(mu, np.triu(np.ones((3, 3))), mu, s)
    with pytest.raises(ValueError, match="NaN or inf"):
        F.frechet_distance(np.array([0.0, np.nan, 0.0]), s, mu, s)
    with pytest.raises(ValueError, match=r"dimension mismatch.*\(10, 3\).*\(10, 4\)"):
        F.fid_from_features(np.zeros((10, 3)), np.zeros((10, 4)))


# ----------------------------------------------------------------------------------------------
# feature_statistics, pixel_features
# ----------------------------------------------------------------------------------------------
def test_feature_statistics_matches_numpy_and_is_chunked():
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(1001, 30)) * 5 + 100).astype(np.float32)  # large offset: needs centring
    mu, sigma = F.feature_statistics(x, chunk_size=128)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        F.feature_statistics(np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        F.feature_statistics(np.zeros((1, 5)))


def test_pixel_features_scale_like_the_notebook():
    imgs = np.array([[[0, 255], [51, 102]]], np.uint8).repeat(3, axis=0)[..., None]  # (3, 2, 2, 1)
    f = F.pixel_features(imgs)
    assert f.shape == (3, 4) and f.dtype == np.float32
    np.testing.assert_array_equal(f[0], np.array([0, 255, 51, 102], np.float32) / np.float32(255.0))
    g = np.full((2, 1, 2, 2), 1.5, np.float32)  # floats are taken as-is, not clipped
    np.testing.assert_array_equal(F.pixel_features(g), np.full((2, 4), 1.5, np.float32))


# ----------------------------------------------------------------------------------------------
# Cached statistics files
# ----------------------------------------------------------------------------------------------
def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(100, 8)), rng.normal(size=(120, 8)) + 0.5
    sa = F.compute_statistics(a, F.PIXELS_ID, F.PIXELS_VERSION)
    path = tmp_path / "stats_a.npz"
    assert F.save_statistics(path, sa["mu"], sa["sigma"], sa["n"], F.PIXELS_ID, F.PIXELS_VERSION) == str(path)
    loaded = F.load_statistics(path)
    assert set(loaded) == {"mu", "sigma", "n", "extractor_id", "extractor_version"}
    np.testing.assert_array_equal(loaded["mu"], sa["mu"])
    np.testing.assert_array_equal(loaded["sigma"], sa["sigma"])
    assert loaded["n"] == 100 and loaded["extractor_id"] == "pixels" and loaded["extractor_version"] == "1"
    # The path is used exactly (np.savez would otherwise append ".npz").
    F.save_statistics(tmp_path / "stats_b", *F.feature_statistics(b), 120, "pixels", 1)
    assert os.path.isfile(tmp_path / "stats_b")
    want = F.fid_from_features(a, b)
    assert F.fid_from_statistics(loaded, F.load_statistics(tmp_path / "stats_b")) == pytest.approx(want, rel=1e-12)
    assert F.fid_from_statistics(path, tmp_path / "stats_b") == pytest.approx(want, rel=1e-12)


def test_mismatched_extractor_refused(tmp_path):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(20, 4))
    s = F.compute_statistics(x, "pixels", "1")
    for other in (F.compute_statistics(x, "mnist_classifier", "1"), F.compute_statistics(x, "pixels", "2")):
        with pytest.raises(ValueError) as e:
            F.fid_from_statistics(s, other)
        msg = str(e.value)
        assert "\n" not in msg and "refusing" in msg
        assert "'pixels' version '1'" in msg
        assert f"{other['extractor_id']!r} version {other['extractor_version']!r}" in msg
    wider = F.compute_statistics(rng.normal(size=(20, 5)), "pixels", "1")
    with pytest.raises(ValueError, match=r"refusing.*feature dimensions.*D=4.*D=5"):
        F.fid_from_statistics(s, wider)
    # Also through files.
    F.save_statistics(tmp_path / "a.npz", s["mu"], s["sigma"], s["n"], "pixels", "1")
    F.save_statistics(tmp_path / "b.npz", s["mu"], s["sigma"], s["n"], "pixels", "2")
    with pytest.raises(ValueError, match="refusing"):
        F.fid_from_statistics(tmp_path / "a.npz", tmp_path / "b.npz")


def test_missing_or_corrupt_statistics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        F.load_statistics(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not an npz file at all")
    with pytest.raises(ValueError, match="corrupt"):
        F.load_statistics(garbage)
    good = tmp_path / "good.npz"
    F.save_statistics(good, np.zeros(3), np.eye(3), 10, "pixels", "1")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        F.load_statistics(truncated)
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.zeros(3))  # an npz, but not statistics
    with pytest.raises(ValueError, match="missing key"):
        F.load_statistics(other)
    npy = tmp_path / "plain.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ValueError, match="corrupt"):
        F.load_statistics(npy)


# ----------------------------------------------------------------------------------------------
# pytorch-fid's calculate_frechet_distance (sqrtm of the non-symmetric Σ1Σ2, real part taken)
# ----------------------------------------------------------------------------------------------
def _pytorch_fid(mu1, s1, mu2, s2):
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        # pytorch-fid calls scipy.linalg.sqrtm(..., disp=False), deprecated in SciPy 1.17 (removed
        # in 1.18); under 1.17 it still returns (sqrtm, error estimate) as pytorch-fid expects.
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(calculate_frechet_distance(mu1, s1, mu2, s2))


@pytest.mark.parametrize("case", ["well_conditioned", "nearly_singular"])
def test_equals_pytorch_fid(case):
    """The symmetric form equals pytorch-fid's to 1e-6 relative, also where Σ1Σ2 has eigenvalues
    that round-off makes slightly negative or complex (there sqrtm returns a complex matrix and
    pytorch-fid keeps its real part)."""
    pytest.importorskip("pytorch_fid")
    rng = np.random.default_rng(11)
    d = 256
    a = rng.normal(size=(1000, d)) @ rng.normal(size=(d, d)) / 16
    b = rng.normal(size=(1200, d)) @ rng.normal(size=(d, d)) / 16 + 0.1
    if case == "nearly_singular":  # 8 features copy 8 others up to 1e-9: Σ has 8 eigenvalues ~1e-18
        a[:, -8:] = a[:, :8] + 1e-9 * rng.normal(size=(1000, 8))
        b[:, -8:] = b[:, :8] + 1e-9 * rng.normal(size=(1200, 8))
    mu1, s1 = F.feature_statistics(a)
    mu2, s2 = F.feature_statistics(b)
    eig = np.linalg.eigvals(s1 @ s2)
    if case == "nearly_singular":
        assert eig.real.min() < 1e-12 * eig.real.max(), eig.real.min()  # at the round-off level (here < 0)
    want = _pytorch_fid(mu1, s1, mu2, s2)
    got = F.frechet_distance(mu1, s1, mu2, s2)
    print(f"{case}: min Re eig(Σ1Σ2) {eig.real.min():.3g}, max |Im| {np.abs(eig.imag).max():.3g}; "
          f"FID {got:.12g} vs pytorch-fid {want:.12g} (relative {abs(got / want - 1):.2g})")
    assert got == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Scale check against the notebook: the real-vs-real floor on MNIST pixels
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason=f"no MNIST IDX files at {MNIST_DIR}")
def test_mnist_pixel_real_vs_real_floor():
    from ddpm_jax.data import load_idx_directory

    t0 = time.perf_counter()
    train = load_idx_directory(MNIST_DIR)["train_images"]
    idx = np.random.default_rng(0).permutation(len(train))[:2000]
    feats = F.pixel_features(train[idx])
    assert feats.shape == (2000, 784)
    value = F.fid_from_features(feats[:1000], feats[1000:])
    print(f"\nMNIST pixel FID, 1000 vs 1000 disjoint training images: {value:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")
    # shared/bench/README.md: real-vs-real floor 2.96 at 1000 vs 1000. Over 8 random disjoint
    # pairs of subsets this implementation gave 2.99 ± 0.12 (min 2.86, max 3.21), so [2.5, 3.5] is
    # ≈ ±4σ around the floor — a wrong pixel scale (e.g. [−1, 1]: ×4) or a missing cross term
    # would land far outside.
    assert 2.5 <= value <= 3.5

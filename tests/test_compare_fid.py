"""evaluation.paired_fid_draws (the paired multi-draw FID comparison) and the experiments.compare_fid CLI's refusals."""

import subprocess
import sys

import helpers
import numpy as np
import pytest

from ddpm_jax.evaluation import paired_fid_draws


def _images(n, seed):
    return np.random.default_rng(seed).uniform(0, 1, (n, 6, 6, 1)).astype(np.float32)


def test_paired_difference_of_a_constant_shift_is_exact():
    """Shifting every pixel by c leaves each chunk's covariance unchanged, so per draw
    FID(x + c, R) − FID(x, R) = ‖μ_x + c − μ_R‖² − ‖μ_x − μ_R‖² = 2c Σ_p (μ_x − μ_R)_p + d c²
    exactly; only float32 rounding of x + c (~1e-7 relative) separates the two, hence rtol 1e-4."""
    pool, x, c = _images(400, 0), _images(300, 1), 0.05
    r = paired_fid_draws({"x": x, "same": x.copy(), "shifted": x + c}, pool, num=100, draws=3, seed=7)
    assert r["paired_differences"]["x - same"]["per_draw"] == [0.0, 0.0, 0.0]
    d = 36
    for i, diff in enumerate(r["paired_differences"]["x - shifted"]["per_draw"]):
        perm = np.random.default_rng(7 + i).permutation(400)
        gap = x[i * 100:(i + 1) * 100].reshape(100, -1).astype(np.float64).mean(0) - pool[perm[:100]].reshape(100, -1).astype(np.float64).mean(0)
        np.testing.assert_allclose(-diff, 2 * c * gap.sum() + d * c * c, rtol=1e-4)
    assert len(r["floor"]["fid"]) == 3 and r["floor"]["min"] > 0
    s = r["sets"]["x"]
    assert s["min"] <= s["mean"] <= s["max"] and s["sd"] > 0


@pytest.mark.parametrize("args,message", [
    (["--samples", "a=/nonexistent.npz"], "does not exist"),
    (["--samples", "nameonly"], "expected NAME=PATH"),
    (["--samples", "a={small}", "--num", "100", "--draws", "3"], "fewer than --num × --draws = 300"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, args, message):
    small = tmp_path / "s.npz"
    np.savez(small, samples=_images(50, 0))
    args = [a.format(small=small) for a in args]
    p = subprocess.run([sys.executable, "-m", "experiments.compare_fid", *args, "--data_path", str(tmp_path)],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]

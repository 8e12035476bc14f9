"""Schedules: the T+1 indexing convention, the closed forms, validation, and pytree behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules

# Identities below are checked in float64; the arrays are computed in float64 NumPy before the
# cast, so they agree with an independent float64 computation to a few ulps (1e-12 relative).
RTOL64 = 1e-12


@pytest.mark.parametrize("T,start,end", [(200, 1e-4, 0.1), (1000, 1e-4, 0.02), (1, 0.3, 0.3)])
def test_linear_schedule_indexing(x64, T, start, end):
    s = schedules.make_schedule("linear", T, beta_start=start, beta_end=end, dtype=jnp.float64)
    assert s.num_steps == T
    for arr in (s.betas, s.alphas, s.alpha_bars, s.alpha_bars_prev, s.posterior_variance, s.snr):
        assert arr.shape == (T + 1,)
    assert float(s.betas[0]) == 0.0 and float(s.alphas[0]) == 1.0 and float(s.alpha_bars[0]) == 1.0
    np.testing.assert_allclose(float(s.betas[1]), start, rtol=RTOL64)
    np.testing.assert_allclose(float(s.betas[T]), end, rtol=RTOL64)
    # ᾱ_t = ∏_{s<=t} (1 − β_s), computed independently with a Python loop.
    betas = np.linspace(start, end, T)
    abar, prod = [1.0], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    np.testing.assert_allclose(np.asarray(s.alpha_bars), abar, rtol=RTOL64)


def test_derived_quantities(x64):
    T = 50
    s = schedules.make_schedule("linear", T, beta_start=1e-3, beta_end=0.2, dtype=jnp.float64)
    b, a, ab = map(np.asarray, (s.betas, s.alphas, s.alpha_bars))
    t = np.arange(1, T + 1)
    np.testing.assert_allclose(np.asarray(s.alpha_bars_prev)[t], ab[t - 1], rtol=RTOL64)
    np.testing.assert_allclose(np.asarray(s.sqrt_alpha_bars), np.sqrt(ab), rtol=RTOL64)
    np.testing.assert_allclose(np.asarray(s.sqrt_one_minus_alpha_bars), np.sqrt(1 - ab), rtol=RTOL64)
    np.testing.assert_allclose(np.asarray(s.posterior_variance)[t], b[t] * (1 - ab[t - 1]) / (1 - ab[t]), rtol=RTOL64)
    assert float(s.posterior_variance[1]) == 0.0  # ᾱ_0 = 1: q(x_0 | x_1, x_0) is a point mass
    assert float(s.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(np.asarray(s.snr)[t], ab[t] / (1 - ab[t]), rtol=RTOL64)
    np.testing.assert_allclose(np.asarray(s.one_minus_alpha_bars), 1 - ab, rtol=1e-9)  # 1 − ᾱ_1 = β_1 ≈ 1e-3: cancellation costs 3 digits in the reference
    c0 = np.sqrt(ab[t - 1]) * b[t] / (1 - ab[t])
    ct = np.sqrt(a[t]) * (1 - ab[t - 1]) / (1 - ab[t])
    np.testing.assert_allclose(np.asarray(s.posterior_coef_x0)[t], c0, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(s.posterior_coef_xt)[t], ct, rtol=1e-9, atol=1e-300)
    assert float(s.posterior_coef_x0[1]) == 1.0 and float(s.posterior_coef_xt[1]) == 0.0
    assert np.isinf(float(s.snr[0]))
    assert np.all(np.diff(np.asarray(s.snr)[1:]) < 0)  # SNR strictly decreases in t


def test_cosine_schedule(x64):
    T, s_off = 1000, 0.008
    s = schedules.make_schedule("cosine", T, dtype=jnp.float64)
    b = np.asarray(s.betas)[1:]
    assert np.all((b > 0) & (b < 1))
    assert np.isclose(b.max(), 0.999)  # Nichol & Dhariwal clip β at 0.999: the last steps hit it
    f = np.cos((np.arange(T + 1) / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
    abar_closed = f / f[0]
    unclipped = np.flatnonzero(b < 0.999)  # before the first clipped β, ᾱ_t is the closed form
    first_clip = np.flatnonzero(b >= 0.999)[0]
    np.testing.assert_allclose(np.asarray(s.alpha_bars)[: first_clip + 1], abar_closed[: first_clip + 1], rtol=1e-10)
    assert unclipped.size > 0.99 * T


def test_float32_schedule_keeps_small_t_precision():
    """1 − ᾱ_1 = β_1 = 1e-4 exactly in the float32 arrays, though float32(ᾱ_1) cannot resolve it."""
    s = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)
    assert s.betas.dtype == jnp.float32
    np.testing.assert_allclose(float(s.one_minus_alpha_bars[1]), 1e-4, rtol=1e-7)  # float32 eps 1.2e-7
    assert abs(float(1.0 - s.alpha_bars[1]) - 1e-4) > 1e-9  # what naive subtraction would give
    assert float(s.posterior_coef_x0[1]) == 1.0


def test_quadratic_schedule(x64):
    s = schedules.make_schedule("quadratic", 10, beta_start=1e-4, beta_end=0.02, dtype=jnp.float64)
    np.testing.assert_allclose(np.sqrt(np.asarray(s.betas)[1:]), np.linspace(1e-2, 0.02**0.5, 10), rtol=RTOL64)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(name="linear", num_steps=0), "T = 0"),
        (dict(name="linear", num_steps=-3), "T = -3"),
        (dict(name="linear", num_steps=2.5), "2.5"),
        (dict(name="linear", num_steps=10, beta_end=1.0), "beta_10 = "),
        (dict(name="linear", num_steps=10, beta_start=0.0), "beta_1 = "),
        (dict(name="linear", num_steps=10, beta_start=-0.1), "-0.1"),
        (dict(name="linear", num_steps=10, beta_end=float("nan")), "nan"),
        (dict(name="cosine", num_steps=10, max_beta=1.0), "beta_10 = "),
        (dict(name="sigmoidal", num_steps=10), "known schedules"),
        (dict(name="linear", num_steps=10, beta_max=0.1), "beta_max"),
    ],
)
def test_validation_errors_name_the_bad_value(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        schedules.make_schedule(**kwargs)
    assert fragment in str(e.value)


def test_schedule_from_betas_rejects_bad_shapes():
    with pytest.raises(ValueError, match="length T >= 1"):
        schedules.schedule_from_betas([])
    with pytest.raises(ValueError, match="1-D"):
        schedules.schedule_from_betas(np.full((2, 2), 0.1))


def test_schedule_is_a_pytree_and_one_compile_serves_same_T():
    traces = []

    @jax.jit
    def f(s, t):
        traces.append(s.num_steps)
        return s.sqrt_alpha_bars[t] * s.posterior_variance[t]

    lin = schedules.make_schedule("linear", 100)
    cos = schedules.make_schedule("cosine", 100)
    out_lin, out_cos = f(lin, 50), f(cos, 50)
    assert len(traces) == 1  # same T: the schedule is an argument, not a compile-time constant
    assert not np.isclose(float(out_lin), float(out_cos))
    np.testing.assert_allclose(float(out_cos), float(cos.sqrt_alpha_bars[50] * cos.posterior_variance[50]), rtol=1e-6)
    f(schedules.make_schedule("linear", 200), 50)
    assert len(traces) == 2  # T is static: a new T is a new program
    leaves = jax.tree_util.tree_leaves(lin)
    assert all(leaf.shape == (101,) for leaf in leaves)


def test_register_schedule():
    schedules.register_schedule("constant_test", lambda T, beta=0.1: np.full(T, beta))
    try:
        s = schedules.make_schedule("constant_test", 4, beta=0.5)
        np.testing.assert_allclose(np.asarray(s.alpha_bars), [1, 0.5, 0.25, 0.125, 0.0625], rtol=1e-6)
    finally:
        del schedules.SCHEDULES["constant_test"]

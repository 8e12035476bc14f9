"""The forward process and its posterior, checked against independent derivations.

Exact identities run in float64 (tolerance 1e-10 relative: a few hundred ulps after ~T
multiplications). Monte Carlo checks state their standard errors: for N draws with standard
deviation σ the mean has SE σ/√N and the sample variance SE σ²·√(2/(N−1)); we allow 5 SE
(a false failure rate below 1e-6 per check).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, schedules

RTOL64 = 1e-10
T = 100


@pytest.fixture
def sched64(x64):
    return schedules.make_schedule("linear", T, beta_start=1e-4, beta_end=0.05, dtype=jnp.float64)


def _x0(key, shape=(16, 4, 4, 2)):
    return jax.random.uniform(key, shape, jnp.float64, -1.0, 1.0)


def test_closed_form_marginal_equals_chain_recursion(sched64):
    """q(x_t | x_0) = N(√ᾱ_t x_0, 1 − ᾱ_t): the moments of the step-by-step chain
    x_t = √α_t x_{t−1} + √(1 − α_t) ε obey m_t = √α_t m_{t−1}, v_t = α_t v_{t−1} + β_t."""
    s = sched64
    x0 = np.asarray(_x0(jax.random.PRNGKey(0)))
    m, v = x0.copy(), 0.0
    for t in range(1, T + 1):
        m = np.sqrt(float(s.alphas[t])) * m
        v = float(s.alphas[t]) * v + float(s.betas[t])
        if t in (1, 2, 10, 50, T):
            tt = jnp.full((x0.shape[0],), t)
            mean, var = diffusion.q_mean_variance(s, jnp.asarray(x0), tt)
            np.testing.assert_allclose(np.asarray(mean), m, rtol=RTOL64)
            np.testing.assert_allclose(np.asarray(var).ravel(), v, rtol=RTOL64)


def test_closed_form_marginal_equals_simulated_chain(sched64):
    """Monte Carlo: run q_step T times from one x_0 and compare the empirical moments of x_t
    with q_mean_variance / q_sample at several t."""
    s = sched64
    n = 100_000
    x0 = jnp.array([0.7, -0.3])[None, :].repeat(n, 0)  # (N, 2): two 'pixels'
    key = jax.random.PRNGKey(1)

    def step(x, t):
        xt = diffusion.q_step(s, x, jnp.full((n,), t), jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype))
        return xt, xt[:, :]

    _, xs = jax.lax.scan(step, x0, jnp.arange(1, T + 1))  # xs[t-1] = x_t
    for t in (1, 5, 30, T):
        mean, var = diffusion.q_mean_variance(s, x0[:1], jnp.array([t]))
        emp_mean, emp_var = xs[t - 1].mean(0), xs[t - 1].var(0, ddof=1)
        sd = float(jnp.sqrt(var[0, 0]))
        np.testing.assert_allclose(emp_mean, mean[0], atol=5 * sd / np.sqrt(n))
        np.testing.assert_allclose(emp_var, float(var[0, 0]), atol=5 * sd**2 * np.sqrt(2 / (n - 1)))
        # and the closed-form sampler has the same law
        direct = diffusion.q_sample(s, x0, jnp.full((n,), t), jax.random.normal(jax.random.PRNGKey(2 + t), x0.shape, x0.dtype))
        np.testing.assert_allclose(direct.mean(0), mean[0], atol=5 * sd / np.sqrt(n))
        np.testing.assert_allclose(direct.var(0, ddof=1), float(var[0, 0]), atol=5 * sd**2 * np.sqrt(2 / (n - 1)))


def _joint_moments(s, x0, t):
    """Moments of (x_{t−1}, x_t) | x_0 derived from the chain, independently of q_posterior:
    x_{t−1} ~ N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}),  x_t = √α_t x_{t−1} + √β_t ε."""
    abar_prev = float(s.alpha_bars[t - 1])
    a, b = float(s.alphas[t]), float(s.betas[t])
    m1 = np.sqrt(abar_prev) * x0
    m2 = np.sqrt(a) * m1
    v11 = 1.0 - abar_prev
    v12 = np.sqrt(a) * v11
    v22 = a * v11 + b
    return m1, m2, v11, v12, v22


@pytest.mark.parametrize("t", [1, 2, 7, 50, T])
def test_q_posterior_is_gaussian_conditioning_of_the_joint(sched64, t):
    s = sched64
    key = jax.random.PRNGKey(t)
    x0 = np.asarray(_x0(key))
    xt = np.asarray(_x0(jax.random.fold_in(key, 1)) * 2.0)
    m1, m2, v11, v12, v22 = _joint_moments(s, x0, t)
    cond_mean = m1 + v12 / v22 * (xt - m2)  # E[x_{t−1} | x_t, x_0]
    cond_var = v11 - v12**2 / v22  # Var[x_{t−1} | x_t, x_0]
    mean, var = diffusion.q_posterior(s, jnp.asarray(x0), jnp.asarray(xt), jnp.full((x0.shape[0],), t))
    np.testing.assert_allclose(np.asarray(mean), cond_mean, rtol=RTOL64, atol=1e-13)
    np.testing.assert_allclose(np.asarray(var).ravel(), cond_var, rtol=RTOL64, atol=1e-15)


@pytest.mark.parametrize("t", [1, 3, 60])
def test_q_sample_pair_has_the_joint_law(sched64, t):
    s = sched64
    n = 200_000
    x0 = jnp.full((n, 1), 0.6)
    x_prev, x_t = diffusion.q_sample_pair(s, x0, jnp.full((n,), t), jax.random.PRNGKey(10 + t))
    if t == 1:
        np.testing.assert_array_equal(np.asarray(x_prev), np.asarray(x0))  # ᾱ_0 = 1, β̃_1 = 0
    m1, m2, v11, v12, v22 = _joint_moments(s, 0.6, t)
    a, b = np.asarray(x_prev[:, 0]), np.asarray(x_t[:, 0])
    np.testing.assert_allclose(b.mean(), m2, atol=5 * np.sqrt(v22 / n))
    np.testing.assert_allclose(b.var(ddof=1), v22, atol=5 * v22 * np.sqrt(2 / (n - 1)))
    if t > 1:
        np.testing.assert_allclose(a.mean(), m1, atol=5 * np.sqrt(v11 / n))
        np.testing.assert_allclose(a.var(ddof=1), v11, atol=5 * v11 * np.sqrt(2 / (n - 1)))
        # SE of a sample covariance of a bivariate normal: √((v11 v22 + v12²)/N).
        cov = np.mean((a - a.mean()) * (b - b.mean()))
        np.testing.assert_allclose(cov, v12, atol=5 * np.sqrt((v11 * v22 + v12**2) / n))


def test_q_sample_pair_shares_x_t_with_q_sample(sched64):
    s = sched64
    x0 = _x0(jax.random.PRNGKey(3))
    t = jnp.arange(1, 17)
    key = jax.random.PRNGKey(4)
    _, x_t = diffusion.q_sample_pair(s, x0, t, key)
    k_t, _ = jax.random.split(key)
    np.testing.assert_array_equal(x_t, diffusion.q_sample(s, x0, t, jax.random.normal(k_t, x0.shape, x0.dtype)))


def test_posterior_mean_in_terms_of_eps(sched64):
    """μ̃_t(x_t, x_0) = (x_t − (1 − α_t)/√(1 − ᾱ_t) ε)/√α_t when x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    s = sched64
    key = jax.random.PRNGKey(5)
    x0 = _x0(key, (T, 3, 3, 1))
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, x0.dtype)
    t = jnp.arange(1, T + 1)
    x_t = diffusion.q_sample(s, x0, t, eps)
    mu_tilde, _ = diffusion.q_posterior(s, x0, x_t, t)
    a = s.alphas[t][:, None, None, None]
    abar = s.alpha_bars[t][:, None, None, None]
    by_hand = (x_t - (1 - a) / jnp.sqrt(1 - abar) * eps) / jnp.sqrt(a)
    np.testing.assert_allclose(np.asarray(mu_tilde), np.asarray(by_hand), rtol=RTOL64, atol=1e-12)
    np.testing.assert_allclose(np.asarray(diffusion.mean_from_eps(s, x_t, t, eps)), np.asarray(by_hand), rtol=RTOL64, atol=1e-12)


@pytest.mark.parametrize("param", diffusion.PARAMETERISATIONS)
def test_conversions_are_consistent(sched64, param):
    """Every parameterisation's true target maps back to the true (x_0, ε)."""
    s = sched64
    key = jax.random.PRNGKey(6)
    x0 = _x0(key, (T, 2, 2, 1))
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, x0.dtype)
    # t = 1 is excluded for 'mean' and 'x0' round trips through μ: at t = 1, μ̃_1 = x_0 carries no ε.
    t = jnp.arange(1, T + 1) if param not in ("mean",) else jnp.arange(2, T + 2).clip(max=T)
    x_t = diffusion.q_sample(s, x0, t, eps)
    target = {
        "eps": eps,
        "x0": x0,
        "v": diffusion.predict_v(s, x0, t, eps),
        "mean": diffusion.q_posterior(s, x0, x_t, t)[0],
    }[param]
    x0_hat, eps_hat = diffusion.x0_eps_from_prediction(s, x_t, t, target, param)
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), rtol=1e-8, atol=1e-8)
    mu = diffusion.mean_from_prediction(s, x_t, t, target, param)
    np.testing.assert_allclose(np.asarray(mu), np.asarray(diffusion.q_posterior(s, x0, x_t, t)[0]), rtol=1e-8, atol=1e-10)


def test_unknown_parameterisation():
    s = schedules.make_schedule("linear", 10)
    x = jnp.zeros((2, 2, 2, 1))
    with pytest.raises(ValueError, match="expected one of"):
        diffusion.x0_eps_from_prediction(s, x, jnp.array([1, 2]), x, "score")


def test_jit_and_vmap_agree_with_batched(sched64):
    s = sched64
    key = jax.random.PRNGKey(7)
    x0 = _x0(key, (8, 4, 4, 1))
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, x0.dtype)
    t = jnp.array([1, 2, 3, 5, 8, 13, 21, 34])
    batched = diffusion.q_sample(s, x0, t, noise)
    per_example = jax.vmap(lambda a, b, c: diffusion.q_sample(s, a[None], b[None], c[None])[0])(x0, t, noise)
    jitted = jax.jit(diffusion.q_sample)(s, x0, t, noise)
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(batched), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(batched), rtol=1e-14)
    mean, var = jax.vmap(lambda a, b, c: diffusion.q_posterior(s, a[None], b[None], c[None]))(x0, batched, t)
    bmean, bvar = diffusion.q_posterior(s, x0, batched, t)
    np.testing.assert_allclose(np.asarray(mean[:, 0]), np.asarray(bmean), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(var).ravel(), np.asarray(bvar).ravel(), rtol=1e-14)

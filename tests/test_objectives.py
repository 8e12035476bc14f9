"""Objectives: targets, weightings, the Rao-Blackwell relation, and the notebook's 1/d claim.

Monte Carlo tolerances are 5 standard errors of the estimated quantity (false-failure rate
below 1e-6 per check); exact identities are float64 to 1e-10 relative, or float32 to a few
units of its epsilon 1.2e-7 where stated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import analytic, diffusion, objectives, rng, schedules

T = 50


@pytest.fixture
def sched64(x64):
    return schedules.make_schedule("linear", T, beta_start=1e-3, beta_end=0.2, dtype=jnp.float64)


def eps_model(x, t):
    """A fixed, non-trivial ε-predictor (depends on x and t)."""
    tt = t.astype(x.dtype)[:, None, None, None]
    return 0.4 * x + 0.1 * jnp.sin(tt) + 0.05 * jnp.cos(3.0 * x)


def _x0(key, n=64, shape=(4, 4, 1), dtype=jnp.float64):
    return jax.random.uniform(key, (n,) + shape, dtype, 0.0, 1.0)


def test_timesteps_uniform_on_1_to_T_inclusive():
    n = 200_000
    t = np.asarray(objectives.sample_timesteps(jax.random.PRNGKey(0), n, T))
    assert t.min() == 1 and t.max() == T  # T itself is drawn (the notebook's randint(1, T) never is)
    counts = np.bincount(t, minlength=T + 1)[1:]
    # Each count is Binomial(n, 1/T): sd = √(n p (1 − p)); allow 5 sd.
    p = 1.0 / T
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p)))


def test_same_key_same_t_and_x_t_across_objectives(sched64):
    x0 = _x0(jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    seen = {}
    for name in objectives.OBJECTIVES:
        def model(x, t, name=name):
            seen[name] = (x, t)
            return jnp.zeros_like(x)
        objectives.get_objective(name)(model, sched64, x0, key)
    ref_x, ref_t = seen["eps"]
    for name, (x, t) in seen.items():
        np.testing.assert_array_equal(np.asarray(t), np.asarray(ref_t), err_msg=name)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref_x), err_msg=name)


def test_mean_matching_through_eps_equals_elbo_weighted_eps_loss(sched64):
    """‖μ̃_t − μ_θ‖²/(2β_t) with μ_θ = (x_t − β_t/√(1−ᾱ_t) ε_θ)/√α_t equals
    (1−α_t)/(2α_t(1−ᾱ_t)) ‖ε − ε_θ‖², example by example. The 'mean' loss also carries the
    parameter-free d β̃_t/(2β_t), which is subtracted here."""
    s = sched64
    x0 = _x0(jax.random.PRNGKey(3), n=256)
    key = jax.random.PRNGKey(4)
    mean_model = lambda x, t: diffusion.mean_from_eps(s, x, t, eps_model(x, t))  # noqa: E731
    _, aux_mean = objectives.mean_loss(mean_model, s, x0, key)
    _, aux_eps = objectives.eps_loss(eps_model, s, x0, key, weighting="elbo")
    t = aux_mean["t"]
    d = np.prod(x0.shape[1:])
    const = d * s.posterior_variance[t] / (2 * s.betas[t])
    np.testing.assert_allclose(np.asarray(aux_mean["per_example"] - const), np.asarray(aux_eps["per_example"]), rtol=1e-9)
    assert len(np.unique(np.asarray(t))) > 20  # many different t were covered


@pytest.mark.parametrize("param", ["x0", "v", "mean"])
def test_elbo_weighting_is_the_same_kl_in_every_parameterisation(sched64, param):
    """λ_p(t)‖target − pred‖² = ‖μ̃_t − μ_θ‖²/(2β_t) with μ_θ implied by pred, for each p."""
    s = sched64
    x0 = _x0(jax.random.PRNGKey(5), n=128)
    key = jax.random.PRNGKey(6)

    def model(x, t):  # the same ε-predictor expressed in parameterisation `param`
        eps = eps_model(x, t)
        x0_hat = diffusion.predict_x0_from_eps(s, x, t, eps)
        return {"x0": x0_hat, "v": diffusion.predict_v(s, x0_hat, t, eps), "mean": diffusion.mean_from_eps(s, x, t, eps)}[param]

    loss_fn = {"x0": objectives.x0_loss, "v": objectives.v_loss, "mean": objectives.mean_loss}[param]
    _, aux = loss_fn(model, s, x0, key, weighting="elbo")
    _, aux_eps = objectives.eps_loss(eps_model, s, x0, key, weighting="elbo")
    per = aux["per_example"]
    if param == "mean":
        per = per - np.prod(x0.shape[1:]) * s.posterior_variance[aux["t"]] / (2 * s.betas[aux["t"]])
    np.testing.assert_allclose(np.asarray(per), np.asarray(aux_eps["per_example"]), rtol=1e-8)


def test_expected_xprev_error_decomposes(sched64):
    """E_{x_{t−1} ~ q(·|x_t,x_0)} ‖x_{t−1} − μ‖² = ‖μ̃_t − μ‖² + d β̃_t, for a fixed μ."""
    s = sched64
    n, t = 400_000, 7
    x0 = jnp.array([[0.2, 0.9, 0.5]])
    x_t = diffusion.q_sample(s, x0, jnp.array([t]), jnp.array([[0.3, -1.2, 0.8]]))
    mu = jnp.array([[0.1, 0.4, 0.7]])  # an arbitrary model output
    mu_tilde, var = diffusion.q_posterior(s, x0, x_t, jnp.array([t]))
    z = jax.random.normal(jax.random.PRNGKey(7), (n, 3), jnp.float64)
    sq = jnp.sum((mu_tilde + jnp.sqrt(var) * z - mu) ** 2, axis=1)
    expected = float(jnp.sum((mu_tilde - mu) ** 2) + 3 * var[0, 0])
    se = float(jnp.std(sq)) / np.sqrt(n)
    assert abs(float(jnp.mean(sq)) - expected) < 5 * se


def test_rao_blackwell_same_mean_lower_variance(sched64):
    """'mean' is E['xprev' | x_0, x_t] (same key -> same t, x_t): equal expectations and a
    variance that is no larger. The variance gap equals E[Var(xprev | x_0, x_t)] by the law of
    total variance; it is checked to be clearly positive here, since β̃_t > 0 for t ≥ 2."""
    s = sched64
    x0 = _x0(jax.random.PRNGKey(8), n=1)
    model = lambda x, t: diffusion.mean_from_eps(s, x, t, eps_model(x, t))  # noqa: E731
    keys = jax.random.split(jax.random.PRNGKey(9), 20_000)
    t = 10

    def both(k):
        a = objectives.xprev_loss(model, s, x0, k, t=t)[1]["per_example"][0]
        b = objectives.mean_loss(model, s, x0, k, t=t)[1]["per_example"][0]
        return a, b

    xprev, mean = jax.vmap(both)(keys)
    n = keys.shape[0]
    diff = np.asarray(xprev - mean)  # zero-mean given (x_0, x_t): E[xprev − mean] = 0
    assert abs(diff.mean()) < 5 * diff.std() / np.sqrt(n)
    assert float(jnp.var(mean)) < float(jnp.var(xprev))
    # Conditional variance of w‖a + √β̃ z‖² (a = μ̃ − μ, d pixels): w²(4β̃‖a‖² + 2dβ̃²) > 0.
    assert float(jnp.var(xprev) - jnp.var(mean)) > 0.1 * float(jnp.var(xprev - mean))


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_optimal_gaussian_denoiser_attains_the_analytic_minimum(sched64, name):
    """For x_0 ~ N(m, s²), E[loss] of the Bayes-optimal model has a closed form per t.
    This checks each objective's *target* (a wrong target cannot reach the minimum)."""
    s = sched64
    m, sd, n, d = 0.3, 0.7, 50_000, 3
    x0 = m + sd * jax.random.normal(jax.random.PRNGKey(11), (n, d), jnp.float64)
    param = objectives.PREDICTS[name]
    model = analytic.gaussian_data_denoiser(s, m, sd, param)
    for t in (2, 20, T):
        _, aux = objectives.get_objective(name)(model, s, x0, jax.random.PRNGKey(t), t=t)
        abar, one_minus = float(s.alpha_bars[t]), float(s.one_minus_alpha_bars[t])
        v_t = abar * sd**2 + one_minus
        var_x0 = sd**2 * one_minus / v_t  # Var[x_0 | x_t]
        beta, beta_tilde, c0 = float(s.betas[t]), float(s.posterior_variance[t]), float(s.posterior_coef_x0[t])
        expected = {
            "eps": d * abar * sd**2 / v_t,  # Var[ε | x_t] = 1 − (1 − ᾱ)/v_t
            "x0": d * var_x0,
            "v": d * sd**2 / v_t,  # v − v̂ = (ε − ε̂)/√ᾱ_t
            "mean": d * (c0**2 * var_x0 + beta_tilde) / (2 * beta),
            "xprev": d * (c0**2 * var_x0 + beta_tilde) / (2 * beta),
        }[name]
        per = np.asarray(aux["per_example"])
        assert abs(per.mean() - expected) < 5 * per.std() / np.sqrt(n), (name, t, per.mean(), expected)
        # and any perturbation of the optimum does worse, by more than the noise
        worse = lambda x, tt: model(x, tt) + 0.1  # noqa: E731
        per_worse = np.asarray(objectives.get_objective(name)(worse, s, x0, jax.random.PRNGKey(t), t=t)[1]["per_example"])
        gap = per_worse - per
        assert gap.mean() > 5 * gap.std() / np.sqrt(n)


class TestPerPixelMeanReduction:
    """The notebook: the per-pixel mean 'reduces the estimator's variance by 1/d'.
    What is true: per-pixel mean = sum / d, so the variance scales by 1/d², the coefficient of
    variation is unchanged, and Adam's update is (nearly) unchanged."""

    def _losses(self, reduction, keys, x0, s):
        model = lambda x, t: 0.9 * x  # noqa: E731
        return jax.vmap(lambda k: objectives.xprev_loss(model, s, x0, k, reduction=reduction)[0])(keys)

    def test_variance_scales_by_one_over_d_squared_and_cv_is_unchanged(self):
        s = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)
        x0 = jax.random.uniform(jax.random.PRNGKey(12), (8, 28, 28, 1))
        d = 28 * 28
        keys = jax.random.split(jax.random.PRNGKey(13), 2000)
        l_sum, l_mean = self._losses("sum", keys, x0, s), self._losses("mean", keys, x0, s)
        # Same draws, so the estimators differ by the constant factor d exactly (float32: the sum
        # of 784 terms in two orders differs by ~784·eps relative at most; 1e-4 is generous).
        np.testing.assert_allclose(np.asarray(l_mean) * d, np.asarray(l_sum), rtol=1e-4)
        var_ratio = float(jnp.var(l_mean) / jnp.var(l_sum))
        np.testing.assert_allclose(var_ratio, 1.0 / d**2, rtol=1e-3)  # not 1/d
        cv = lambda l: float(jnp.std(l) / jnp.mean(l))  # noqa: E731
        np.testing.assert_allclose(cv(l_mean), cv(l_sum), rtol=1e-3)

    def test_adam_update_is_nearly_invariant_sgd_is_not(self, x64):
        s = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1, dtype=jnp.float64)
        x0 = jax.random.uniform(jax.random.PRNGKey(14), (16, 8, 8, 1), jnp.float64)
        d = 64
        params0 = {"w": jnp.array(0.5), "b": jnp.array(0.1)}

        def loss(p, key, reduction):
            model = lambda x, t: p["w"] * x + p["b"]  # noqa: E731
            return objectives.xprev_loss(model, s, x0, key, reduction=reduction)[0]

        def run(opt, reduction, steps=25):
            p, state = params0, opt.init(params0)
            updates_seen = []
            for i in range(steps):
                g = jax.grad(loss)(p, jax.random.PRNGKey(100 + i), reduction)
                u, state = opt.update(g, state, p)
                updates_seen.append(u)
                p = optax.apply_updates(p, u)
            return p, state, updates_seen

        lr, eps = 1e-2, 1e-8
        p_sum, state_sum, _ = run(optax.adam(lr, eps=eps), "sum")
        p_mean, _, _ = run(optax.adam(lr, eps=eps), "mean")
        # Per step, Adam's update with gradient g/d is lr·m̂/(√v̂ + d·ε) instead of lr·m̂/(√v̂ + ε):
        # they differ by at most lr·(d−1)·ε/√v̂ (using |m̂| ≲ √v̂). Over K steps, ≤ K·lr·d·ε/min √v̂.
        nu = state_sum[0].nu
        bound = 25 * lr * d * eps / float(min(jnp.sqrt(nu["w"]), jnp.sqrt(nu["b"])))
        for k in params0:
            assert abs(float(p_sum[k] - p_mean[k])) <= max(bound, 1e-12), (k, p_sum[k], p_mean[k], bound)
        # with ε = 0 the invariance is exact (to float64 rounding)
        p_sum0, _, _ = run(optax.adam(lr, eps=0.0), "sum")
        p_mean0, _, _ = run(optax.adam(lr, eps=0.0), "mean")
        for k in params0:
            np.testing.assert_allclose(float(p_sum0[k]), float(p_mean0[k]), rtol=1e-10)
        # SGD is not invariant: its first update is d times smaller with the mean reduction.
        _, _, u_sum = run(optax.sgd(lr), "sum", steps=1)
        _, _, u_mean = run(optax.sgd(lr), "mean", steps=1)
        np.testing.assert_allclose(float(u_sum[0]["w"] / u_mean[0]["w"]), d, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(name="score"), "valid objectives: ['eps', 'mean', 'v', 'x0', 'xprev']"),
        (dict(name="eps", weighting="snr"), "('elbo', 'simple', 'min_snr', 'p2', 'edm')"),
        (dict(name="eps", reduction="max"), "('sum', 'mean')"),
    ],
)
def test_bad_names_raise_listing_valid_ones(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        objectives.get_objective(**kwargs)
    assert fragment in str(e.value)


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_every_objective_jits_and_differentiates(name):
    s = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)
    x0 = jax.random.uniform(jax.random.PRNGKey(15), (4, 8, 8, 1))
    fn = objectives.get_objective(name)

    def loss(w, key):
        return fn(lambda x, t: w * x, s, x0, key)[0]

    val, g = jax.jit(jax.value_and_grad(loss))(jnp.float32(0.3), jax.random.PRNGKey(16))
    assert np.isfinite(float(val)) and np.isfinite(float(g)) and float(g) != 0.0


def test_callable_weighting(sched64):
    x0 = _x0(jax.random.PRNGKey(17))
    key = jax.random.PRNGKey(18)
    _, simple = objectives.eps_loss(eps_model, sched64, x0, key)
    _, custom = objectives.eps_loss(eps_model, sched64, x0, key, weighting=lambda s, t: s.snr[t])
    np.testing.assert_allclose(np.asarray(custom["per_example"]), np.asarray(simple["per_example"] * sched64.snr[simple["t"]]), rtol=1e-12)


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_per_example_keys_make_draws_independent_of_the_batch_split(name):
    """With one key per example, the loss terms of a batch equal those of its halves computed
    apart: what data parallelism over devices needs to match a single device exactly."""
    s = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)
    x0 = jax.random.uniform(jax.random.PRNGKey(19), (8, 4, 4, 1))
    keys = rng.per_example_keys(jax.random.PRNGKey(20), jnp.arange(8))
    fn = objectives.get_objective(name)
    model = lambda x, t: 0.5 * x  # noqa: E731
    _, whole = fn(model, s, x0, keys)
    _, a = fn(model, s, x0[:3], keys[:3])
    _, b = fn(model, s, x0[3:], keys[3:])
    np.testing.assert_array_equal(np.asarray(whole["t"]), np.concatenate([a["t"], b["t"]]))
    np.testing.assert_allclose(np.asarray(whole["per_example"]), np.concatenate([a["per_example"], b["per_example"]]), rtol=1e-6)
    assert len(np.unique(np.asarray(whole["t"]))) > 1  # examples do get different draws

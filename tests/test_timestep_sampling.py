"""train.t_sampling: the distributions, the draw, the importance history, and Monte Carlo checks
that each estimator is unbiased for the objective it claims (ddpm_jax.timestep_sampling).

Reference: Gaussian data x_0 ~ N(m, s² I) in d dimensions and its exact ε-denoiser
(ddpm_jax.analytic), for which the ε-term's expectation at t is known in closed form:
E‖ε − E[ε|x_t]‖² = d ᾱ_t s² / v_t, v_t = ᾱ_t s² + 1 − ᾱ_t (the conditional variance of ε).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import analytic, objectives, rng, timestep_sampling, weightings
from ddpm_jax.schedules import make_schedule

T = 50
MEAN, STD, DIM = 0.3, 0.7, 4


def _schedule():
    return make_schedule("linear", T, beta_start=1e-3, beta_end=0.2)


def _exact_terms(schedule, weighting):
    """(T+1,) E[w_t ‖ε − E[ε|x_t]‖²] for each t (row 0 unused), float64."""
    abar = np.asarray(schedule.alpha_bars, np.float64)
    v = abar * STD**2 + 1.0 - abar
    t = jnp.arange(1, T + 1)
    w = np.ones(T + 1)
    if weighting != "simple":
        w[1:] = np.asarray(weightings.snr_weight(weighting, schedule, t, "eps", **weightings.DEFAULTS[weighting]), np.float64)
    out = w * DIM * abar * STD**2 / v
    out[0] = 0.0
    return out


def test_log_normal_probs_are_the_normal_mass_of_each_interval():
    sched = _schedule()
    p = np.asarray(timestep_sampling.log_normal_probs(sched, -1.2, 1.2), np.float64)
    assert p.shape == (T + 1,) and p[0] == 0.0 and np.all(p[1:] > 0)
    assert abs(p.sum() - 1.0) < 1e-6  # float32 differences of a CDF
    ls = 0.5 * np.log((1 - np.asarray(sched.alpha_bars[1:], np.float64)) / np.asarray(sched.alpha_bars[1:], np.float64))
    assert np.all(np.diff(ls) > 0)
    phi = lambda x: 0.5 * (1 + math.erf((x + 1.2) / (1.2 * math.sqrt(2))))  # noqa: E731
    for t in (1, 7, 25, T):
        lo = -math.inf if t == 1 else 0.5 * (ls[t - 2] + ls[t - 1])
        hi = math.inf if t == T else 0.5 * (ls[t - 1] + ls[t])
        want = (phi(hi) if hi < math.inf else 1.0) - (phi(lo) if lo > -math.inf else 0.0)
        assert abs(p[t] - want) < 1e-6, t  # float32 ndtr (~1e-7 absolute)


def test_draw_follows_the_probabilities():
    probs = jnp.asarray(np.r_[0.0, np.linspace(1.0, 3.0, T)] / np.linspace(1.0, 3.0, T).sum(), jnp.float32)
    n = 100_000
    keys = rng.per_example_keys(jax.random.PRNGKey(0), jnp.arange(n))
    t, c = timestep_sampling.draw(keys, n, probs, correct=True)
    t = np.asarray(t)
    assert t.min() >= 1 and t.max() <= T
    counts = np.bincount(t, minlength=T + 1)
    expected = n * np.asarray(probs, np.float64)
    # each count is binomial: within 5 standard deviations (all T bins: a false alarm ~ T · 6e-7)
    sd = np.sqrt(expected[1:] * (1 - np.asarray(probs[1:], np.float64)))
    assert np.all(np.abs(counts[1:] - expected[1:]) < 5 * sd)
    np.testing.assert_allclose(np.asarray(c), 1.0 / (T * np.asarray(probs)[t]), rtol=1e-6)
    _, ones = timestep_sampling.draw(keys, n, probs, correct=False)
    assert np.all(np.asarray(ones) == 1.0)


def test_draw_uses_the_objectives_half_of_the_key_so_the_noise_is_unchanged():
    """The t drawn here replaces the objective's own; ε (from the other half) is the same."""
    sched = _schedule()
    x0 = jnp.zeros((8, DIM))
    keys = rng.per_example_keys(jax.random.PRNGKey(3), jnp.arange(8))
    probs = timestep_sampling.log_normal_probs(sched, -1.2, 1.2)
    t, _ = timestep_sampling.draw(keys, 8, probs, correct=False)
    _, eps_a, _ = objectives._draw(sched, x0, keys, None)
    t_b, eps_b, _ = objectives._draw(sched, x0, keys, t)
    np.testing.assert_array_equal(np.asarray(eps_a), np.asarray(eps_b))
    np.testing.assert_array_equal(np.asarray(t_b), np.asarray(t))


def _filled_history(rms_by_t):
    h = timestep_sampling.init_history(T, 3)
    terms = jnp.tile(jnp.asarray(rms_by_t, jnp.float32)[:, None], (1, 3))
    return timestep_sampling.History(terms=terms, count=jnp.full((T + 1,), 3, jnp.int32).at[0].set(0))._replace_check(h) \
        if False else timestep_sampling.History(terms=terms, count=jnp.full((T + 1,), 3, jnp.int32))


def test_importance_probs_uniform_until_full_then_rms_mixed_with_uniform():
    h = timestep_sampling.init_history(T, 3)
    p = np.asarray(timestep_sampling.importance_probs(h, 0.01))
    np.testing.assert_allclose(p[1:], 1.0 / T, rtol=1e-6)
    assert p[0] == 0.0
    rms = np.r_[0.0, np.arange(1, T + 1, dtype=np.float64)]
    h = _filled_history(rms)
    p = np.asarray(timestep_sampling.importance_probs(h, 0.01), np.float64)
    want = 0.99 * rms[1:] / rms[1:].sum() + 0.01 / T
    np.testing.assert_allclose(p[1:], want, rtol=1e-5)
    # one t short of H terms: still uniform
    h = timestep_sampling.History(terms=h.terms, count=h.count.at[17].set(2))
    np.testing.assert_allclose(np.asarray(timestep_sampling.importance_probs(h, 0.01))[1:], 1.0 / T, rtol=1e-6)


def test_update_history_appends_in_order_and_skips_invalid():
    h = timestep_sampling.init_history(5, 3)
    t = jnp.array([2, 2, 4, 2, 2, 3], jnp.int32)
    terms = jnp.array([1.0, 2.0, 9.0, 3.0, 4.0, 7.0], jnp.float32)
    valid = jnp.array([True, True, True, True, True, False])
    h = timestep_sampling.update_history(h, t, terms, valid)
    np.testing.assert_array_equal(np.asarray(h.terms[2]), [2.0, 3.0, 4.0])  # the oldest (1.0) dropped out
    np.testing.assert_array_equal(np.asarray(h.terms[4]), [0.0, 0.0, 9.0])
    np.testing.assert_array_equal(np.asarray(h.count), [0, 0, 3, 0, 1, 0])  # t = 3 was padding


@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
def test_importance_sampling_is_unbiased_for_the_uniform_objective(weighting):
    """E_{t~p}[ℓ_t/(T p_t)] = (1/T) Σ_t E[ℓ_t], with the exact denoiser; the uncorrected mean is not."""
    sched = _schedule()
    loss_fn = objectives.get_objective("eps", weighting=weighting)
    exact = _exact_terms(sched, weighting)
    target = exact[1:].mean()
    # a p far from uniform: the history's rms grows like t², so late t are drawn ~T² times more often
    rms = np.r_[0.0, np.arange(1, T + 1, dtype=np.float64) ** 2]
    probs = timestep_sampling.importance_probs(_filled_history(rms), 1e-3)
    n = 400_000
    keys = rng.per_example_keys(jax.random.PRNGKey(1), jnp.arange(n))
    x0 = MEAN + STD * jax.random.normal(jax.random.PRNGKey(2), (n, DIM))
    t, c = timestep_sampling.draw(keys, n, probs, correct=True)
    _, aux = loss_fn(analytic.gaussian_data_denoiser(sched, MEAN, STD, "eps"), sched, x0, keys, t=t)
    est = np.asarray(aux["per_example"], np.float64) * np.asarray(c, np.float64)
    se = est.std() / math.sqrt(n)
    # 4 standard errors: a false failure about 6e-5 of the time
    assert abs(est.mean() - target) < 4 * se, (est.mean(), target, se)
    raw = np.asarray(aux["per_example"], np.float64)
    assert abs(raw.mean() - target) > 10 * raw.std() / math.sqrt(n)  # without the 1/(T p) factor: biased


def test_log_normal_sampling_estimates_the_objective_it_defines():
    """E_{t~p}[ℓ_t] = Σ_t p_t E[ℓ_t] (EDM's training distribution), not the uniform objective."""
    sched = _schedule()
    loss_fn = objectives.get_objective("eps", weighting="simple")
    exact = _exact_terms(sched, "simple")
    probs = timestep_sampling.log_normal_probs(sched, -1.2, 1.2)
    target = float(np.sum(np.asarray(probs, np.float64) * exact))
    n = 400_000
    keys = rng.per_example_keys(jax.random.PRNGKey(5), jnp.arange(n))
    x0 = MEAN + STD * jax.random.normal(jax.random.PRNGKey(6), (n, DIM))
    t, _ = timestep_sampling.draw(keys, n, probs, correct=False)
    _, aux = loss_fn(analytic.gaussian_data_denoiser(sched, MEAN, STD, "eps"), sched, x0, keys, t=t)
    est = np.asarray(aux["per_example"], np.float64)
    se = est.std() / math.sqrt(n)
    assert abs(est.mean() - target) < 4 * se, (est.mean(), target, se)
    assert abs(est.mean() - exact[1:].mean()) > 10 * se  # a different objective from the uniform one


def test_probs_for_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="unknown t sampling 'lognormal'"):
        timestep_sampling.probs_for("lognormal", _schedule(), None)
    assert timestep_sampling.probs_for("uniform", _schedule(), None) is None

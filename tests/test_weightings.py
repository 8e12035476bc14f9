"""The SNR weightings (ddpm_jax/weightings.py): one weighting is the same loss, example by example,
whichever quantity the network predicts, and each equals its paper's form where the paper gives it."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, objectives, schedules, weightings
from ddpm_jax.config import ConfigError, validate_config
from helpers import REPO

SCHED = schedules.make_schedule("linear", 1000, beta_start=1e-4, beta_end=0.02)
T_ALL = jnp.arange(1, 1001)


def _x0_model(x_t, t):
    """An imperfect data predictor (so every error is non-zero), the same function of (x_t, t)
    behind every parameterisation below."""
    return 0.7 * jnp.tanh(x_t) + 1e-3 * t[:, None, None, None] ** 0.5


def _as(parameterisation):
    """The same network as ``_x0_model``, predicting ``parameterisation`` instead."""
    def fn(x_t, t):
        x0 = _x0_model(x_t, t)
        if parameterisation == "x0":
            return x0
        eps = diffusion.predict_eps_from_x0(SCHED, x_t, t, x0)
        return eps if parameterisation == "eps" else diffusion.predict_v(SCHED, x0, t, eps)
    return fn


@pytest.mark.parametrize("parameterisation", ["eps", "v", "mean"])
def test_error_scale_converts_each_error_to_the_data_error(x64, parameterisation):
    """‖x_0 − x̂_0‖² = c_p(t) ‖p − p̂‖² for p̂ and x̂_0 that imply each other (float64: the identity
    holds to round-off, checked to 1e-9 relative)."""
    s = schedules.make_schedule("linear", 1000, dtype=jnp.float64, beta_start=1e-4, beta_end=0.02)
    key = jax.random.PRNGKey(0)
    t = jnp.array([1, 2, 10, 250, 500, 999, 1000])
    x0, eps, x0_hat = (jax.random.normal(k, (7, 4, 4, 1), jnp.float64) for k in jax.random.split(key, 3))
    x_t = diffusion.q_sample(s, x0, t, eps)
    eps_hat = diffusion.predict_eps_from_x0(s, x_t, t, x0_hat)
    target, pred = {"eps": (eps, eps_hat),
                    "v": (diffusion.predict_v(s, x0, t, eps), diffusion.predict_v(s, x0_hat, t, eps_hat)),
                    "mean": (diffusion.mean_from_x0(s, x_t, t, x0), diffusion.mean_from_x0(s, x_t, t, x0_hat))}[parameterisation]
    lhs = jnp.sum((x0 - x0_hat) ** 2, axis=(1, 2, 3))
    rhs = weightings.error_scale(s, t, parameterisation) * jnp.sum((target - pred) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(rhs), np.asarray(lhs), rtol=1e-9)


@pytest.mark.parametrize("name", weightings.SNR_WEIGHTINGS)
def test_one_weighting_is_the_same_loss_in_every_parameterisation(name):
    """x0, ε and v objectives with weighting ``name`` give the same per-example loss on the same
    draws. Float32: the losses are sums of 16 squares through ᾱ_t down to 4e-5, so 1e-4 relative
    (a few hundred ulps of the conversions at t near T)."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (64, 4, 4, 1), minval=-1.0, maxval=1.0)
    key = jax.random.PRNGKey(2)
    per = {p: np.asarray(objectives.get_objective(p, weighting=name)(_as(p), SCHED, x, key)[1]["per_example"])
           for p in ("x0", "eps", "v")}
    assert np.all(per["x0"] > 0)
    np.testing.assert_allclose(per["eps"], per["x0"], rtol=1e-4)
    np.testing.assert_allclose(per["v"], per["x0"], rtol=1e-4)


def test_each_weighting_is_its_papers_form():
    snr = SCHED.snr[T_ALL]
    w = lambda name, p, **kw: weightings.snr_weight(name, SCHED, T_ALL, p, **kw)  # noqa: E731
    # Min-SNR-γ: min(SNR, γ)/SNR on ε, min(SNR, γ)/(SNR + 1) on v, min(SNR, γ) on x_0
    np.testing.assert_allclose(w("min_snr", "eps", gamma=5.0), jnp.minimum(snr, 5.0) / snr, rtol=1e-6)
    np.testing.assert_allclose(w("min_snr", "v", gamma=5.0), jnp.minimum(snr, 5.0) / (snr + 1.0), rtol=1e-5)
    np.testing.assert_allclose(w("min_snr", "x0", gamma=5.0), jnp.minimum(snr, 5.0), rtol=1e-6)
    # P2: 1/(k + SNR)^γ on ε
    np.testing.assert_allclose(w("p2", "eps", k=1.0, gamma=0.5), 1.0 / (1.0 + snr) ** 0.5, rtol=1e-5)
    # EDM: (σ² + σ_d²)/(σ σ_d)² on the denoiser's (x_0) error, σ² = 1/SNR
    sigma2 = 1.0 / snr
    np.testing.assert_allclose(w("edm", "x0", sigma_data=0.5), (sigma2 + 0.25) / (sigma2 * 0.25), rtol=1e-5)
    # the defaults are the papers' recommended values
    np.testing.assert_allclose(w("min_snr", "eps"), w("min_snr", "eps", gamma=5.0))
    np.testing.assert_allclose(w("p2", "eps"), 1.0 / (1.0 + snr), rtol=1e-5)


def test_bad_weightings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="takes \\['gamma'\\], not \\['k'\\]"):
        objectives.get_objective("eps", weighting="min_snr", weighting_params={"k": 1.0})
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        objectives.get_objective("eps", weighting="min_snr", weighting_params={"gamma": 0.0})
    with pytest.raises(ValueError, match="weighting_params are for"):
        objectives.get_objective("eps", weighting="simple", weighting_params={"gamma": 5.0})
    sys.path.insert(0, REPO)
    from configs import mnist_unet

    config = mnist_unet.get_config()
    config.objective.weighting = "p2"
    config.objective.p2_k = -1.0
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert str(e.value).startswith("config.objective.p2_k: ") and "\n" not in str(e.value)
    config.objective.p2_k = 1.0
    validate_config(config)  # valid again

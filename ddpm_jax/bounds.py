"""The variational bound (negative ELBO) of a DDPM with a fixed reverse variance.

For data x_0 with d dimensions, reverse process p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I) and
prior p(x_T) = N(0, I), the negative ELBO decomposes as (Ho et al. 2020, eq. 5)

    −ELBO(x_0) = L_T + Σ_{t=2}^T L_{t−1} + L_0,
    L_T     = KL(q(x_T | x_0) ‖ N(0, I))                                        (prior term)
    L_{t−1} = E_{x_t ~ q(x_t|x_0)} KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)),  t = 2..T
            = E[ ‖μ̃_t − μ_θ‖² / (2σ_t²) + d/2 (β̃_t/σ_t² − 1 − log(β̃_t/σ_t²)) ]
    L_0     = E_{x_1 ~ q(x_1|x_0)} [−log p_θ(x_0 | x_1)]                           (decoder term)

and E_{x_0}[−ELBO] ≥ H(x_0), the data entropy (a cross-entropy bounds the entropy).

Arrays follow docs/conventions.md: per-t terms have length T+1 indexed by t, where ``terms[:, t]`` is the
term contributed by step t — L_{t−1} for t ≥ 2, the decoder L_0 for t = 1 — and
``terms[:, 0] = 0``. The prior L_T is returned separately. Each L_{t−1} is a one-sample Monte
Carlo estimate over x_t (unbiased); the prior term is exact.

Reverse variances ('variance' argument): 'beta' (σ_t² = β_t, the source's choice),
'posterior' (σ_t² = β̃_t, using β_1 at t = 1 where β̃_1 = 0 would make the decoder degenerate),
or an explicit array of shape (T+1,) indexed by t.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Union

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from ddpm_jax import diffusion
from ddpm_jax.diffusion import extract
from ddpm_jax.schedules import Schedule

__all__ = [
    "reverse_variance",
    "gaussian_kl",
    "prior_kl",
    "decoder_nll",
    "vb_term",
    "negative_elbo",
]

Variance = Union[str, jnp.ndarray]


def reverse_variance(schedule: Schedule, variance: Variance = "beta") -> jnp.ndarray:
    """σ_t² for t = 0..T, shape ``(T+1,)``.

    'beta': β_t.  'posterior': β̃_t for t ≥ 2 and β_1 at t = 1.  An array: returned as is
    (shape ``(T+1,)`` required).
    """
    if isinstance(variance, str):
        if variance == "beta":
            return schedule.betas
        if variance == "posterior":
            return schedule.posterior_variance.at[1].set(schedule.betas[1])
        raise ValueError(f"unknown reverse variance {variance!r}; expected 'beta', 'posterior' or an array")
    variance = jnp.asarray(variance)
    if variance.shape != (schedule.num_steps + 1,):
        raise ValueError(f"a reverse-variance array must have shape (T+1,) = ({schedule.num_steps + 1},), got {variance.shape}")
    return variance


def gaussian_kl(mean1, var1, mean2, var2):
    """Elementwise KL(N(mean1, var1) ‖ N(mean2, var2)) = ½[log(var2/var1) + (var1 + (mean1−mean2)²)/var2 − 1].

    Broadcasting shapes; returns nats per element.
    """
    return 0.5 * (jnp.log(var2) - jnp.log(var1) + (var1 + jnp.square(mean1 - mean2)) / var2 - 1.0)


def _sum_pixels(x):
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def prior_kl(schedule: Schedule, x0) -> jnp.ndarray:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)), exact, summed over pixels.

    q(x_T | x_0) = N(√ᾱ_T x_0, (1 − ᾱ_T) I).  Args: x0 ``(B, ...)``. Returns: ``(B,)`` nats.
    """
    t = jnp.full((x0.shape[0],), schedule.num_steps, jnp.int32)
    mean, var = diffusion.q_mean_variance(schedule, x0, t)
    return _sum_pixels(gaussian_kl(mean, var, 0.0, 1.0) * jnp.ones_like(x0))


def decoder_nll(x0, mean, var, *, decoder: str = "gaussian", data_range: Sequence[float] = (-1.0, 1.0), num_bins: int = 256):
    """L_0 = −log p_θ(x_0 | x_1), summed over pixels.

    'gaussian': the continuous density N(x_0; mean, var):
        ½ (x_0 − mean)² / var + ½ log(2π var)  per pixel (nats; may be negative).
    'discretized': DDPM's decoder for data quantised to ``num_bins`` evenly spaced levels on
        ``data_range``: the Gaussian mass of the bin around x_0 (bin width Δ = (hi − lo)/(bins − 1)),
        with the outermost bins extended to ±∞.

    Args: x0, mean ``(B, ...)``; var broadcastable. Returns: ``(B,)`` nats.
    """
    if decoder == "gaussian":
        nll = 0.5 * jnp.square(x0 - mean) / var + 0.5 * jnp.log(2.0 * math.pi * var)
        return _sum_pixels(nll * jnp.ones_like(x0))
    if decoder == "discretized":
        lo, hi = float(data_range[0]), float(data_range[1])
        half = 0.5 * (hi - lo) / (num_bins - 1)
        std = jnp.sqrt(var)
        upper = (x0 + half - mean) / std
        lower = (x0 - half - mean) / std
        log_cdf_upper = log_ndtr(upper)  # log Φ(upper): used at the lowest bin
        log_sf_lower = log_ndtr(-lower)  # log(1 − Φ(lower)): used at the highest bin
        # log(Φ(upper) − Φ(lower)) = log Φ(upper) + log1p(−exp(log Φ(lower) − log Φ(upper)))
        log_mid = log_cdf_upper + jnp.log1p(-jnp.exp(jnp.minimum(log_ndtr(lower) - log_cdf_upper, -1e-12)))
        logp = jnp.where(x0 <= lo + half, log_cdf_upper, jnp.where(x0 >= hi - half, log_sf_lower, log_mid))
        return -_sum_pixels(logp)
    raise ValueError(f"unknown decoder {decoder!r}; expected 'gaussian' or 'discretized'")


def vb_term(
    model_fn: Callable,
    schedule: Schedule,
    x0,
    t,
    key,
    *,
    parameterisation: str = "eps",
    variance: Variance = "beta",
    decoder: str = "gaussian",
    data_range: Sequence[float] = (-1.0, 1.0),
) -> jnp.ndarray:
    """One-sample estimate of step t's term: L_{t−1} (t ≥ 2) or the decoder L_0 (t = 1).

    x_t ~ q(x_t | x_0) with noise from ``key``; μ_θ = :func:`diffusion.mean_from_prediction` of
    ``model_fn(x_t, t)`` in ``parameterisation``; σ_t² from :func:`reverse_variance`.

    Args: x0 ``(B, ...)``; t ``(B,)`` in 1..T (or a scalar). Returns: ``(B,)`` nats.
    """
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x0.shape[0],))
    sigma2 = extract(reverse_variance(schedule, variance), t, x0.shape)
    eps = jax.random.normal(key, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    mu_theta = diffusion.mean_from_prediction(schedule, x_t, t, model_fn(x_t, t), parameterisation)
    mu_tilde, beta_tilde = diffusion.q_posterior(schedule, x0, x_t, t)
    # At t = 1 β̃_1 = 0: guard the KL branch (unused there) against log(0).
    safe_beta_tilde = jnp.where(beta_tilde > 0, beta_tilde, 1.0)
    kl = _sum_pixels(gaussian_kl(mu_tilde, safe_beta_tilde, mu_theta, sigma2) * jnp.ones_like(x0))
    nll = decoder_nll(x0, mu_theta, sigma2, decoder=decoder, data_range=data_range)
    return jnp.where(t == 1, nll, kl)


def negative_elbo(
    model_fn: Callable,
    schedule: Schedule,
    x0,
    key,
    *,
    parameterisation: str = "eps",
    variance: Variance = "beta",
    decoder: str = "gaussian",
    data_range: Sequence[float] = (-1.0, 1.0),
) -> Dict[str, jnp.ndarray]:
    """All terms of −ELBO(x_0), one model call per t (a ``lax.map`` over t = 1..T).

    Args:
      model_fn: ``(x_t, t) -> prediction`` in ``parameterisation`` ('eps', 'x0', 'v', 'mean').
      x0: ``(B, ...)``.
      key: PRNG key; step t uses ``fold_in(key, t)``.
      variance, decoder, data_range: see :func:`reverse_variance` and :func:`decoder_nll`.

    Returns dict of:
      'terms': ``(B, T+1)`` nats; column t is step t's term (column 1 the decoder, column 0 zero).
      'prior': ``(B,)`` nats, L_T.
      'nats':  ``(B,)`` the sum, −ELBO.
      'bpd':   ``(B,)`` bits per dimension, nats / (d ln 2).
    """
    ts = jnp.arange(1, schedule.num_steps + 1, dtype=jnp.int32)

    def one(t):
        return vb_term(
            model_fn, schedule, x0, t, jax.random.fold_in(key, t),
            parameterisation=parameterisation, variance=variance, decoder=decoder, data_range=data_range,
        )

    per_t = jax.lax.map(one, ts)  # (T, B)
    terms = jnp.concatenate([jnp.zeros((1, x0.shape[0]), per_t.dtype), per_t], axis=0).T
    prior = prior_kl(schedule, x0)
    nats = prior + jnp.sum(per_t, axis=0)
    d = math.prod(x0.shape[1:])
    return {"terms": terms, "prior": prior, "nats": nats, "bpd": nats / (d * math.log(2.0))}

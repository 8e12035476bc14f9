"""The forward process, its posterior, and conversions between parameterisations.

Notation (docs/conventions.md): ``t ∈ 1..T``; schedule arrays have length T+1 and are indexed by ``t``.
Shapes: ``x0``, ``x_t``, ``noise`` are batches ``(B, ...)`` (NHWC images in practice); ``t`` is an
integer array of shape ``(B,)``, one time step per example. Every function is pure, jit-safe and
vmap-safe; per-example coefficients are gathered from the schedule and broadcast over the
non-batch axes.

Identities used throughout, with x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε:

    x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t
    ε   = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)
    v   = √ᾱ_t ε − √(1 − ᾱ_t) x_0                    (Salimans & Ho 2022)
    μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t
        = (x_t − β_t / √(1 − ᾱ_t) · ε) / √α_t
"""

from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp

from ddpm_jax import rng
from ddpm_jax.schedules import Schedule

__all__ = [
    "PARAMETERISATIONS",
    "extract",
    "q_mean_variance",
    "q_sample",
    "q_step",
    "q_sample_pair",
    "q_posterior",
    "posterior_mean_coefs",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "predict_v",
    "predict_x0_from_v",
    "predict_eps_from_v",
    "mean_from_eps",
    "mean_from_x0",
    "eps_from_mean",
    "x0_from_mean",
    "x0_eps_from_prediction",
    "mean_from_prediction",
]

#: What a network can predict: ε, x_0, v, or the reverse mean μ (x_{t−1} for the 'xprev' and
#: 'mean' objectives).
PARAMETERISATIONS = ("eps", "x0", "v", "mean")


def extract(arr: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
    """Gathers ``arr[t]`` and reshapes it to broadcast against a batch.

    Args:
      arr: schedule array, shape ``(T+1,)``.
      t: integer time steps, shape ``(B,)`` (or a scalar, which broadcasts to every example).
      x_shape: shape of the batch, ``(B, ...)``.

    Returns:
      Array of shape ``(B, 1, ..., 1)`` (as many trailing ones as ``x_shape`` has non-batch
      axes), or ``(1, ..., 1)`` when ``t`` is a scalar.
    """
    t = jnp.asarray(t)
    vals = arr[t]
    if t.ndim == 0:
        return jnp.reshape(vals, (1,) * len(x_shape))
    return jnp.reshape(vals, t.shape + (1,) * (len(x_shape) - t.ndim))


def q_mean_variance(schedule: Schedule, x0, t) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Moments of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I).

    Args: x0 ``(B, ...)``; t ``(B,)``.
    Returns: (mean ``(B, ...)``, variance ``(B, 1, ..., 1)``).
    """
    mean = extract(schedule.sqrt_alpha_bars, t, x0.shape) * x0
    var = extract(schedule.one_minus_alpha_bars, t, x0.shape)
    return mean, var


def q_sample(schedule: Schedule, x0, t, noise):
    """Draws x_t ~ q(x_t | x_0):  x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.

    Args: x0 ``(B, ...)``; t ``(B,)`` in 0..T (t = 0 returns x0); noise ε ``(B, ...)``.
    Returns: x_t ``(B, ...)``.
    """
    return (
        extract(schedule.sqrt_alpha_bars, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alpha_bars, t, x0.shape) * noise
    )


def q_step(schedule: Schedule, x_prev, t, noise):
    """One forward transition x_t = √α_t x_{t−1} + √(1 − α_t) ε  (q(x_t | x_{t−1})).

    Args: x_prev ``(B, ...)``; t ``(B,)`` in 1..T; noise ``(B, ...)``.
    Returns: x_t ``(B, ...)``.
    """
    return (
        extract(jnp.sqrt(schedule.alphas), t, x_prev.shape) * x_prev
        + extract(jnp.sqrt(schedule.betas), t, x_prev.shape) * noise
    )


def posterior_mean_coefs(schedule: Schedule, t, x_shape):
    """Coefficients of μ̃_t = c_0 · x_0 + c_t · x_t.

    c_0 = √ᾱ_{t−1} β_t / (1 − ᾱ_t),   c_t = √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t);  each ``(B, 1, ..., 1)``.
    At t = 1: c_0 = 1, c_t = 0 (μ̃_1 = x_0). Defined for t in 1..T.
    """
    return extract(schedule.posterior_coef_x0, t, x_shape), extract(schedule.posterior_coef_xt, t, x_shape)


def q_posterior(schedule: Schedule, x0, x_t, t) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Moments of the forward posterior q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I).

    μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t,
    β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t).

    Args: x0, x_t ``(B, ...)``; t ``(B,)`` in 1..T.
    Returns: (mean μ̃_t ``(B, ...)``, variance β̃_t ``(B, 1, ..., 1)``).
    """
    c0, ct = posterior_mean_coefs(schedule, t, x0.shape)
    return c0 * x0 + ct * x_t, extract(schedule.posterior_variance, t, x0.shape)


def q_sample_pair(schedule: Schedule, x0, t, key):
    """A joint draw of (x_{t−1}, x_t) from q(x_{t−1}, x_t | x_0).

    x_t is drawn from its marginal, x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, then
    x_{t−1} = μ̃_t(x_t, x_0) + √β̃_t z from the posterior; the product of the two is the joint.
    The first half of the key drives ε exactly as ``q_sample(schedule, x0, t, normal(k_t))``
    with ``k_t, _ = jax.random.split(key)``, so objectives that share a key share x_t.
    At t = 1, x_{t−1} = x_0 exactly (β̃_1 = 0).

    Args: x0 ``(B, ...)``; t ``(B,)`` in 1..T; key: a PRNG key, or one per example (:mod:`ddpm_jax.rng`).
    Returns: (x_prev ``(B, ...)``, x_t ``(B, ...)``).
    """
    k_t, k_prev = rng.split(key)
    eps = rng.normal(k_t, x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, t, eps)
    mean, var = q_posterior(schedule, x0, x_t, t)
    z = rng.normal(k_prev, x0.shape, x0.dtype)
    return mean + jnp.sqrt(var) * z, x_t


# --- conversions between parameterisations --------------------------------------------------


def predict_x0_from_eps(schedule: Schedule, x_t, t, eps):
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t.   Shapes: ``(B, ...)``, t ``(B,)``."""
    return (x_t - extract(schedule.sqrt_one_minus_alpha_bars, t, x_t.shape) * eps) / extract(
        schedule.sqrt_alpha_bars, t, x_t.shape
    )


def predict_eps_from_x0(schedule: Schedule, x_t, t, x0):
    """ε̂ = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t).   Shapes: ``(B, ...)``, t ``(B,)`` in 1..T."""
    return (x_t - extract(schedule.sqrt_alpha_bars, t, x_t.shape) * x0) / extract(
        schedule.sqrt_one_minus_alpha_bars, t, x_t.shape
    )


def predict_v(schedule: Schedule, x0, t, eps):
    """The v target: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0.   Shapes: ``(B, ...)``, t ``(B,)``."""
    return extract(schedule.sqrt_alpha_bars, t, x0.shape) * eps - extract(
        schedule.sqrt_one_minus_alpha_bars, t, x0.shape
    ) * x0


def predict_x0_from_v(schedule: Schedule, x_t, t, v):
    """x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v.   Shapes: ``(B, ...)``, t ``(B,)``."""
    return extract(schedule.sqrt_alpha_bars, t, x_t.shape) * x_t - extract(
        schedule.sqrt_one_minus_alpha_bars, t, x_t.shape
    ) * v


def predict_eps_from_v(schedule: Schedule, x_t, t, v):
    """ε̂ = √(1 − ᾱ_t) x_t + √ᾱ_t v.   Shapes: ``(B, ...)``, t ``(B,)``."""
    return extract(schedule.sqrt_one_minus_alpha_bars, t, x_t.shape) * x_t + extract(
        schedule.sqrt_alpha_bars, t, x_t.shape
    ) * v


def mean_from_eps(schedule: Schedule, x_t, t, eps):
    """μ = (x_t − β_t / √(1 − ᾱ_t) · ε) / √α_t  (μ̃_t with x_0 replaced by x̂_0(ε)).

    Shapes: ``(B, ...)``, t ``(B,)`` in 1..T.
    """
    coef = extract(schedule.betas, t, x_t.shape) / extract(schedule.sqrt_one_minus_alpha_bars, t, x_t.shape)
    return (x_t - coef * eps) / extract(jnp.sqrt(schedule.alphas), t, x_t.shape)


def mean_from_x0(schedule: Schedule, x_t, t, x0):
    """μ = μ̃_t(x_t, x̂_0) = c_0 x̂_0 + c_t x_t (see :func:`posterior_mean_coefs`)."""
    c0, ct = posterior_mean_coefs(schedule, t, x_t.shape)
    return c0 * x0 + ct * x_t


def eps_from_mean(schedule: Schedule, x_t, t, mean):
    """Inverse of :func:`mean_from_eps`: ε̂ = (x_t − √α_t μ) √(1 − ᾱ_t) / β_t."""
    return (
        (x_t - extract(jnp.sqrt(schedule.alphas), t, x_t.shape) * mean)
        * extract(schedule.sqrt_one_minus_alpha_bars, t, x_t.shape)
        / extract(schedule.betas, t, x_t.shape)
    )


def x0_from_mean(schedule: Schedule, x_t, t, mean):
    """Inverse of :func:`mean_from_x0`: x̂_0 = (μ − c_t x_t) / c_0."""
    c0, ct = posterior_mean_coefs(schedule, t, x_t.shape)
    return (mean - ct * x_t) / c0


def x0_eps_from_prediction(schedule: Schedule, x_t, t, prediction, parameterisation: str):
    """Turns a network output of any parameterisation into the pair (x̂_0, ε̂).

    Args:
      x_t, prediction: ``(B, ...)``; t: ``(B,)`` in 1..T.
      parameterisation: one of :data:`PARAMETERISATIONS` (``'eps'``, ``'x0'``, ``'v'``,
        ``'mean'``).

    Returns: (x̂_0, ε̂), each ``(B, ...)``, consistent with x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂.
    """
    if parameterisation == "eps":
        return predict_x0_from_eps(schedule, x_t, t, prediction), prediction
    if parameterisation == "x0":
        return prediction, predict_eps_from_x0(schedule, x_t, t, prediction)
    if parameterisation == "v":
        return predict_x0_from_v(schedule, x_t, t, prediction), predict_eps_from_v(schedule, x_t, t, prediction)
    if parameterisation == "mean":
        eps = eps_from_mean(schedule, x_t, t, prediction)
        return predict_x0_from_eps(schedule, x_t, t, eps), eps
    raise ValueError(f"unknown parameterisation {parameterisation!r}; expected one of {PARAMETERISATIONS}")


def mean_from_prediction(schedule: Schedule, x_t, t, prediction, parameterisation: str):
    """The reverse mean μ_θ(x_t, t) implied by a network output of any parameterisation.

    ``'mean'`` is returned as is; ``'eps'`` uses :func:`mean_from_eps`; ``'x0'`` and ``'v'`` go
    through x̂_0 and μ̃_t(x_t, x̂_0). Shapes: ``(B, ...)``, t ``(B,)`` in 1..T.
    """
    if parameterisation == "mean":
        return prediction
    if parameterisation == "eps":
        return mean_from_eps(schedule, x_t, t, prediction)
    x0, _ = x0_eps_from_prediction(schedule, x_t, t, prediction, parameterisation)
    return mean_from_x0(schedule, x_t, t, x0)

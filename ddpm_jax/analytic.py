"""Closed forms for Gaussian data x_0 ~ N(m, s² I): the exact optimal denoiser and friends.

With Gaussian data every quantity of the diffusion is Gaussian, so the Bayes-optimal network is
known exactly. That makes these functions reference points for tests and research code (an
analytic ``model_fn`` plugs into any sampler, loss or bound):

    x_t ~ N(√ᾱ_t m, v_t),  v_t = ᾱ_t s² + 1 − ᾱ_t
    E[x_0 | x_t]   = m + √ᾱ_t s² / v_t · (x_t − √ᾱ_t m)
    Var[x_0 | x_t] = s² (1 − ᾱ_t) / v_t
    E[ε | x_t]     = √(1 − ᾱ_t) / v_t · (x_t − √ᾱ_t m)
    q(x_{t−1} | x_t) = N(μ̃_t(x_t, E[x_0|x_t]),  β̃_t + c_0(t)² Var[x_0 | x_t])

``m`` and ``s`` may be scalars or arrays broadcastable to one example's shape.

For a mixture of K such Gaussians with a shared s (class k with probability π_k), the class of
x_t has posterior r_k(x_t) ∝ π_k exp(−‖x_t − √ᾱ_t m_k‖² / (2 v_t)), and E[x_0 | x_t] = Σ_k r_k
E_k[x_0 | x_t]: :func:`gaussian_mixture_class_denoiser` is the exact class-conditional denoiser.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.diffusion import extract
from ddpm_jax.schedules import Schedule

__all__ = [
    "gaussian_posterior_x0",
    "gaussian_data_denoiser",
    "gaussian_mixture_class_denoiser",
    "gaussian_true_reverse_variance",
    "gaussian_entropy",
    "gaussian_prior_kl",
]


def gaussian_posterior_x0(schedule: Schedule, mean, std, x_t, t):
    """(E[x_0 | x_t], Var[x_0 | x_t]) for x_0 ~ N(mean, std²).  x_t ``(B, ...)``, t ``(B,)`` in 0..T."""
    abar = extract(schedule.alpha_bars, t, x_t.shape)
    one_minus = extract(schedule.one_minus_alpha_bars, t, x_t.shape)
    s2 = jnp.square(std)
    v = abar * s2 + one_minus
    post_mean = mean + jnp.sqrt(abar) * s2 / v * (x_t - jnp.sqrt(abar) * mean)
    return post_mean, s2 * one_minus / v


def gaussian_data_denoiser(schedule: Schedule, mean, std, parameterisation: str = "eps"):
    """The Bayes-optimal ``model_fn(x_t, t)`` for x_0 ~ N(mean, std² I).

    Predicts E[· | x_t] of the requested parameterisation ('eps', 'x0', 'v', or 'mean' = the
    optimal reverse mean μ̃_t(x_t, E[x_0|x_t]) = E[x_{t−1} | x_t]). Minimises every objective of
    :mod:`ddpm_jax.objectives` with that parameterisation.
    """

    def model_fn(x_t, t):
        x0_hat, _ = gaussian_posterior_x0(schedule, mean, std, x_t, t)
        return _from_x0(schedule, x_t, t, x0_hat, parameterisation)

    return model_fn


def _from_x0(schedule: Schedule, x_t, t, x0_hat, parameterisation: str):
    """The prediction of ``parameterisation`` whose x̂_0 is ``x0_hat`` (E[ε|x_t] etc. are linear in it)."""
    if parameterisation == "x0":
        return x0_hat * jnp.ones_like(x_t)
    if parameterisation == "mean":
        return diffusion.mean_from_x0(schedule, x_t, t, x0_hat)
    eps_hat = diffusion.predict_eps_from_x0(schedule, x_t, t, x0_hat)
    if parameterisation == "eps":
        return eps_hat
    if parameterisation == "v":
        return diffusion.predict_v(schedule, x0_hat, t, eps_hat)
    raise ValueError(f"unknown parameterisation {parameterisation!r}; expected one of {diffusion.PARAMETERISATIONS}")


def gaussian_mixture_class_denoiser(schedule: Schedule, means, std, weights=None, parameterisation: str = "eps"):
    """The Bayes-optimal class-conditional ``model_fn(x_t, t, y)`` for x_0 | y = k ~ N(means[k], std² I).

    ``means`` ``(K, ...)`` (one example's shape after K), ``std`` a scalar, ``weights`` the class
    probabilities π (default uniform). Label ``y = k`` gives class k's Gaussian denoiser; ``y = −1``
    (``ddpm_jax.guidance.NO_CLASS``) or ``y=None`` the mixture's, E[x_0 | x_t] = Σ_k r_k(x_t)
    E_k[x_0 | x_t]. Predicts the requested parameterisation, as :func:`gaussian_data_denoiser`."""
    means = jnp.asarray(means, jnp.float32)
    k = means.shape[0]
    log_pi = jnp.log(jnp.full((k,), 1.0 / k) if weights is None else jnp.asarray(weights, jnp.float32))

    def model_fn(x_t, t, y=None):
        abar = extract(schedule.alpha_bars, t, x_t.shape)
        v = abar * jnp.square(std) + extract(schedule.one_minus_alpha_bars, t, x_t.shape)
        axes = tuple(range(1, x_t.ndim))
        per_class = jnp.stack([gaussian_posterior_x0(schedule, means[j], std, x_t, t)[0] for j in range(k)], 1)
        d2 = jnp.stack([jnp.sum(jnp.square(x_t - jnp.sqrt(abar) * means[j]) / v, axis=axes) for j in range(k)], 1)
        r = jax.nn.softmax(log_pi - 0.5 * d2, axis=1)  # (B, K): the class posterior r_k(x_t)
        mixture = jnp.einsum("bk,bk...->b...", r, per_class)
        if y is None:
            x0_hat = mixture
        else:
            y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), x_t.shape[:1])
            chosen = jnp.take_along_axis(per_class, jnp.maximum(y, 0).reshape((-1, 1) + (1,) * (x_t.ndim - 1)), 1)[:, 0]
            x0_hat = jnp.where((y >= 0).reshape((-1,) + (1,) * (x_t.ndim - 1)), chosen, mixture)
        return _from_x0(schedule, x_t, t, x0_hat, parameterisation)

    return model_fn


def gaussian_true_reverse_variance(schedule: Schedule, std) -> jnp.ndarray:
    """Var of the true reverse step q(x_{t−1} | x_t) for x_0 ~ N(m, std²), shape ``(T+1,)``.

    σ*_t² = β̃_t + c_0(t)² Var[x_0 | x_t], c_0(t) = √ᾱ_{t−1} β_t / (1 − ᾱ_t); at t = 1 this is
    Var[x_0 | x_1]. Index 0 is set to 1 (unused). ``std`` must be a scalar.
    """
    s2 = jnp.square(std)
    one_minus = schedule.one_minus_alpha_bars
    var_x0 = s2 * one_minus / (schedule.alpha_bars * s2 + one_minus)
    out = schedule.posterior_variance + jnp.square(schedule.posterior_coef_x0) * var_x0
    return out.at[0].set(1.0)


def gaussian_entropy(std, dim: int) -> float:
    """Differential entropy of N(m, std² I_d) in nats: d/2 · log(2πe std²)."""
    return 0.5 * dim * math.log(2.0 * math.pi * math.e * float(std) ** 2)


def gaussian_prior_kl(schedule: Schedule, mean, std, dim: int):
    """KL(q(x_T) ‖ N(0, I)) in nats for x_0 ~ N(mean, std² I_d) (scalars), q(x_T) = N(√ᾱ_T m, v_T)."""
    abar = schedule.alpha_bars[schedule.num_steps]
    m_t = jnp.sqrt(abar) * mean
    v_t = abar * std**2 + schedule.one_minus_alpha_bars[schedule.num_steps]
    return 0.5 * dim * (v_t + m_t**2 - 1.0 - jnp.log(v_t))

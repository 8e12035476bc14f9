"""Higher-order samplers of the probability-flow ODE on the discrete schedule, each one ``lax.scan``.

Both solvers read the network through a denoiser ``denoise(x_t, t) -> (x̂_0, ε̂)`` (any
parameterisation, converted exactly; :func:`ddpm_jax.sampling.sample` builds it) and visit a grid
of integer steps t_0 = τ_S = T > t_1 > … > t_{S−1} = τ_1 (:mod:`ddpm_jax.step_grids`), then land on
t_S = 0 (ᾱ_0 = 1: the data). With α_t = √ᾱ_t, s_t = √(1 − ᾱ_t), λ_t = log(α_t/s_t), σ_t = s_t/α_t:

DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction D_i = x̂_0(x_{t_i}, t_i), h_i = λ_{t_{i+1}} − λ_{t_i}:

    x_{t_{i+1}} = (s_{t_{i+1}}/s_{t_i}) x_{t_i} + α_{t_{i+1}} (1 − e^{−h_i}) D̄_i,
    D̄_i = (1 + 1/(2r_i)) D_i − 1/(2r_i) D_{i−1},  r_i = h_{i−1}/h_i        (second order)
    D̄_i = D_i  at the first step and the last (t_S = 0: h = ∞, so x_0 = D_{S−1}).
    One network evaluation per step: NFE = S.

Heun (Karras et al. 2022, Alg. 2) on x̃ = x_t/α_t = x_0 + σ_t ε, dx̃/dσ = (x̃ − D(x̃; σ))/σ, with
D(x̃; σ_t) = x̂_0(α_t x̃, t):

    churn: γ_i = min(S_churn/S, √2 − 1) if S_tmin ≤ σ_{t_i} ≤ S_tmax else 0; t̂_i = the step whose σ
           is nearest σ_{t_i}(1 + γ_i) (t̂_i ≥ t_i); x̂ = x̃_i + √(σ_{t̂_i}² − σ_{t_i}²) S_noise z
    Euler: d = (x̂ − D(x̂; σ_{t̂_i}))/σ_{t̂_i},  x̃_{i+1} = x̂ + (σ_{t_{i+1}} − σ_{t̂_i}) d
    Heun:  x̃_{i+1} = x̂ + (σ_{t_{i+1}} − σ_{t̂_i}) (d + d')/2,  d' = (x̃_{i+1} − D(x̃_{i+1}; σ_{t_{i+1}}))/σ_{t_{i+1}}
           for every step but the last (σ_{t_S} = 0: the Euler step, x_0 = D(x̂; σ_{t̂})).
    NFE = 2S − 1. With S_churn = 0 (the default) the sampler is deterministic.

The discrete model is mapped by the snapped grid: every σ the solvers use is σ_t of an integer
step, so the network is only ever evaluated where it was trained. Both return x_0 ``shape`` and a
trajectory (t ``(S,)``, x ``(S+1, …)`` in x_t scale, x̂_0 and ε̂ ``(S, …)`` of each step's first
evaluation) when asked.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import step_grids
from ddpm_jax.schedules import Schedule

__all__ = ["dpm_solver_pp", "heun", "heun_churn_steps", "trajectory"]


def trajectory(ts, x_T, outs):
    """The samplers' trajectory dict from the steps ``ts`` (T first) and the scan's stacked
    (x after each step, x̂_0, ε̂): 't' (S,), 'x' (S+1, ...) with x_T first, 'x0' and 'eps' (S, ...)."""
    xs, x0s, epss = outs
    return {"t": ts, "x": jnp.concatenate([x_T[None], xs], axis=0), "x0": x0s, "eps": epss}


def _at(arr, t, x):
    """arr[t] (scalar t) broadcast against x."""
    return jnp.asarray(arr[t], x.dtype)


def dpm_solver_pp(denoise: Callable, schedule: Schedule, x_T, taus, *, return_trajectory: bool = False):
    """DPM-Solver++(2M) from x_T at t = T down to x_0 over ``taus`` (ascending ``(S,)`` steps, τ_S = T).

    ``denoise(x_t, t (B,)) -> (x̂_0, ε̂)``. Update: module docstring. Returns x_0 (and the trajectory).
    """
    S = taus.shape[0]
    B = x_T.shape[0]
    ts = taus[::-1]  # T first
    t_next = jnp.concatenate([ts[1:], jnp.zeros((1,), ts.dtype)])
    lam = step_grids.log_snr(schedule)
    h = lam[t_next] - lam[ts]  # +inf at the last step
    h_prev = jnp.concatenate([jnp.full((1,), jnp.nan, h.dtype), h[:-1]])
    i = jnp.arange(S)
    second = (i > 0) & (i < S - 1)
    w = jnp.where(second, h / (2.0 * jnp.where(second, h_prev, 1.0)), 0.0)  # 1/(2r)
    ratio = schedule.sqrt_one_minus_alpha_bars[t_next] / schedule.sqrt_one_minus_alpha_bars[ts]  # 0 at the end
    coef = schedule.sqrt_alpha_bars[t_next] * -jnp.expm1(-h)  # α (1 − e^{−h}); 1 at the end

    def step(carry, xs):
        x, d_prev = carry
        t, w_i, ratio_i, coef_i = xs
        x0_hat, eps_hat = denoise(x, jnp.full((B,), t, jnp.int32))
        d_bar = (1.0 + w_i) * x0_hat - w_i * d_prev
        x_next = ratio_i * x + coef_i * d_bar
        return (x_next, x0_hat), ((x_next, x0_hat, eps_hat) if return_trajectory else None)

    (x_0, _), outs = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), (ts, w, ratio, coef))
    return (x_0, trajectory(ts, x_T, outs)) if return_trajectory else x_0


def heun_churn_steps(schedule: Schedule, taus, s_churn: float, s_tmin: float, s_tmax: float):
    """t̂_i for each step of ``taus`` (descending order, ``(S,)``): the step with σ nearest σ_{t_i}(1 + γ_i)."""
    ts = taus[::-1]
    S = ts.shape[0]
    sig = step_grids.sigmas(schedule)
    gamma = jnp.where((sig[ts] >= s_tmin) & (sig[ts] <= s_tmax), min(s_churn / S, math.sqrt(2.0) - 1.0), 0.0)
    target = -jnp.log(sig[ts] * (1.0 + gamma))  # as a λ
    snapped = step_grids.snap(schedule, target)
    return jnp.where(gamma > 0, jnp.maximum(snapped, ts), ts).astype(jnp.int32)


def heun(denoise: Callable, schedule: Schedule, x_T, taus, key, *, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0, return_trajectory: bool = False):
    """EDM's Heun sampler from x_T at t = T down to x_0 over ``taus`` (ascending ``(S,)``, τ_S = T).

    ``denoise(x_t, t (B,)) -> (x̂_0, ε̂)``; ``key`` draws the churn noise (step at t uses
    ``fold_in(key, t)``). Update: module docstring. Returns x_0 (and the trajectory).
    """
    B = x_T.shape[0]
    ts = taus[::-1]
    t_next = jnp.concatenate([ts[1:], jnp.zeros((1,), ts.dtype)])
    t_hat = heun_churn_steps(schedule, taus, s_churn, s_tmin, s_tmax)
    sig = step_grids.sigmas(schedule)
    alpha = schedule.sqrt_alpha_bars
    # exactly 0 where t̂ = t: computed inside the step, σ̂² − σ² may be fused into an FMA whose
    # rounding residual (~1e-8) the square root would turn into noise of size ~1e-4
    churn_std = jnp.where(t_hat > ts, jnp.sqrt(jnp.maximum(sig[t_hat] ** 2 - sig[ts] ** 2, 0.0)), 0.0) * s_noise

    def D(x_tilde, t):  # the denoiser on x̃ at integer step t (scalar)
        return denoise(_at(alpha, t, x_tilde) * x_tilde, jnp.full((B,), t, jnp.int32))

    def step(x_tilde, xs):
        t, t_h, t_n, std = xs
        s_hat, s_next = _at(sig, t_h, x_tilde), _at(sig, t_n, x_tilde)
        z = jax.random.normal(jax.random.fold_in(key, t), x_tilde.shape, x_tilde.dtype)
        x_hat = x_tilde + std.astype(x_tilde.dtype) * z
        x0_hat, eps_hat = D(x_hat, t_h)
        d = (x_hat - x0_hat) / s_hat
        x_euler = x_hat + (s_next - s_hat) * d

        def correct(_):
            x0_2, _ = D(x_euler, t_n)
            return x_hat + (s_next - s_hat) * 0.5 * (d + (x_euler - x0_2) / s_next)

        # the last step (t_n = 0, σ = 0) is Euler: x̃ = x̂ − σ̂ d = D(x̂); no second evaluation
        x_next = jax.lax.cond(t_n > 0, correct, lambda _: x0_hat, None)
        out = (_at(alpha, t_n, x_next) * x_next, x0_hat, eps_hat) if return_trajectory else None
        return x_next, out

    x_0, outs = jax.lax.scan(step, x_T / _at(alpha, ts[0], x_T), (ts, t_hat, t_next, churn_std))
    return (x_0, trajectory(ts, x_T, outs)) if return_trajectory else x_0

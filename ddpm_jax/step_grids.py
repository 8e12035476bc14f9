"""The time steps a sampler visits: S distinct integer steps in 1..T, chosen on one of three grids.

The network is trained at integer t only, so every grid is snapped to integer steps and the
solvers then use the schedule's exact ᾱ_t at those steps: a snapped grid is a coarser grid, not an
approximation of the model. With α_t = √ᾱ_t and s_t = √(1 − ᾱ_t):

==============  ======================================================================================
grid            S points between t = T and t = 1
==============  ======================================================================================
'uniform_t'     τ_i = round(1 + (i − 1)(T − 1)/(S − 1)): DDIM's spacing (Song et al. 2021)
'lambda'        uniform in the log-SNR λ_t = log(α_t / s_t), snapped to the nearest λ_t (Lu et al. 2022)
'edm'           σ_i = (σ_max^{1/ρ} + (i − 1)/(S − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7, on
                σ_t = s_t / α_t with σ_max = σ_T, σ_min = σ_1, snapped to the nearest log σ_t (Karras et al. 2022)
==============  ======================================================================================

Snapping can map neighbouring points of a dense grid to the same step; they are then moved apart
to the nearest distinct steps (ascending: τ_i ≥ τ_{i−1} + 1; then τ_i ≤ T − (S − i)), so a grid
always has S points, τ_1 ≥ 1 and τ_S = T. Everything is ``jax.numpy`` on the schedule's arrays, so
the schedule may be a traced argument of a jitted function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedules import Schedule

__all__ = ["GRIDS", "EDM_RHO", "ddim_timesteps", "timestep_grid", "log_snr", "sigmas", "snap"]

GRIDS = ("uniform_t", "lambda", "edm")
EDM_RHO = 7.0


def ddim_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """S = ``num_steps`` evenly spread steps τ_1 < … < τ_S in 1..T with τ_S = T, ``(S,)`` int32.

    τ_i = round(1 + (i − 1)(T − 1)/(S − 1)) (τ_1 = 1, τ_S = T; distinct since S ≤ T); S = 1 gives [T].
    """
    if num_steps == 1:
        return np.array([num_train_steps], np.int32)
    return np.round(np.linspace(1, num_train_steps, num_steps)).astype(np.int32)


def log_snr(schedule: Schedule) -> jnp.ndarray:
    """λ_t = log(√ᾱ_t / √(1 − ᾱ_t)) = ½ log SNR_t, ``(T+1,)``, decreasing in t; λ_0 = +inf."""
    return jnp.log(schedule.sqrt_alpha_bars) - jnp.log(schedule.sqrt_one_minus_alpha_bars)


def sigmas(schedule: Schedule) -> jnp.ndarray:
    """σ_t = √(1 − ᾱ_t) / √ᾱ_t = e^{−λ_t} (the noise level of x_t / √ᾱ_t), ``(T+1,)``; σ_0 = 0."""
    return schedule.sqrt_one_minus_alpha_bars / schedule.sqrt_alpha_bars


def snap(schedule: Schedule, targets) -> jnp.ndarray:
    """The integer steps in 1..T whose λ_t is nearest each target λ (targets ``(S,)``, any order)."""
    lam = log_snr(schedule)[1:]  # t = 1..T, decreasing
    # searchsorted needs increasing values: −λ_t increases with t.
    idx = jnp.clip(jnp.searchsorted(-lam, -targets), 1, lam.shape[0] - 1)  # −λ[idx−1] < −target ≤ −λ[idx]
    below, above = lam[idx - 1], lam[idx]
    nearest = jnp.where(jnp.abs(below - targets) <= jnp.abs(above - targets), idx - 1, idx)
    return (nearest + 1).astype(jnp.int32)  # index 0 of lam is t = 1


def _distinct(taus, T: int) -> jnp.ndarray:
    """Moves coinciding snapped steps apart: ascending τ_i ≥ τ_{i−1} + 1, then τ_i ≤ T − (S − i)."""
    S = taus.shape[0]
    i = jnp.arange(S, dtype=jnp.int32)
    up = jax.lax.cummax(taus - i, axis=0) + i
    return jnp.minimum(up, T - (S - 1) + i).astype(jnp.int32)


def timestep_grid(schedule: Schedule, num_steps: int, kind: str = "uniform_t") -> jnp.ndarray:
    """S = ``num_steps`` distinct steps τ_1 < … < τ_S in 1..T on the grid ``kind`` (module docstring), ``(S,)`` int32.

    τ_S = T always and, for S ≥ 2, τ_1 = 1. 'uniform_t' is :func:`ddim_timesteps` exactly.
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown step grid {kind!r}; expected one of {GRIDS}")
    T = schedule.num_steps
    if kind == "uniform_t" or num_steps == 1:
        return jnp.asarray(ddim_timesteps(T, num_steps))
    frac = jnp.linspace(0.0, 1.0, num_steps)  # 0 at τ_1 = 1, 1 at τ_S = T
    lam = log_snr(schedule)
    if kind == "lambda":
        targets = lam[1] + frac * (lam[T] - lam[1])
    else:  # edm: the ρ-grid on σ = e^{−λ}, from σ_max (t = T) down to σ_min (t = 1)
        inv_rho = 1.0 / EDM_RHO
        s_max, s_min = jnp.exp(-lam[T]) ** inv_rho, jnp.exp(-lam[1]) ** inv_rho
        sig = (s_max + (1.0 - frac) * (s_min - s_max)) ** EDM_RHO
        targets = -jnp.log(sig)
    return _distinct(snap(schedule, targets), T)

"""How training draws the time step t ∈ 1..T of each example (``train.t_sampling``).

A sampler is a distribution p over 1..T (an array ``(T+1,)`` with p[0] = 0) and a per-example
factor c_t on the objective's term ℓ (its weight w_t included), so a step's loss estimates
E_{t~p}[c_t ℓ_t]:

    'uniform'     p_t = 1/T, c_t = 1: the objective as written, (1/T) Σ_t E[ℓ_t]. The objectives'
                  own draw (:func:`ddpm_jax.objectives.sample_timesteps`), unchanged.
    'log_normal'  ln σ ~ N(P_mean, P_std²) (Karras et al. 2022: −1.2, 1.2) with σ_t² = 1/SNR_t =
                  (1 − ᾱ_t)/ᾱ_t, mapped onto the discrete schedule: p_t is the normal's mass on
                  the interval of ln σ nearest ln σ_t (edges at the midpoints between neighbours,
                  the two ends open), c_t = 1. This changes the objective: Σ_t p_t E[ℓ_t], i.e.
                  the weight w_t becomes T p_t w_t (EDM's training distribution; pair it with
                  objective.weighting='edm').
    'importance'  Nichol & Dhariwal (2021): p_t ∝ √(E[ℓ_t²]) from the last H terms drawn at each
                  t, mixed with a uniform share u; uniform until every t has H terms. c_t =
                  1/(T p_t), so the estimate stays unbiased for the uniform objective,
                  E_{t~p}[ℓ_t / (T p_t)] = (1/T) Σ_t E[ℓ_t], with less variance.

t is drawn by inverting the CDF of p at a uniform variate from the first half of the example's
key split (:func:`ddpm_jax.rng.split`, the half the objectives draw t from), so ε and x_t are the
ones the uniform draw would have used. The importance history is part of the training state
(:class:`History`), updated in the step from the terms before c_t, example by example in the
order of the global batch, padding and non-finite steps excluded.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from ddpm_jax import rng, step_grids
from ddpm_jax.schedules import Schedule

__all__ = ["T_SAMPLINGS", "History", "init_history", "log_normal_probs", "importance_probs", "draw",
           "update_history"]

T_SAMPLINGS = ("uniform", "log_normal", "importance")


@flax.struct.dataclass
class History:
    """The importance sampler's state: ``terms`` ``(T+1, H)`` float32, the last H terms ℓ drawn at
    each t (oldest first; row 0 unused); ``count`` ``(T+1,)`` int32, how many of them are filled."""

    terms: jnp.ndarray
    count: jnp.ndarray


def init_history(num_steps: int, length: int) -> History:
    """An empty history for T = ``num_steps`` and H = ``length`` terms per t."""
    return History(terms=jnp.zeros((num_steps + 1, length), jnp.float32),
                   count=jnp.zeros((num_steps + 1,), jnp.int32))


def log_normal_probs(schedule: Schedule, mean: float, std: float) -> jnp.ndarray:
    """p ``(T+1,)``: the mass of N(mean, std²) in ln σ on each t's interval (edges at the midpoints
    between consecutive ln σ_t; t = 1 takes everything below, t = T everything above), p_0 = 0."""
    ls = -step_grids.log_snr(schedule)[1:]  # ln σ_t for t = 1..T, increasing
    mid = 0.5 * (ls[1:] + ls[:-1])
    cdf = jax.scipy.special.ndtr((mid - mean) / std)
    cdf = jnp.concatenate([jnp.zeros((1,), cdf.dtype), cdf, jnp.ones((1,), cdf.dtype)])
    return jnp.concatenate([jnp.zeros((1,), cdf.dtype), jnp.diff(cdf)])


def importance_probs(history: History, uniform_share: float) -> jnp.ndarray:
    """p ``(T+1,)`` from the history: (1 − u) √(mean ℓ²)/Σ √(mean ℓ²) + u/T, or 1/T everywhere
    until every t in 1..T holds H terms; p_0 = 0."""
    num_t = history.count.shape[0] - 1
    rms = jnp.sqrt(jnp.mean(jnp.square(history.terms[1:]), axis=1))
    full = jnp.all(history.count[1:] >= history.terms.shape[1]) & (jnp.sum(rms) > 0)
    learnt = (1.0 - uniform_share) * rms / jnp.where(full, jnp.sum(rms), 1.0) + uniform_share / num_t
    p = jnp.where(full, learnt, 1.0 / num_t)
    return jnp.concatenate([jnp.zeros((1,), p.dtype), p])


def draw(key, batch_size: int, probs: jnp.ndarray, correct: bool):
    """(t ``(B,)`` int32 in 1..T drawn from ``probs``, c ``(B,)`` float32): c = 1/(T p_t) when
    ``correct`` (importance sampling for the uniform objective), else ones.

    ``key``: one key or one per example, split as the objectives split it (t from the first half).
    """
    k_t, _ = rng.split(key)
    if rng.is_key_batch(k_t):
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(k_t)
    else:
        u = jax.random.uniform(k_t, (batch_size,), jnp.float32)
    num_t = probs.shape[0] - 1
    cdf = jnp.cumsum(probs.astype(jnp.float32))
    cdf = cdf / cdf[-1]  # exactly 1 at T, whatever the float32 sum's rounding
    # the first t with CDF(t) > u: CDF(t − 1) <= u < CDF(t), never a t of zero mass
    t = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 1, num_t).astype(jnp.int32)
    c = 1.0 / (num_t * probs[t]) if correct else jnp.ones(t.shape, jnp.float32)
    return t, c.astype(jnp.float32)


def update_history(history: History, t, terms, valid) -> History:
    """Appends each valid example's term to its t's row, in order (the oldest term drops out once
    H are held). ``t``, ``terms``, ``valid``: ``(B,)``, the global batch in example order."""

    def one(h: History, item):
        ti, li, vi = item
        row = jnp.concatenate([h.terms[ti, 1:], li[None].astype(h.terms.dtype)])
        terms_ = jnp.where(vi, h.terms.at[ti].set(row), h.terms)
        count = jnp.where(vi, h.count.at[ti].set(jnp.minimum(h.count[ti] + 1, h.terms.shape[1])), h.count)
        return History(terms=terms_, count=count), None

    history, _ = jax.lax.scan(one, history, (t, terms, valid))
    return history


def probs_for(kind: str, schedule: Schedule, history: Optional[History], *, log_normal_mean: float = -1.2,
              log_normal_std: float = 1.2, uniform_share: float = 1e-3) -> Optional[jnp.ndarray]:
    """The step's p for sampler ``kind`` (None for 'uniform': the objectives draw t themselves)."""
    if kind == "uniform":
        return None
    if kind == "log_normal":
        return log_normal_probs(schedule, log_normal_mean, log_normal_std)
    if kind == "importance":
        return importance_probs(history, uniform_share)
    raise ValueError(f"unknown t sampling {kind!r}; expected one of {T_SAMPLINGS}")

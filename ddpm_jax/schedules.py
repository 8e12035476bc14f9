"""Noise schedules for the forward process q(x_t | x_{t-1}) = N(√α_t x_{t-1}, (1 − α_t) I).

Convention (docs/conventions.md): the time index ``t`` runs over ``1..T`` and every array has length
``T + 1``, indexed by ``t`` directly. Index 0 describes the data itself:

    betas[0] = 0,   alphas[0] = 1,   alpha_bars[0] = ᾱ_0 = 1.

A :class:`Schedule` is a pytree (``flax.struct.dataclass``): pass it as an argument to jitted
functions. Only ``num_steps`` is static, so one compiled function serves every schedule with the
same ``T``.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Dict

import flax.struct
import jax.numpy as jnp
import numpy as np

__all__ = ["Schedule", "make_schedule", "schedule_from_betas", "SCHEDULES", "register_schedule", "schedule_params",
           "schedule_kwargs"]


@flax.struct.dataclass
class Schedule:
    """Variance schedule β_1..β_T and the quantities derived from it.

    Every array has shape ``(T+1,)`` and is indexed by t (index 0 describes the data). All are
    computed once in float64 NumPy and then cast, so e.g. 1 − ᾱ_t keeps full relative precision
    at small t even in float32 (where 1 − float32(ᾱ_1) would lose ~4 digits for β_1 = 1e-4).

      betas:                     β_t, β_0 = 0.
      alphas:                    α_t = 1 − β_t, α_0 = 1.
      alpha_bars:                ᾱ_t = ∏_{s=1}^t α_s, ᾱ_0 = 1.
      alpha_bars_prev:           ᾱ_{t−1}, with the value 1 at t = 0.
      one_minus_alpha_bars:      1 − ᾱ_t.
      sqrt_alpha_bars:           √ᾱ_t.
      sqrt_one_minus_alpha_bars: √(1 − ᾱ_t).
      posterior_variance:        β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); β̃_0 = β̃_1 = 0.
      posterior_coef_x0:         c_0(t) = √ᾱ_{t−1} β_t / (1 − ᾱ_t)   (μ̃_t = c_0 x_0 + c_t x_t); 1 at t ≤ 1.
      posterior_coef_xt:         c_t(t) = √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); 0 at t ≤ 1.
      snr:                       SNR_t = ᾱ_t / (1 − ᾱ_t), SNR_0 = +inf.
      num_steps:                 T (static: part of the pytree's structure, not a leaf).
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alpha_bars: jnp.ndarray
    alpha_bars_prev: jnp.ndarray
    one_minus_alpha_bars: jnp.ndarray
    sqrt_alpha_bars: jnp.ndarray
    sqrt_one_minus_alpha_bars: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_coef_x0: jnp.ndarray
    posterior_coef_xt: jnp.ndarray
    snr: jnp.ndarray
    num_steps: int = flax.struct.field(pytree_node=False)


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer T >= 1, got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be an integer T >= 1, got T = {num_steps}")
    return int(num_steps)


def schedule_from_betas(betas, dtype=jnp.float32) -> Schedule:
    """Builds a :class:`Schedule` from β_1..β_T.

    Args:
      betas: array-like of shape ``(T,)``: β_1..β_T, each strictly inside (0, 1).
      dtype: floating dtype of the stored arrays. Products are taken in float64 NumPy first, so
        ᾱ_t carries no accumulated float32 rounding.

    Returns:
      Schedule with arrays of shape ``(T+1,)`` (index 0 is the data: β_0 = 0, ᾱ_0 = 1).

    Raises:
      ValueError: if the array is empty or not 1-D, or some β_t is not in (0, 1) or not finite;
        the message names the first offending t and its value.
    """
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.shape[0] < 1:
        raise ValueError(f"betas must be a 1-D array of length T >= 1, got shape {b.shape}")
    bad = np.flatnonzero(~(np.isfinite(b) & (b > 0.0) & (b < 1.0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"every beta_t must be in (0, 1); beta_{i + 1} = {float(b[i])!r} is not "
            f"({bad.size} of {b.size} values out of range)"
        )
    full = np.concatenate([[0.0], b])
    log_abar = np.cumsum(np.log1p(-full))
    abar = np.exp(log_abar)
    one_minus = -np.expm1(log_abar)  # 1 − ᾱ_t without cancellation
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
    denom = np.where(one_minus > 0, one_minus, 1.0)
    post_var = np.where(one_minus > 0, full * one_minus_prev / denom, 0.0)
    coef_x0 = np.where(one_minus > 0, np.sqrt(abar_prev) * full / denom, 1.0)
    coef_x0[1] = 1.0  # β_1 / (1 − ᾱ_1) = 1 exactly: μ̃_1 = x_0
    coef_xt = np.where(one_minus > 0, np.sqrt(1.0 - full) * one_minus_prev / denom, 0.0)
    with np.errstate(divide="ignore"):
        snr = np.where(one_minus > 0, abar / denom, np.inf)
    cast = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
    return Schedule(
        betas=cast(full),
        alphas=cast(1.0 - full),
        alpha_bars=cast(abar),
        alpha_bars_prev=cast(abar_prev),
        one_minus_alpha_bars=cast(one_minus),
        sqrt_alpha_bars=cast(np.sqrt(abar)),
        sqrt_one_minus_alpha_bars=cast(np.sqrt(one_minus)),
        posterior_variance=cast(post_var),
        posterior_coef_x0=cast(coef_x0),
        posterior_coef_xt=cast(coef_xt),
        snr=cast(snr),
        num_steps=int(b.shape[0]),
    )


def _check_increasing(beta_start, beta_end) -> None:
    if beta_start > beta_end:
        raise ValueError(f"beta_start = {beta_start} > beta_end = {beta_end}: β_t must not decrease with t "
                         "(were the two swapped?)")


def _linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β_t evenly spaced from ``beta_start`` (t = 1) to ``beta_end`` (t = T) (Ho et al. 2020).

    The source notebook uses 1e-4..0.1 with T = 200; the lecture 1e-4..0.02 with T = 1000.
    ``beta_start > beta_end`` is refused: noise would be added fastest where the signal is
    already smallest, the reverse of every published schedule, and it is almost always a swap.
    """
    _check_increasing(beta_start, beta_end)
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): ᾱ(t) = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)),
    β_t = min(1 − ᾱ(t)/ᾱ(t−1), ``max_beta``). The clipping keeps β_T below 1."""
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    abar = f / f[0]
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def _quadratic_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """√β_t evenly spaced from √beta_start to √beta_end (the DDPM code's 'quad' schedule)."""
    _check_increasing(beta_start, beta_end)
    return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2


SCHEDULES: Dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear_betas,
    "cosine": _cosine_betas,
    "quadratic": _quadratic_betas,
}


def register_schedule(name: str, betas_fn: Callable[..., np.ndarray]) -> None:
    """Adds a named schedule: ``betas_fn(num_steps, **kw)`` returns β_1..β_T, shape ``(T,)``."""
    SCHEDULES[name] = betas_fn


def schedule_params(name: str) -> tuple:
    """The keyword parameters schedule ``name`` takes (e.g. ``('beta_start', 'beta_end')``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {sorted(SCHEDULES)}")
    sig = inspect.signature(SCHEDULES[name])
    return tuple(p.name for p in list(sig.parameters.values())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def schedule_kwargs(name: str, settings: Dict) -> Dict:
    """The entries of ``settings`` (a config's schedule section minus ``name``/``num_steps``)
    that schedule ``name`` takes. Entries that belong to another known schedule are left out, so
    one config can carry the parameters of several schedules and switch between them by name;
    an entry no known schedule takes raises ValueError naming it."""
    known = {p for n in SCHEDULES for p in schedule_params(n)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown schedule parameter {unknown[0]!r}; schedule {name!r} takes "
                         f"{list(schedule_params(name))}")
    mine = schedule_params(name)
    return {k: v for k, v in settings.items() if k in mine}


def make_schedule(name: str, num_steps: int, dtype=jnp.float32, **kw) -> Schedule:
    """Builds a named schedule with T = ``num_steps`` steps.

    Args:
      name: ``'linear'`` (kw ``beta_start``, ``beta_end``), ``'cosine'`` (kw ``s``,
        ``max_beta``), ``'quadratic'`` (kw ``beta_start``, ``beta_end``), or a name added with
        :func:`register_schedule`.
      num_steps: T >= 1.
      dtype: dtype of the stored arrays.
      **kw: the schedule's parameters.

    Returns:
      Schedule whose arrays have shape ``(T+1,)``.

    Raises:
      ValueError: unknown name (the message lists the known ones), T < 1, a keyword the
        schedule does not take, or any β_t outside (0, 1).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {sorted(SCHEDULES)}")
    num_steps = _check_num_steps(num_steps)
    try:
        betas = SCHEDULES[name](num_steps, **kw)
    except TypeError as e:
        raise ValueError(f"schedule {name!r}: {e}") from None
    return schedule_from_betas(betas, dtype=dtype)

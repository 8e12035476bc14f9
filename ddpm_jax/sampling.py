"""Reverse-process samplers, each one ``lax.scan`` over time steps.

``sample(model_fn, schedule, shape, key, method=...)`` runs x_T ~ N(0, I) down to x_0. The model
is any callable ``model_fn(x_t, t) -> prediction`` (t: int32 ``(B,)``); its output is read in the
method's native parameterisation unless ``parameterisation=`` says otherwise, and converted with
:mod:`ddpm_jax.diffusion` to whatever the update needs. In the updates below, x̂_0 and ε̂ are the
model's estimates (consistent: x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂), z ~ N(0, I) fresh each step, and
no noise is added at the last step (t = 1, or the last DDIM step).

==============  ======  ==========================================================================
method          native  update x_t -> x_{t−1}
==============  ======  ==========================================================================
'xprev_det'     mean    x_{t−1} = F(x_t, t)
'xprev_noise'   mean    x_{t−1} = F(x_t, t) + √(1 − α_t) z            (the notebook's mean sampler)
'x0_fresh'      x0      x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1}) z
'x0_coherent'   x0      x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1}) ε̂,  ε̂ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t)
'eps_det'       eps     x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1}) ε̂    (= 'ddim', eta 0, all T steps)
'eps_ddpm'      eps     x_{t−1} = μ_θ(x_t, t) + σ_t z,  μ_θ = (x_t − β_t/√(1 − ᾱ_t) ε̂)/√α_t,
                        σ_t² = β̃_t (``ddpm_variance='posterior'``) or β_t (``'beta'``, the notebook)
'ddim'          eps     on S = ``num_steps`` strided steps τ_S > … > τ_1, τ_0 = 0 (Song et al. 2021):
                        x_{τ−} = √ᾱ_{τ−} x̂_0 + √(1 − ᾱ_{τ−} − σ²) ε̂ + σ z,
                        σ = eta · √((1 − ᾱ_{τ−})/(1 − ᾱ_τ)) · √(1 − ᾱ_τ/ᾱ_{τ−})
'dpm_solver_pp' x0      DPM-Solver++(2M) on the log-SNR of S steps, one evaluation each
                        (:mod:`ddpm_jax.solvers`)
'heun'          x0      EDM's Heun sampler on σ_t = √((1 − ᾱ_t)/ᾱ_t) over S steps, 2S − 1
                        evaluations, optional churn (:mod:`ddpm_jax.solvers`)
==============  ======  ==========================================================================

'ddim', 'dpm_solver_pp' and 'heun' take S = ``num_steps`` steps on a ``grid`` of
:mod:`ddpm_jax.step_grids` ('uniform_t', 'lambda' or 'edm'; by default 'uniform_t', 'lambda' and
'edm' respectively); the other methods take every step. 'ddim' with η = 1 is the ancestral sampler
on the respaced schedule (β_τ = 1 − ᾱ_τ/ᾱ_{τ−}, σ² = β̃_τ; Nichol & Dhariwal 2021).

Memory is O(batch) unless ``return_trajectory=True``; :func:`sample_in_batches` draws large
counts one compiled batch at a time.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, guidance as guidance_lib, solvers, step_grids
from ddpm_jax.diffusion import extract
from ddpm_jax.schedules import Schedule
from ddpm_jax.step_grids import GRIDS, ddim_timesteps

__all__ = ["METHODS", "GRIDS", "sample", "ddim_timesteps", "check_sampler_args", "nfe", "sample_in_batches"]

#: method -> the parameterisation its update reads natively.
METHODS: Dict[str, str] = {
    "xprev_det": "mean",
    "xprev_noise": "mean",
    "x0_fresh": "x0",
    "x0_coherent": "x0",
    "eps_det": "eps",
    "eps_ddpm": "eps",
    "ddim": "eps",
    "dpm_solver_pp": "x0",
    "heun": "x0",
}

#: methods that take ``num_steps`` steps on a grid, and their default grid.
STRIDED: Dict[str, str] = {"ddim": "uniform_t", "dpm_solver_pp": "lambda", "heun": "edm"}

DDPM_VARIANCES = ("posterior", "beta")


def check_sampler_args(method: str, num_train_steps: int, num_steps=None, eta=0.0, ddpm_variance="posterior", parameterisation=None,
                       grid=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0) -> int:
    """Validates sampler arguments before anything is compiled; returns the number of steps S.

    Raises ValueError: unknown method / parameterisation / ddpm_variance / grid, eta outside [0, 1],
    num_steps outside 1..T, num_steps ≠ T or a grid for a method that always takes every step,
    churn settings for a method other than 'heun', or negative / inverted churn settings.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; valid methods: {sorted(METHODS)}")
    if parameterisation is not None and parameterisation not in diffusion.PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {parameterisation!r}; expected one of {diffusion.PARAMETERISATIONS}")
    if ddpm_variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown ddpm_variance {ddpm_variance!r}; expected one of {DDPM_VARIANCES}")
    if isinstance(eta, (int, float, np.integer, np.floating)) and not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if grid is not None:
        if grid not in GRIDS:
            raise ValueError(f"unknown step grid {grid!r}; expected one of {GRIDS}")
        if method not in STRIDED:
            raise ValueError(f"method {method!r} takes every step; a step grid needs one of {sorted(STRIDED)}")
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    if churn != (0.0, 0.0, float("inf"), 1.0):
        if method != "heun":
            raise ValueError(f"s_churn, s_tmin, s_tmax and s_noise are settings of method 'heun', not {method!r}")
        if min(s_churn, s_tmin, s_noise) < 0 or s_tmin > s_tmax:
            raise ValueError(f"heun churn needs s_churn, s_tmin, s_noise >= 0 and s_tmin <= s_tmax; got "
                             f"s_churn={s_churn}, s_tmin={s_tmin}, s_tmax={s_tmax}, s_noise={s_noise}")
    if num_steps is None:
        return num_train_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be an integer in 1..T = 1..{num_train_steps}, got {num_steps!r}")
    if method not in STRIDED and num_steps != num_train_steps:
        raise ValueError(f"method {method!r} takes all T = {num_train_steps} steps; num_steps={num_steps} needs one of "
                         f"{sorted(STRIDED)}")
    return int(num_steps)


def nfe(method: str, num_train_steps: int, num_steps=None) -> int:
    """Network evaluations per sample: 2S − 1 for 'heun', S for the other methods (S = T unless given)."""
    S = num_steps or num_train_steps
    return 2 * S - 1 if method == "heun" else S


def _estimates(schedule, x_t, t, pred, parameterisation, clip_x0):
    """(x̂_0, ε̂) from the model output, with x̂_0 optionally clipped (ε̂ then recomputed)."""
    x0_hat, eps_hat = diffusion.x0_eps_from_prediction(schedule, x_t, t, pred, parameterisation)
    if clip_x0 is not None:
        x0_hat = jnp.clip(x0_hat, clip_x0[0], clip_x0[1])
        eps_hat = diffusion.predict_eps_from_x0(schedule, x_t, t, x0_hat)
    return x0_hat, eps_hat


def sample(
    model_fn: Callable,
    schedule: Schedule,
    shape: Sequence[int],
    key,
    *,
    method: str,
    num_steps: Optional[int] = None,
    eta: float = 0.0,
    clip_x0: Optional[Sequence[float]] = None,
    ddpm_variance: str = "posterior",
    parameterisation: Optional[str] = None,
    grid: Optional[str] = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    labels=None,
    guidance: float = 0.0,
    return_trajectory: bool = False,
):
    """Draws ``shape[0]`` samples by running the reverse process (see the module docstring).

    Args:
      model_fn: ``(x_t (B, ...), t (B,) int32) -> prediction (B, ...)``.
      schedule: the training schedule (T = ``schedule.num_steps``).
      shape: ``(B, H, W, C)`` (any ``(B, ...)``).
      key: PRNG key; x_T uses ``split(key)[0]``, the step at time t uses ``fold_in(split(key)[1], t)``.
      method: one of :data:`METHODS`.
      num_steps: S for 'ddim', 'dpm_solver_pp' and 'heun' (1..T); other methods take all T steps (None or T).
      eta: DDIM stochasticity in [0, 1] (0 deterministic, 1 = DDPM-like posterior noise).
      clip_x0: optional (lo, hi) to clip x̂_0 each step (ε̂ made consistent with the clipped x̂_0).
      ddpm_variance: 'posterior' (β̃_t) or 'beta' (β_t) for 'eps_ddpm'.
      parameterisation: what ``model_fn`` predicts, if not the method's native one.
      grid: the step grid of 'ddim', 'dpm_solver_pp' and 'heun' (:data:`GRIDS`; None = the method's default).
      s_churn, s_tmin, s_tmax, s_noise: EDM's churn for 'heun' (s_churn = 0: deterministic).
      labels: int ``(B,)`` classes to draw (−1: no class), for a conditional ``model_fn(x_t, t, y)``
        (:mod:`ddpm_jax.guidance`); None: ``model_fn(x_t, t)``.
      guidance: classifier-free guidance w >= 0 with ``labels``: the sampler sees
        (1 + w) f(x_t, t, c) − w f(x_t, t, ∅), both from one network call on 2B inputs.
      return_trajectory: also return the trajectory.

    Returns:
      x_0 ``shape``; with ``return_trajectory``, ``(x_0, traj)`` where traj has
      't' ``(S,)`` (the steps in the order taken, T first), 'x' ``(S+1, *shape)`` (x_T first, x_0
      last), and 'x0', 'eps' ``(S, *shape)``: x̂_0 and ε̂ at each step.
    """
    S = check_sampler_args(method, schedule.num_steps, num_steps, eta, ddpm_variance, parameterisation, grid,
                           s_churn, s_tmin, s_tmax, s_noise)
    if labels is not None:
        if isinstance(guidance, (int, float)) and not guidance >= 0:
            raise ValueError(f"guidance = {guidance}: must be >= 0 (0 = the conditional model)")
        model_fn = guidance_lib.guided_model_fn(model_fn, labels, guidance)
    elif not (isinstance(guidance, (int, float)) and guidance == 0):
        raise ValueError(f"guidance = {guidance} needs labels (the classes to draw)")
    param = parameterisation or METHODS[method]
    T = schedule.num_steps
    if method in STRIDED:
        taus = step_grids.timestep_grid(schedule, S, grid or STRIDED[method])
    else:
        taus = jnp.arange(1, T + 1, dtype=jnp.int32)
    k_init, k_steps = jax.random.split(key)
    x_T = jax.random.normal(k_init, tuple(shape), jnp.float32)
    B = shape[0]

    def denoise(x_t, t):
        return _estimates(schedule, x_t, t, model_fn(x_t, t), param, clip_x0)

    if method == "dpm_solver_pp":
        return solvers.dpm_solver_pp(denoise, schedule, x_T, taus, return_trajectory=return_trajectory)
    if method == "heun":
        return solvers.heun(denoise, schedule, x_T, taus, k_steps, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                            s_noise=s_noise, return_trajectory=return_trajectory)

    ts = taus[::-1]  # descending: τ_S .. τ_1
    t_prevs = jnp.concatenate([jnp.zeros((1,), jnp.int32), taus[:-1]])[::-1]  # τ_{i−1}, τ_0 = 0

    def step(x_t, ts_pair):
        t_scalar, t_prev_scalar = ts_pair
        t = jnp.full((B,), t_scalar, jnp.int32)
        t_prev = jnp.full((B,), t_prev_scalar, jnp.int32)
        pred = model_fn(x_t, t)
        x0_hat, eps_hat = _estimates(schedule, x_t, t, pred, param, clip_x0)
        z = jax.random.normal(jax.random.fold_in(k_steps, t_scalar), x_t.shape, x_t.dtype)
        not_last = (t_prev_scalar > 0).astype(x_t.dtype)
        abar_prev = extract(schedule.alpha_bars, t_prev, x_t.shape)
        sqrt_1m_abar_prev = extract(schedule.sqrt_one_minus_alpha_bars, t_prev, x_t.shape)

        if method in ("xprev_det", "xprev_noise"):
            mu = pred if (param == "mean" and clip_x0 is None) else diffusion.mean_from_x0(schedule, x_t, t, x0_hat)
            x_prev = mu
            if method == "xprev_noise":
                x_prev = mu + not_last * extract(jnp.sqrt(schedule.betas), t, x_t.shape) * z
        elif method == "x0_fresh":
            x_prev = jnp.sqrt(abar_prev) * x0_hat + sqrt_1m_abar_prev * z
        elif method in ("x0_coherent", "eps_det"):
            x_prev = jnp.sqrt(abar_prev) * x0_hat + sqrt_1m_abar_prev * eps_hat
        elif method == "eps_ddpm":
            mu = diffusion.mean_from_x0(schedule, x_t, t, x0_hat) if clip_x0 is not None else diffusion.mean_from_eps(schedule, x_t, t, eps_hat)
            var = schedule.posterior_variance if ddpm_variance == "posterior" else schedule.betas
            x_prev = mu + not_last * extract(jnp.sqrt(var), t, x_t.shape) * z
        else:  # ddim
            abar_t = extract(schedule.alpha_bars, t, x_t.shape)
            one_minus_t = extract(schedule.one_minus_alpha_bars, t, x_t.shape)
            one_minus_prev = jnp.square(sqrt_1m_abar_prev)
            sigma = eta * jnp.sqrt(one_minus_prev / one_minus_t) * jnp.sqrt(jnp.clip(1.0 - abar_t / abar_prev, 0.0, None))
            x_prev = (
                jnp.sqrt(abar_prev) * x0_hat
                + jnp.sqrt(jnp.clip(one_minus_prev - jnp.square(sigma), 0.0, None)) * eps_hat
                + sigma * z
            )
        out = (x_prev, x0_hat, eps_hat) if return_trajectory else None
        return x_prev, out

    x_0, outs = jax.lax.scan(step, x_T, (ts, t_prevs))
    return (x_0, solvers.trajectory(ts, x_T, outs)) if return_trajectory else x_0


def sample_in_batches(sample_fn: Callable, num: int, batch_size: int, key, *, labels=None,
                      progress: bool = True) -> np.ndarray:
    """Draws ``num`` samples with ``sample_fn(key) -> (batch_size, ...)``, batch by batch; with
    ``labels`` (``(num,)`` int, the class of each sample), ``sample_fn(key, labels_of_the_batch)``.

    ``sample_fn`` should be jitted (one compile serves every batch); batch i uses ``fold_in(key, i)``.
    Returns a NumPy array ``(num, ...)`` (the last batch is trimmed).
    """
    from tqdm.auto import tqdm

    out = []
    n_batches = -(-num // batch_size)
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num,):
            raise ValueError(f"labels must have shape ({num},), one class per sample, got {labels.shape}")
        labels = np.concatenate([labels, np.full(n_batches * batch_size - num, labels[-1], np.int32)])
    for i in tqdm(range(n_batches), desc="sampling", unit="batch", disable=not progress):
        k = jax.random.fold_in(key, i)
        y = None if labels is None else labels[i * batch_size:(i + 1) * batch_size]
        out.append(np.asarray(sample_fn(k) if y is None else sample_fn(k, y)))
    return np.concatenate(out, axis=0)[:num]

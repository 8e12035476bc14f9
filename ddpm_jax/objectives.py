"""Training objectives, one per parameterisation, selected by name.

Every objective is a pure function

    loss, aux = objective(model_fn, schedule, x0, key, *, weighting=..., reduction=..., t=None)

with ``model_fn(x_t, t) -> prediction`` (any callable: a bound Flax module, an analytic denoiser),
``x0`` a batch ``(B, ...)`` and ``key`` a PRNG key — or one key per example
(:func:`ddpm_jax.rng.per_example_keys`), which makes each example's draws independent of how the
batch is split across devices. It returns the batch loss (mean over the batch
of the per-example terms, a scalar) and ``aux = {'per_example': (B,), 't': (B,)}``.

Time steps are drawn uniformly from 1..T inclusive unless ``t`` is given. All objectives split the
key the same way, so with one key they see the same t and the same x_t.

==========  ================  ===================================================================
name        network predicts  per-example term (w_t = weight, ‖·‖² summed or averaged over pixels)
==========  ================  ===================================================================
'xprev'     x_{t−1}           w_t ‖x_{t−1} − F‖²,  x_{t−1} drawn jointly with x_t;
                              'elbo' weight 1 / (2(1 − α_t)) (default)
'mean'      μ                 w_t (‖μ̃_t − F‖² + d β̃_t)  — the Rao-Blackwellised 'xprev' loss:
                              its conditional expectation over x_{t−1} given (x_0, x_t);
                              'elbo' weight 1 / (2(1 − α_t)) (default)
'x0'        x_0               w_t ‖x_0 − F‖²,  weight 'simple' = 1 (default)
'eps'       ε                 w_t ‖ε − F‖²,  'simple' = 1 (default) or
                              'elbo' = (1 − α_t) / (2 α_t (1 − ᾱ_t))
'v'         v                 w_t ‖v − F‖²,  v = √ᾱ_t ε − √(1 − ᾱ_t) x_0; 'simple' (default)
==========  ================  ===================================================================

``weighting='elbo'`` is, for every parameterisation, the weight that makes the term equal to the
Gaussian KL term of the variational bound with reverse variance σ_t² = β_t = 1 − α_t (the
source's choice): ‖μ̃_t − μ_θ‖² / (2β_t) written in that parameterisation (see
:func:`elbo_weight`). 'min_snr', 'p2' and 'edm' are the literature's weightings as functions of
SNR(t), the same loss example by example in every parameterisation (:mod:`ddpm_jax.weightings`;
their parameters through ``get_objective(..., weighting_params=)``). ``weighting`` may also be a
callable ``(schedule, t) -> (B,)``.

On ``reduction='mean'`` (the notebook's "per-pixel mean reduces the estimator's variance by 1/d"):
the per-pixel mean is the per-pixel sum divided by the constant d, so the loss estimator's
*variance* scales by 1/d² — and its standard deviation, its mean and its gradient all by 1/d — so
the coefficient of variation (sd/mean, the scale-free measure of noise) is unchanged: nothing
about the estimator's relative noise improves. With Adam, whose update m̂/(√v̂ + ε) is invariant
to rescaling the gradient by a constant (up to the ε term), the two reductions produce (nearly)
the same parameter updates. It is a change of learning-rate scale for SGD, and none for Adam.
``tests/test_objectives.py`` checks all three statements.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple, Union

import jax.numpy as jnp

from ddpm_jax import diffusion, rng, weightings
from ddpm_jax.schedules import Schedule

__all__ = [
    "OBJECTIVES",
    "PREDICTS",
    "WEIGHTINGS",
    "REDUCTIONS",
    "sample_timesteps",
    "elbo_weight",
    "xprev_loss",
    "mean_loss",
    "x0_loss",
    "eps_loss",
    "v_loss",
    "get_objective",
]

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
Weighting = Union[str, Callable[[Schedule, jnp.ndarray], jnp.ndarray]]

WEIGHTINGS = ("elbo", "simple") + weightings.SNR_WEIGHTINGS
REDUCTIONS = ("sum", "mean")


def sample_timesteps(key, batch_size: int, num_steps: int) -> jnp.ndarray:
    """t ~ Uniform{1, ..., T} (T inclusive), shape ``(batch_size,)``, int32 (key: one, or one per example)."""
    return rng.randint(key, batch_size, 1, num_steps + 1)


def elbo_weight(schedule: Schedule, t, parameterisation: str) -> jnp.ndarray:
    """λ_p(t) such that λ_p(t) ‖target − prediction‖² = ‖μ̃_t − μ_θ‖² / (2β_t).

    That is the t-th Gaussian KL term of the variational bound (reverse variance σ_t² = β_t),
    up to its additive constant, written for a network predicting ``parameterisation``:

      mean: 1 / (2β_t)
      eps:  β_t / (2 α_t (1 − ᾱ_t))                 (= (1 − α_t) / (2 α_t (1 − ᾱ_t)))
      x0:   ᾱ_{t−1} β_t / (2 (1 − ᾱ_t)²)
      v:    ᾱ_{t−1} β_t / (2 (1 − ᾱ_t))             (= ᾱ_t × the eps weight)

    Args: t ``(B,)`` in 1..T. Returns: ``(B,)``.
    """
    b = schedule.betas[t]
    a = schedule.alphas[t]
    one_minus_abar = schedule.one_minus_alpha_bars[t]
    abar_prev = schedule.alpha_bars_prev[t]
    if parameterisation == "mean":
        return 1.0 / (2.0 * b)
    if parameterisation == "eps":
        return b / (2.0 * a * one_minus_abar)
    if parameterisation == "x0":
        return abar_prev * b / (2.0 * one_minus_abar**2)
    if parameterisation == "v":
        return abar_prev * b / (2.0 * one_minus_abar)
    raise ValueError(f"unknown parameterisation {parameterisation!r}; expected one of {diffusion.PARAMETERISATIONS}")


def _weight(weighting: Weighting, schedule: Schedule, t, parameterisation: str) -> jnp.ndarray:
    if callable(weighting):
        return weighting(schedule, t)
    if weighting == "elbo":
        return elbo_weight(schedule, t, parameterisation)
    if weighting == "simple":
        return jnp.ones(t.shape, schedule.betas.dtype)
    if weighting in weightings.SNR_WEIGHTINGS:  # with the papers' default parameters
        return weightings.snr_weight(weighting, schedule, t, parameterisation)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS} or a callable")


def _reduce(sq: jnp.ndarray, reduction: str) -> jnp.ndarray:
    """Sum or mean of a ``(B, ...)`` array over its non-batch axes -> ``(B,)``."""
    axes = tuple(range(1, sq.ndim))
    if reduction == "sum":
        return jnp.sum(sq, axis=axes)
    if reduction == "mean":
        return jnp.mean(sq, axis=axes)
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def _draw(schedule: Schedule, x0, key, t):
    """Common randomness: (t, ε, k_noise). Same key -> same t and x_t in every objective.

    ``key`` is one key, or one key per example (:mod:`ddpm_jax.rng`), in which case example i's
    draws depend on its key alone, however the batch is split across devices.
    """
    k_t, k_noise = rng.split(key)
    if t is None:
        t = rng.randint(k_t, x0.shape[0], 1, schedule.num_steps + 1)
    else:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x0.shape[0],))
    k_eps, _ = rng.split(k_noise)  # the split diffusion.q_sample_pair makes
    eps = rng.normal(k_eps, x0.shape, x0.dtype)
    return t, eps, k_noise


def _finish(per_example, t):
    return jnp.mean(per_example), {"per_example": per_example, "t": t}


def xprev_loss(
    model_fn: ModelFn, schedule: Schedule, x0, key, *, weighting: Weighting = "elbo", reduction: str = "sum", t=None
) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Direct x_{t−1} regression (the source notebook's mean objective, Coding I).

    (x_{t−1}, x_t) ~ q(x_{t−1}, x_t | x_0) jointly (:func:`diffusion.q_sample_pair`), F = model_fn(x_t, t),

        per_example = w_t ‖x_{t−1} − F‖²,   w_t = 1 / (2(1 − α_t)) for 'elbo'.

    ``reduction='mean'`` divides by d: see the module docstring for what that does (variance ×1/d²,
    coefficient of variation unchanged, Adam updates nearly unchanged) and does not do.

    Args: x0 ``(B, ...)``; key; t ``(B,)`` or None (uniform on 1..T).
    Returns: (scalar loss, {'per_example': (B,), 't': (B,)}).
    """
    t, _, k_noise = _draw(schedule, x0, key, t)
    x_prev, x_t = diffusion.q_sample_pair(schedule, x0, t, k_noise)
    pred = model_fn(x_t, t)
    per_example = _weight(weighting, schedule, t, "mean") * _reduce(jnp.square(x_prev - pred), reduction)
    return _finish(per_example, t)


def mean_loss(
    model_fn: ModelFn, schedule: Schedule, x0, key, *, weighting: Weighting = "elbo", reduction: str = "sum", t=None
) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Posterior-mean matching: the Rao-Blackwellised 'xprev' loss.

    x_t ~ q(x_t | x_0), F = model_fn(x_t, t), (μ̃_t, β̃_t) = q_posterior(x_0, x_t, t),

        per_example = w_t (‖μ̃_t − F‖² + d β̃_t)        ('sum'; 'mean' divides the bracket by d)

    which is E[w_t ‖x_{t−1} − F‖² | x_0, x_t]: the same expectation as 'xprev' with no
    x_{t−1} noise, hence variance no larger. The d β̃_t term is constant in the parameters.
    With the same key, x_t and t equal those of :func:`xprev_loss`.

    Args/Returns: as :func:`xprev_loss`.
    """
    t, eps, _ = _draw(schedule, x0, key, t)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    mu, var = diffusion.q_posterior(schedule, x0, x_t, t)
    pred = model_fn(x_t, t)
    sq = jnp.square(mu - pred) + var  # var broadcasts: summing it over d pixels gives d·β̃_t
    per_example = _weight(weighting, schedule, t, "mean") * _reduce(sq, reduction)
    return _finish(per_example, t)


def x0_loss(
    model_fn: ModelFn, schedule: Schedule, x0, key, *, weighting: Weighting = "simple", reduction: str = "sum", t=None
) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Data prediction: per_example = w_t ‖x_0 − F(x_t, t)‖², x_t ~ q(x_t | x_0).

    Args/Returns: as :func:`xprev_loss`; 'elbo' weight ᾱ_{t−1} β_t / (2(1 − ᾱ_t)²).
    """
    t, eps, _ = _draw(schedule, x0, key, t)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    pred = model_fn(x_t, t)
    per_example = _weight(weighting, schedule, t, "x0") * _reduce(jnp.square(x0 - pred), reduction)
    return _finish(per_example, t)


def eps_loss(
    model_fn: ModelFn, schedule: Schedule, x0, key, *, weighting: Weighting = "simple", reduction: str = "sum", t=None
) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Noise prediction: per_example = w_t ‖ε − ε_θ(x_t, t)‖², x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.

    'simple': w_t = 1 (Ho et al.'s L_simple; what the source notebook's code trains in effect).
    'elbo':   w_t = (1 − α_t) / (2 α_t (1 − ᾱ_t)), making the term equal to the mean-matching
              KL term ‖μ̃_t − μ_θ‖² / (2β_t) with μ_θ = :func:`diffusion.mean_from_eps`.

    Args/Returns: as :func:`xprev_loss`.
    """
    t, eps, _ = _draw(schedule, x0, key, t)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    pred = model_fn(x_t, t)
    per_example = _weight(weighting, schedule, t, "eps") * _reduce(jnp.square(eps - pred), reduction)
    return _finish(per_example, t)


def v_loss(
    model_fn: ModelFn, schedule: Schedule, x0, key, *, weighting: Weighting = "simple", reduction: str = "sum", t=None
) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Velocity prediction (Salimans & Ho 2022): per_example = w_t ‖v − v_θ(x_t, t)‖²,
    v = √ᾱ_t ε − √(1 − ᾱ_t) x_0.

    Args/Returns: as :func:`xprev_loss`; 'elbo' weight ᾱ_{t−1} β_t / (2(1 − ᾱ_t)).
    """
    t, eps, _ = _draw(schedule, x0, key, t)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    target = diffusion.predict_v(schedule, x0, t, eps)
    pred = model_fn(x_t, t)
    per_example = _weight(weighting, schedule, t, "v") * _reduce(jnp.square(target - pred), reduction)
    return _finish(per_example, t)


#: name -> loss function.
OBJECTIVES: Dict[str, Callable[..., Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]]] = {
    "xprev": xprev_loss,
    "mean": mean_loss,
    "x0": x0_loss,
    "eps": eps_loss,
    "v": v_loss,
}

#: name -> what the network predicts (a :data:`diffusion.PARAMETERISATIONS` entry).
PREDICTS: Dict[str, str] = {"xprev": "mean", "mean": "mean", "x0": "x0", "eps": "eps", "v": "v"}


def get_objective(name: str, *, weighting: Weighting | None = None, reduction: str = "sum",
                  weighting_params: Dict[str, float] | None = None):
    """The objective ``name`` with its options bound, checked now rather than under jit.

    Args:
      name: one of :data:`OBJECTIVES` ('xprev', 'mean', 'x0', 'eps', 'v').
      weighting: 'elbo', 'simple', 'min_snr', 'p2', 'edm', a callable ``(schedule, t) -> (B,)``,
        or None for the objective's default ('elbo' for 'xprev' and 'mean', 'simple' otherwise).
      reduction: 'sum' or 'mean' over the non-batch axes.
      weighting_params: the parameters of 'min_snr' (gamma), 'p2' (k, gamma) or 'edm'
        (sigma_data); missing ones take :data:`ddpm_jax.weightings.DEFAULTS`.

    Returns:
      ``fn(model_fn, schedule, x0, key, t=None) -> (loss, aux)``.

    Raises:
      ValueError: unknown name, weighting or reduction (the message lists the valid ones).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {sorted(OBJECTIVES)}")
    if weighting is not None and not callable(weighting) and weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS} or a callable")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if weighting in weightings.SNR_WEIGHTINGS:
        params = weightings.check_params(weighting, dict(weighting_params or {}))
        parameterisation, snr_name = PREDICTS[name], weighting
        weighting = lambda schedule, t: weightings.snr_weight(snr_name, schedule, t, parameterisation, **params)  # noqa: E731
    elif weighting_params:
        raise ValueError(f"weighting_params are for {weightings.SNR_WEIGHTINGS}, not weighting {weighting!r}")
    kw = {"reduction": reduction}
    if weighting is not None:
        kw["weighting"] = weighting
    return functools.partial(OBJECTIVES[name], **kw)

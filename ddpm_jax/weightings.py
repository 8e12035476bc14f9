"""Loss weightings from the literature, written once as a function of SNR(t) = ᾱ_t / (1 − ᾱ_t).

Each weighting is defined by λ(SNR), its weight on the data-prediction error ‖x_0 − x̂_0‖²; a
network that predicts another quantity p gets the same per-example loss through

    w_p(t) = λ(SNR_t) · c_p(t),     ‖x_0 − x̂_0‖² = c_p(t) ‖p − p̂‖²,

with x̂_0 the data prediction implied by p̂ (:mod:`ddpm_jax.diffusion`):

    x0:    c = 1
    eps:   c = 1 / SNR_t                          (x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t)
    v:     c = 1 − ᾱ_t = 1 / (SNR_t + 1)          (x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v̂)
    mean:  c = 1 / c_0(t)²                        (μ = c_0(t) x̂_0 + c_t(t) x_t, the posterior mean)

So one weighting gives, example by example, the same loss whichever quantity the network
predicts. The weightings (λ on the x_0 error; in brackets, the form their papers give):

    'min_snr'  λ = min(SNR, γ)                    (Hang et al. 2023: min(SNR, γ)/SNR on the ε-MSE,
                                                   min(SNR, γ)/(SNR + 1) on v; γ = 5)
    'p2'       λ = SNR / (k + SNR)^γ              (Choi et al. 2022: 1/(k + SNR)^γ on the ε-MSE;
                                                   k = 1, γ = 1 or 0.5)
    'edm'      λ = SNR + 1/σ_data²                (Karras et al. 2022: (σ² + σ_data²)/(σ σ_data)² on
                                                   the denoiser's error, σ² = 1/SNR; σ_data = 0.5)

At t = 0 (SNR = ∞, never drawn) the weights are not used.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict

import jax.numpy as jnp

from ddpm_jax.schedules import Schedule

__all__ = ["SNR_WEIGHTINGS", "DEFAULTS", "check_params", "data_weight", "error_scale", "snr_weight"]

#: name -> the parameters it takes, with their defaults (the papers' recommended values).
DEFAULTS: Dict[str, Dict[str, float]] = {
    "min_snr": {"gamma": 5.0},
    "p2": {"k": 1.0, "gamma": 1.0},
    "edm": {"sigma_data": 0.5},
}
SNR_WEIGHTINGS = tuple(DEFAULTS)


def check_params(name: str, params: Dict[str, float]) -> Dict[str, float]:
    """``params`` completed with the defaults of weighting ``name``; ValueError (one line) for an
    unknown name or parameter, or a value that is not a positive finite number (p2's γ may be 0)."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown SNR weighting {name!r}; expected one of {SNR_WEIGHTINGS}")
    unknown = sorted(set(params) - set(DEFAULTS[name]))
    if unknown:
        raise ValueError(f"weighting {name!r} takes {sorted(DEFAULTS[name])}, not {unknown}")
    out = {**DEFAULTS[name], **params}
    for key, value in out.items():
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        low_ok = value >= 0 if (name, key) == ("p2", "gamma") else value > 0
        if not (ok and low_ok):
            raise ValueError(f"weighting {name!r}: {key} must be a finite number "
                             f"{'>= 0' if (name, key) == ('p2', 'gamma') else '> 0'}, got {value!r}")
    return {k: float(v) for k, v in out.items()}


def data_weight(name: str, snr, **params) -> jnp.ndarray:
    """λ(SNR), the weight of weighting ``name`` on ‖x_0 − x̂_0‖² (module docstring). ``snr`` any shape."""
    p = check_params(name, params)
    snr = jnp.asarray(snr)
    if name == "min_snr":
        return jnp.minimum(snr, p["gamma"])
    if name == "p2":
        return snr / (p["k"] + snr) ** p["gamma"]
    return snr + 1.0 / p["sigma_data"] ** 2  # edm


def error_scale(schedule: Schedule, t, parameterisation: str) -> jnp.ndarray:
    """c_p(t) with ‖x_0 − x̂_0‖² = c_p(t) ‖p − p̂‖² for a network predicting ``parameterisation``
    ('x0', 'eps', 'v', 'mean'); ``t`` ``(B,)`` in 1..T → ``(B,)``."""
    snr = schedule.snr[t]
    if parameterisation == "x0":
        return jnp.ones_like(snr)
    if parameterisation == "eps":
        return 1.0 / snr
    if parameterisation == "v":
        return schedule.one_minus_alpha_bars[t]
    if parameterisation == "mean":  # c_0(t) = √ᾱ_{t−1} β_t / (1 − ᾱ_t), diffusion.posterior_mean_coefs
        return 1.0 / jnp.square(schedule.posterior_coef_x0[t])
    raise ValueError(f"unknown parameterisation {parameterisation!r}; expected 'x0', 'eps', 'v' or 'mean'")


def snr_weight(name: str, schedule: Schedule, t, parameterisation: str, **params) -> jnp.ndarray:
    """w_p(t) = λ(SNR_t) · c_p(t): the weight of weighting ``name`` on the squared error of a network
    predicting ``parameterisation``; ``t`` ``(B,)`` in 1..T → ``(B,)``."""
    return data_weight(name, schedule.snr[t], **params) * error_scale(schedule, t, parameterisation)

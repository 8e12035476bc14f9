"""GroupNorm through per-channel spatial sums: flax's ``nn.GroupNorm`` numbers, fast on XLA:CPU.

For ``x`` of shape ``(B, H, W, C)`` with G groups of C/G channels each and n = H·W·C/G::

    μ_bg  = (1/n) Σ_{h, w, c ∈ g} x_bhwc
    σ²_bg = (1/n) Σ_{h, w, c ∈ g} (x_bhwc − μ_bg)²          (two passes, as flax's
                                                            ``use_fast_variance=False``)
    y_bhwc = (x_bhwc − μ_bg) / √(σ²_bg + ε) · γ_c + β_c

Flax reduces the ``(B, H, W, G, C/G)`` view over the axes (1, 2, 4) at once, a strided
reduction XLA:CPU runs slowly (docs/performance.md). Here each sum is taken in two steps — over the H·W rows of the ``(B, H·W, C)`` view, a
contiguous row sum, then over the C/G channels of each group of the small ``(B, C)`` result (a
product with the group-membership matrix) — which is the same sum in another order: equal up to float rounding (tested against
``nn.GroupNorm`` in float64, values and gradients). Gradients come from autodiff (a hand-written
backward is no faster).

:func:`group_norm_swish` is the U-Net's whole block after a convolution, swish(GN(h + b)) with a
per-example, per-channel bias b (the time embedding), in fewer passes over the activations: the
statistics are taken of h itself (b only shifts each channel's sum), the output is y = h·m + s
with per-(example, channel) m and s, and the backward pass (``custom_vjp``) is written out from
the residual h and per-channel numbers. Same numbers as ``swish(group_norm(h + b, ...))`` up to
float rounding (tested in float64, values and every gradient).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["group_norm", "group_norm_swish", "GroupNorm", "GroupNormSwish"]


def _group_mean_of_sums(sums, num_groups: int, n: int):
    """Per-(example, channel) sums (B, C) → each channel's copy of its group's mean (sum / ``n``),
    (B, C). Through two products with the (C, G) group-membership matrix, not a reshape and a
    repeat: XLA:CPU then writes the (B, C) result once instead of rebuilding the repeat inside every
    elementwise loop that reads it."""
    C = sums.shape[-1]
    member = (jnp.arange(C)[:, None] // (C // num_groups) == jnp.arange(num_groups)[None, :]).astype(sums.dtype)
    return (sums @ member / n) @ member.T


def group_norm(x, scale, bias, num_groups: int, epsilon: float = 1e-5):
    """GroupNorm of ``x`` (B, H, W, C) with per-channel ``scale`` γ and ``bias`` β (C,).

    Implements the module docstring's equations; C must be divisible by ``num_groups``. Computes
    in float32, or in ``x``'s dtype where that is wider (float64), as flax does; returns
    ``(B, H, W, C)`` in that dtype.
    """
    B, H, W, C = x.shape
    if C % num_groups:
        raise ValueError(f"group_norm: {C} channels are not divisible by num_groups={num_groups}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    n = H * W * (C // num_groups)
    mean = _group_mean_of_sums(jnp.sum(x.reshape(B, H * W, C), axis=1), num_groups, n)  # contiguous row sums
    centred = x - mean[:, None, None, :]
    var = _group_mean_of_sums(jnp.sum(jnp.square(centred).reshape(B, H * W, C), axis=1), num_groups, n)
    multiplier = jax.lax.rsqrt(var + epsilon) * scale.astype(dtype)  # (B, C)
    return centred * multiplier[:, None, None, :] + bias.astype(dtype)


class GroupNorm(nn.Module):
    """Drop-in for ``nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)`` on NHWC input.

    Parameters ``scale`` (C,) = 1 and ``bias`` (C,) = 0 at init: the same names, shapes and
    initial values as flax's, so checkpoints move between the two. ``x`` (B, H, W, C) →
    ``(B, H, W, C)`` in ``dtype`` (statistics in float32). See :func:`group_norm`.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4:
            raise ValueError(f"GroupNorm: x must be (B, H, W, C), got shape {x.shape}")
        C = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (C,))
        bias = self.param("bias", nn.initializers.zeros, (C,))
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def _swish_gn_stats(h, tb, scale, bias, num_groups, epsilon):
    """(Σ_p h, h's mean offset m = μ − b, 1/σ, multiplier r·γ, shift β − m·r·γ), each (B, C)."""
    B, H, W, C = h.shape
    n = H * W * (C // num_groups)
    h3 = h.reshape(B, H * W, C)
    sum_h = jnp.sum(h3, axis=1)
    m = _group_mean_of_sums(sum_h + H * W * tb, num_groups, n) - tb  # μ_bg of h + b, less b
    var = _group_mean_of_sums(jnp.sum(jnp.square(h3 - m[:, None, :]), axis=1), num_groups, n)  # two-pass σ²
    rstd = jax.lax.rsqrt(var + epsilon)
    mult = rstd * scale
    return sum_h, m, rstd, mult, bias - m * mult


def _swish_gn_forward(h, tb, scale, bias, num_groups, epsilon):
    """(swish(GN(h + tb)), the residuals of :func:`_swish_gn_bwd`)."""
    sum_h, m, rstd, mult, shift = _swish_gn_stats(h, tb, scale, bias, num_groups, epsilon)
    y = h * mult[:, None, None, :] + shift[:, None, None, :]
    return y * jax.nn.sigmoid(y), (h, scale, sum_h, m, rstd, mult, shift)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _swish_gn(h, tb, scale, bias, num_groups, epsilon):
    return _swish_gn_forward(h, tb, scale, bias, num_groups, epsilon)[0]


def _swish_gn_bwd(num_groups, epsilon, res, ga):
    h, scale, sum_h, m, rstd, mult, shift = res
    B, H, W, C = h.shape
    P = H * W
    n = P * (C // num_groups)
    y = h * mult[:, None, None, :] + shift[:, None, None, :]
    sig = jax.nn.sigmoid(y)
    gy = (ga * (sig * (1 + y * (1 - sig)))).reshape(B, P, C)  # swish'(y) = σ(y)·(1 + y·(1 − σ(y)))
    h3 = h.reshape(B, P, C)
    s1 = jnp.sum(gy, axis=1)  # Σ_p ∂L/∂y
    s2 = rstd * (jnp.sum(gy * h3, axis=1) - m * s1)  # Σ_p ∂L/∂y · x̂,  x̂ = (h − m)/σ
    a = _group_mean_of_sums(scale * s1, num_groups, n)
    c = _group_mean_of_sums(scale * s2, num_groups, n)
    # ∂L/∂x = (γ·∂L/∂y − a − x̂·c)/σ = ∂L/∂y·α + h·β + δ per (example, channel):
    beta = -rstd * rstd * c
    delta = rstd * (rstd * m * c - a)
    gh = gy * mult[:, None, :] + h3 * beta[:, None, :] + delta[:, None, :]
    gtb = mult * s1 + beta * sum_h + P * delta  # Σ_p ∂L/∂x, from the sums already taken
    return gh.reshape(h.shape), gtb, jnp.sum(s2, axis=0), jnp.sum(s1, axis=0)


_swish_gn.defvjp(_swish_gn_forward, _swish_gn_bwd)


def group_norm_swish(h, tb, scale, bias, num_groups: int, epsilon: float = 1e-5):
    """swish(GN(h + b)): ``h`` (B, H, W, C), the per-example channel bias ``tb`` (B, C), GroupNorm's
    ``scale`` γ and ``bias`` β (C,) → (B, H, W, C), computed in float32 (or h's dtype where wider).

    With x = h + b, μ and σ² the group statistics of :func:`group_norm` (two passes), m = μ − b
    (h's own offset, so x is never formed) and x̂ = (h − m)/σ::

        y = x̂·γ + β = h·(γ/σ) + (β − m·γ/σ),    out = y·sigmoid(y)

    Backward (``custom_vjp``), with g = ∂L/∂out·swish'(y) and the per-(example, channel) sums
    s₁ = Σ_p g, s₂ = Σ_p g·x̂ and ⟨·⟩ the mean over a group's pixels and channels::

        ∂L/∂h = (γ·g − ⟨γ·s₁⟩ − x̂·⟨γ·s₂⟩)/σ,   ∂L/∂b = Σ_p ∂L/∂h,   ∂L/∂γ = Σ_b s₂,   ∂L/∂β = Σ_b s₁.

    It takes less time per block than autodiff of ``swish(group_norm(h + b))``, forward and
    backward (docs/performance.md).
    """
    if h.ndim != 4:
        raise ValueError(f"group_norm_swish: h must be (B, H, W, C), got shape {h.shape}")
    B, H, W, C = h.shape
    if C % num_groups:
        raise ValueError(f"group_norm_swish: {C} channels are not divisible by num_groups={num_groups}")
    if tb.shape != (B, C):
        raise ValueError(f"group_norm_swish: the channel bias must have shape {(B, C)}, got {tb.shape}")
    dtype = jnp.promote_types(h.dtype, jnp.float32)
    return _swish_gn(h.astype(dtype), tb.astype(dtype), scale.astype(dtype), bias.astype(dtype),
                     int(num_groups), float(epsilon))


class GroupNormSwish(nn.Module):
    """swish(GroupNorm(h + b)) as one block (:func:`group_norm_swish`), with :class:`GroupNorm`'s
    parameters (``scale`` = 1, ``bias`` = 0 at init, (C,)), so either module restores the other's
    checkpoints. Call: ``h`` (B, H, W, C), ``tb`` (B, C) → (B, H, W, C) in ``dtype``."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, tb):
        C = h.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (C,))
        bias = self.param("bias", nn.initializers.zeros, (C,))
        return group_norm_swish(h, tb, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)

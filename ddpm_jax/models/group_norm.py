"""GroupNorm through per-channel spatial sums: flax's ``nn.GroupNorm`` numbers, fast on XLA:CPU.

For ``x`` of shape ``(B, H, W, C)`` with G groups of C/G channels each and n = H·W·C/G::

    μ_bg  = (1/n) Σ_{h, w, c ∈ g} x_bhwc
    σ²_bg = (1/n) Σ_{h, w, c ∈ g} (x_bhwc − μ_bg)²          (two passes, as flax's
                                                            ``use_fast_variance=False``)
    y_bhwc = (x_bhwc − μ_bg) / √(σ²_bg + ε) · γ_c + β_c

Flax reduces the ``(B, H, W, G, C/G)`` view over the axes (1, 2, 4) at once; XLA:CPU runs that
strided reduction at ~1.5 GB/s (the U-Net's widest GroupNorms took 2–3 ms each, forward, at batch
128). Here each sum is taken in two steps — over the H·W rows of the ``(B, H·W, C)`` view, a
contiguous row sum, then over the C/G channels of each group of the small ``(B, C)`` result —
which is the same sum in another order: equal up to float rounding (tested against
``nn.GroupNorm`` in float64, values and gradients). Gradients come from autodiff (a hand-written
backward measured no faster).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["group_norm", "GroupNorm"]


def _group_mean(x3, num_groups: int):
    """``x3`` (B, P, C) → the mean over P and each group's C/G channels, repeated per channel (B, C)."""
    B, P, C = x3.shape
    per_channel = jnp.sum(x3, axis=1)  # (B, C): contiguous row sum
    per_group = jnp.sum(per_channel.reshape(B, num_groups, C // num_groups), axis=-1) / (P * (C // num_groups))
    return jnp.repeat(per_group, C // num_groups, axis=-1)


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
    mean = _group_mean(x.reshape(B, H * W, C), num_groups)
    centred = x - mean[:, None, None, :]
    var = _group_mean(jnp.square(centred).reshape(B, H * W, C), num_groups)
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

"""The U-Net of Ho et al. (2020), "Denoising Diffusion Probabilistic Models", in Flax linen.

The layout is that of the paper's TensorFlow implementation (``diffusion_tf/models/unet.py``),
in NHWC, built from stock Flax layers only. With ``L = len(ch_mult)`` levels, ``c_i = ch·ch_mult[i]``,
``N = num_res_blocks`` and ``x`` of shape ``(B, H, W, C)``::

    temb = Dense_4ch(swish(Dense_4ch(sinusoid_ch(t))))                        (B, 4ch)
    h    = conv3x3(x)                                                         (B, H, W, ch)
    down level i = 0..L−1, at size H/2^i:  N × [ResBlock(c_i), + Attn if H/2^i ∈ attn_resolutions]
                                           then conv3x3 stride 2 (not at the last level)
    middle:                                ResBlock, Attn, ResBlock           (B, H/2^(L−1), ., c_{L−1})
    up level i = L−1..0:                   N+1 × [ResBlock(c_i) of [h, skip], + Attn as above]
                                           then nearest ×2 + conv3x3 (not at level 0)
    out  = conv3x3(swish(GN(h)))                                              (B, H, W, C)

Every activation pushed on the way down (``conv_in``'s output, each block's output, each
downsampled map) is popped, last first, and concatenated on the channel axis ``[h, skip]`` by one
up block. The blocks (GN = GroupNorm(num_groups, eps 1e-6), all convolutions with bias)::

    ResBlock(x, temb) = skip(x) + conv3x3(dropout(swish(GN(h))))
                        with h = conv3x3(swish(GN(x))) + Dense(swish(temb))[:, None, None, :]
                        and skip = 1×1 conv (NIN) when the channel count changes, else identity
    Attn(x)           = x + proj_out(softmax(q kᵀ / √C) v),  q, k, v = 1×1 convs of GN(x)
                        over the H·W positions of each image (one head)

The sinusoidal embedding of ``t`` (the float it is given, e.g. ``t ∈ 1..T``) is
``[sin(t·f_j), cos(t·f_j)]`` with ``f_j = 10000^(−j/(ch/2 − 1))``, ``j = 0..ch/2 − 1``.
Initialisation follows the original: weights ``variance_scaling(1, 'fan_avg', 'uniform')``,
biases 0, and the last convolution of each residual branch (``conv2``, ``proj_out``,
``conv_out``) at scale 1e-10, so every block starts near the identity. The 3×3 stride-2
downsampling uses 'SAME' padding as TensorFlow does (0 before, 1 after on even sizes).

Dropout is active only when the network is called with ``train=True`` (with an RNG stream named
``'dropout'``); the default call is deterministic.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.models.class_embed import add_class_embedding

__all__ = [
    "DDPMUNet",
    "ResnetBlock",
    "AttnBlock",
    "timestep_embedding",
    "check_unet_config",
    "check_unet_image_shape",
]

_EPS = 1e-6  # tf.contrib.layers.group_norm's epsilon


def _init(scale: float = 1.0):
    """The original's ``default_init``: variance scaling, fan_avg, uniform; scale 0 → 1e-10."""
    return nn.initializers.variance_scaling(max(scale, 1e-10), "fan_avg", "uniform")


def _conv(features: int, name: str, *, kernel: int = 3, stride: int = 1, init_scale: float = 1.0, dtype=jnp.float32):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   kernel_init=_init(init_scale), bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def _dense(features: int, name: str, init_scale: float = 1.0, dtype=jnp.float32):
    return nn.Dense(features, kernel_init=_init(init_scale), bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def _norm(num_groups: int, name: str, dtype=jnp.float32):
    # Flax computes the group statistics in float32 whatever the dtype
    return nn.GroupNorm(num_groups=num_groups, epsilon=_EPS, dtype=dtype, name=name)


def timestep_embedding(t, dim: int):
    """Sinusoidal embedding: ``t`` ``(B,)`` float → ``(B, dim)`` float32,
    ``[sin(t·f_0..), cos(t·f_0..)]`` with ``f_j = exp(−j·ln(10⁴)/(dim/2 − 1))``, ``j < dim/2``;
    an odd ``dim`` gets one zero column. Needs ``dim >= 4``."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    arg = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def check_unet_config(ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                      attn_resolutions: Sequence[int], dropout: float, num_groups: int) -> None:
    """Raises ``ValueError`` (one line) if these settings cannot build a ``DDPMUNet``."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not is_int(ch) or ch < 4:
        raise ValueError(f"DDPMUNet: ch must be an integer >= 4 (the sinusoidal embedding has ch/2 >= 2 "
                         f"frequencies), got {ch!r}")
    mult = tuple(ch_mult) if isinstance(ch_mult, (tuple, list)) else None
    if not mult or any(not is_int(m) or m < 1 for m in mult):
        raise ValueError(f"DDPMUNet: ch_mult must be a non-empty sequence of integers >= 1, got {ch_mult!r}")
    if not is_int(num_res_blocks) or num_res_blocks < 1:
        raise ValueError(f"DDPMUNet: num_res_blocks must be an integer >= 1, got {num_res_blocks!r}")
    if not isinstance(attn_resolutions, (tuple, list)) or any(not is_int(r) or r < 1 for r in attn_resolutions):
        raise ValueError(f"DDPMUNet: attn_resolutions must be a sequence of positive integers (heights), "
                         f"got {attn_resolutions!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"DDPMUNet: dropout must be a rate in [0, 1), got {dropout!r}")
    if not is_int(num_groups) or num_groups < 1:
        raise ValueError(f"DDPMUNet: num_groups must be an integer >= 1, got {num_groups!r}")
    widths = sorted({int(ch)} | {int(ch) * int(m) for m in mult})
    bad = [w for w in widths if w % num_groups]
    if bad:
        raise ValueError(f"DDPMUNet: channel counts {bad} (ch={ch} × ch_mult={mult}) are not divisible by "
                         f"num_groups={num_groups} (GroupNorm needs whole groups)")


def check_unet_image_shape(image_shape: Sequence[int], ch_mult: Sequence[int]) -> None:
    """Raises ``ValueError`` (one line) unless ``(H, W, C)`` are positive and ``2^(len(ch_mult)−1)``
    divides H and W (each downsampling halves the size exactly, each upsampling doubles it back)."""
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or any(int(d) != d or d <= 0 for d in image_shape):
        raise ValueError(f"DDPMUNet: image shape must be (H, W, C) with positive integers, got {image_shape}")
    factor = 2 ** (len(tuple(ch_mult)) - 1)
    for axis, size in zip("HW", image_shape[:2]):
        if size % factor:
            raise ValueError(
                f"DDPMUNet: image {axis}={size} is not divisible by 2^(len(ch_mult)-1) = {factor}: "
                f"ch_mult={tuple(ch_mult)} downsamples {len(tuple(ch_mult)) - 1} times; use fewer levels "
                f"or another image size")


class ResnetBlock(nn.Module):
    """``x`` ``(B, H, W, Cin)``, ``temb`` ``(B, E)`` → ``(B, H, W, out_ch)``:
    ``skip(x) + conv3x3(dropout(swish(GN(conv3x3(swish(GN(x))) + Dense(swish(temb))))))``,
    ``skip`` a 1×1 convolution when ``Cin != out_ch``."""

    out_ch: int
    num_groups: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        dt = self.dtype
        h = nn.swish(_norm(self.num_groups, "norm1", dt)(x))
        h = _conv(self.out_ch, "conv1", dtype=dt)(h)
        h = h + _dense(self.out_ch, "temb_proj", dtype=dt)(nn.swish(temb))[:, None, None, :]
        h = nn.swish(_norm(self.num_groups, "norm2", dt)(h))
        h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, "conv2", init_scale=0.0, dtype=dt)(h)
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, "nin_shortcut", kernel=1, dtype=dt)(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over the ``H·W`` positions, one head: ``x`` ``(B, H, W, C)`` →
    ``x + proj_out(softmax(q kᵀ/√C) v)``, with ``q, k, v`` 1×1 convolutions (``nn.Dense`` on the
    channel axis) of ``GN(x)``."""

    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        h = _norm(self.num_groups, "norm", self.dtype)(x)
        q, k, v = (_dense(C, name, dtype=self.dtype)(h).reshape(B, H * W, C) for name in ("q", "k", "v"))
        # the softmax in float32: its exponentials and row sums are where bf16 rounding would show
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (C ** -0.5)
        w = nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, HW, HW)
        h = jnp.einsum("bij,bjc->bic", w, v).reshape(B, H, W, C)
        return x + _dense(C, "proj_out", init_scale=0.0, dtype=self.dtype)(h)


class DDPMUNet(nn.Module):
    """The U-Net of Ho et al. (2020); see the module docstring for the layout and equations.

    Attributes:
      ch: base width; the time embedding has 4·ch features.
      ch_mult: width multiplier of each level (``len(ch_mult)`` levels; 2^(levels−1) must divide H, W).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: heights at which each residual block is followed by self-attention.
      dropout: dropout rate in the residual blocks (active only with ``train=True``).
      num_groups: GroupNorm groups; divides ``ch`` and every ``ch·ch_mult[i]``.
      out_channels: output channels; ``None`` = the input's.
      dtype: compute dtype of the layers (params stay float32; the output is float32).
      num_classes: K > 0: class-conditional, a learned embedding of the label ``y`` (−1: no class)
        added to the time embedding (``models/class_embed.py``); 0: unconditional.

    Call: ``x`` ``(B, H, W, C)`` float, ``t`` ``(B,)`` or a scalar (used as given), ``y`` ``(B,)``
    int labels (conditional networks only; None = no class), ``train`` bool
    → ``(B, H, W, out_channels)`` float32. With ``train=True`` and ``dropout > 0`` pass
    ``rngs={'dropout': key}``. Bad settings or sizes raise ``ValueError`` at init/trace time.
    """

    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    out_channels: Optional[int] = None
    dtype: Any = jnp.float32
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"DDPMUNet: x must be (B, H, W, C), got shape {x.shape}")
        check_unet_config(self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions,
                          self.dropout, self.num_groups)
        check_unet_image_shape(x.shape[1:], self.ch_mult)
        B, H, W, C = x.shape
        out_ch = C if self.out_channels is None else int(self.out_channels)
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (B,))
        if t.shape != (B,):
            raise ValueError(f"DDPMUNet: t must have shape ({B},) or (), got {t.shape}")
        levels = len(self.ch_mult)
        attn_at = tuple(int(r) for r in self.attn_resolutions)

        def block(h, width, name):
            return ResnetBlock(width, self.num_groups, self.dropout, self.dtype, name=name)(h, temb, train)

        dt = self.dtype
        temb = timestep_embedding(t, self.ch)
        temb = _dense(4 * self.ch, "temb_dense0", dtype=dt)(temb)
        temb = _dense(4 * self.ch, "temb_dense1", dtype=dt)(nn.swish(temb))
        temb = add_class_embedding(temb, y, self.num_classes, dt)

        hs = [_conv(self.ch, "conv_in", dtype=dt)(x.astype(jnp.float32))]
        for i in range(levels):
            for j in range(self.num_res_blocks):
                h = block(hs[-1], self.ch * self.ch_mult[i], f"down_{i}_block_{j}")
                if h.shape[1] in attn_at:
                    h = AttnBlock(self.num_groups, dt, name=f"down_{i}_attn_{j}")(h)
                hs.append(h)
            if i != levels - 1:
                hs.append(_conv(hs[-1].shape[-1], f"down_{i}_downsample", stride=2, dtype=dt)(hs[-1]))

        h = hs[-1]
        h = block(h, h.shape[-1], "mid_block_1")
        h = AttnBlock(self.num_groups, dt, name="mid_attn_1")(h)
        h = block(h, h.shape[-1], "mid_block_2")

        for i in reversed(range(levels)):
            for j in range(self.num_res_blocks + 1):
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[i], f"up_{i}_block_{j}")
                if h.shape[1] in attn_at:
                    h = AttnBlock(self.num_groups, dt, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                b, hh, ww, c = h.shape
                h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, hh, 2, ww, 2, c)).reshape(b, 2 * hh, 2 * ww, c)
                h = _conv(c, f"up_{i}_upsample", dtype=dt)(h)
        assert not hs

        h = nn.swish(_norm(self.num_groups, "norm_out", dt)(h))
        return _conv(out_ch, "conv_out", init_scale=0.0, dtype=dt)(h).astype(jnp.float32)

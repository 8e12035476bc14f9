"""The source notebook's time-conditioned U-Net ("ScoreNet"), in Flax linen.

Layout is NHWC throughout. For an input ``x`` of shape ``(B, H, W, C)`` and channel widths
``(c1, c2, c3, c4)``, with ``emb = swish(Dense_E(fourier(t)))`` of shape ``(B, E)``::

    h1 = swish(GN(conv3x3_s1(x)      + Dense_c1(emb)))      (B, H,  W,  c1)   H1 = H
    h2 = swish(GN(conv3x3_s2(h1)     + Dense_c2(emb)))      (B, H2, W2, c2)   H2 = ceil(H1 / 2)
    h3 = swish(GN(conv3x3_s2(h2)     + Dense_c3(emb)))      (B, H3, W3, c3)   H3 = ceil(H2 / 2)
    h4 = swish(GN(conv3x3_s2(h3)     + Dense_c4(emb)))      (B, H4, W4, c4)   H4 = ceil(H3 / 2)
    u  = swish(GN(tconv3x3_s2(h4)          + Dense_c3(emb)))  (B, H3, W3, c3)
    u  = swish(GN(tconv3x3_s2([u, h3])     + Dense_c2(emb)))  (B, H2, W2, c2)
    u  = swish(GN(tconv3x3_s2([u, h2])     + Dense_c1(emb)))  (B, H1, W1, c1)
    δ  = tconv3x3_s1([u, h1]) (+ bias)                        (B, H,  W,  out_channels)

``[a, b]`` is concatenation on the channel axis, GN is GroupNorm(num_groups, eps=1e-5) (flax's
``nn.GroupNorm`` numbers; each swish(GN(· + Dense(emb))) is computed as one block,
:func:`ddpm_jax.models.group_norm.group_norm_swish`, with GroupNorm's parameters), all
convolutions are 3×3 with padding 1 and no bias except the last. The time bias is added before the
GroupNorm and broadcast over H and W. On 28×28 the sizes are 28→28→14→7→4→7→14→28→28, on 32×32
32→32→16→8→4→8→16→32→32. Optionally (``rho_head=True``) the output is the notebook's mean
parameterisation μ = ρ0·(x − ρ1·δ) with two learnable scalars.

Transposed convolutions follow PyTorch's ``ConvTranspose2d`` exactly (kernel stored as
``(k, k, in, out)`` and applied flipped, i.e. the gradient of a forward convolution), with
``output_padding`` computed from the static shapes so the output matches its skip connection:
``output_padding = target − (2·in − 1)``, always 0 or 1 here.

Initialisation replicates PyTorch's defaults so the notebook's optimiser settings (Adam, lr 0.01)
behave the same way: every weight and bias is drawn from U(−1/√fan_in, 1/√fan_in), with fan_in =
in_channels·k·k for a convolution and in_features for a dense layer. For transposed convolutions
PyTorch computes fan_in from its weight of shape ``(in, out, k, k)`` as ``out_channels·k·k`` (its
``_calculate_fan_in_and_fan_out`` reads dimension 1); that quirk is replicated. GroupNorm starts at
scale 1, bias 0. The Fourier weights W ~ N(0, fourier_scale²) are fixed: stored as a parameter at
``params['time_features']['W']`` (so they are checkpointed with the rest) but passed through
``stop_gradient``, so their gradient is exactly zero; ``param_labels`` marks them ``'frozen'``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from ddpm_jax.models import conv_ops
from ddpm_jax.models.class_embed import add_class_embedding
from ddpm_jax.models.group_norm import GroupNormSwish

__all__ = [
    "ScoreNet",
    "GaussianFourierFeatures",
    "ConvTranspose",
    "StridedConv",
    "Im2colConv",
    "CONV_IMPLS",
    "torch_uniform_init",
    "check_config",
    "check_image_shape",
    "NUM_DOWNSAMPLES",
    "MIN_IMAGE_SIZE",
]

#: Stride-2 convolutions in the encoder.
NUM_DOWNSAMPLES = 3
#: Smallest height/width: every stride-2 convolution must see at least 2 pixels (8→4→2→1), so
#: that each level really downsamples.
MIN_IMAGE_SIZE = 2**NUM_DOWNSAMPLES

_KERNEL = 3
_PAD = 1

#: How the strided, transposed and output convolutions are computed (:mod:`conv_ops`):
#: - 'xla': as written (strided convolutions, input-dilated transposed convolutions);
#: - 'stride1': space-to-depth strided convolutions, transposed ones as one four-phase 2×2
#:   convolution (stride-1 convolutions only);
#: - 'phases': strided convolutions as written, transposed ones as four convolutions of only
#:   their non-zero taps, the output layer's forward pass as a matrix product + col2im and the
#:   input layer as im2col + a matrix product (the fastest on CPU, most of all for wide networks).
#: Same parameters, same numbers up to float rounding (tested).
CONV_IMPLS = ("xla", "stride1", "phases")


def torch_uniform_init(fan_in: int):
    """Initializer drawing from U(−1/√fan_in, 1/√fan_in): PyTorch's default for weights
    (``kaiming_uniform_(a=√5)``) and biases of ``Linear``/``Conv2d``/``ConvTranspose2d``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _out_size(size: int, stride: int) -> int:
    """Spatial size after a 3×3 convolution with padding 1 (PyTorch's floor rule)."""
    return (size + 2 * _PAD - _KERNEL) // stride + 1


def _encoder_sizes(size: int) -> Tuple[int, int, int, int]:
    s1 = _out_size(size, 1)
    s2 = _out_size(s1, 2)
    s3 = _out_size(s2, 2)
    s4 = _out_size(s3, 2)
    return s1, s2, s3, s4


def _output_padding(in_size: int, target: int, stride: int = 2) -> int:
    """``output_padding`` making a stride-2 3×3 transposed conv (padding 1) produce ``target``."""
    op = target - ((in_size - 1) * stride - 2 * _PAD + _KERNEL)
    if not 0 <= op < stride:
        raise ValueError(
            f"ScoreNet: cannot upsample {in_size} pixels to the skip size {target} "
            f"(output_padding would be {op}, must be in [0, {stride - 1}])")
    return op


def check_config(channels: Sequence[int], embed_dim: int, num_groups: int) -> None:
    """Raises ``ValueError`` (one line) if the widths/groups/embedding cannot build a ScoreNet."""
    channels = tuple(channels)
    if len(channels) != 4:
        raise ValueError(f"ScoreNet: channels must have 4 entries (one per level), got {channels}")
    if any(int(c) != c or c <= 0 for c in channels):
        raise ValueError(f"ScoreNet: channels must be positive integers, got {channels}")
    if int(num_groups) != num_groups or num_groups <= 0:
        raise ValueError(f"ScoreNet: num_groups must be a positive integer, got {num_groups}")
    bad = [c for c in channels if c % num_groups]
    if bad:
        raise ValueError(
            f"ScoreNet: channel counts {bad} are not divisible by num_groups={num_groups} "
            f"(GroupNorm needs whole groups)")
    if int(embed_dim) != embed_dim or embed_dim <= 0 or embed_dim % 2:
        raise ValueError(f"ScoreNet: embed_dim must be a positive even integer, got {embed_dim}")


def check_image_shape(image_shape: Sequence[int]) -> None:
    """Raises ``ValueError`` (one line) if images of shape ``(H, W, C)`` cannot pass the U-Net.

    Every stride-2 level must see at least 2 pixels (H, W ≥ 8), and each transposed convolution
    must be able to reproduce the size of the skip connection it is concatenated with.
    """
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or any(int(d) != d or d <= 0 for d in image_shape):
        raise ValueError(
            f"ScoreNet: image shape must be (H, W, C) with positive integers, got {image_shape}")
    for axis, size in zip("HW", image_shape[:2]):
        if size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"ScoreNet: image {axis}={size} is too small; the U-Net downsamples "
                f"{NUM_DOWNSAMPLES} times and needs H, W >= {MIN_IMAGE_SIZE}")
        s1, s2, s3, s4 = _encoder_sizes(size)
        for small, big in ((s4, s3), (s3, s2), (s2, s1)):
            _output_padding(small, big)


class GaussianFourierFeatures(nn.Module):
    """Fixed random Fourier features of the time ``t``.

    ``W`` (shape ``(embed_dim // 2,)``) is drawn once from N(0, scale²) and never trained: it is a
    parameter (saved and restored with the others) read through ``stop_gradient``.

    ``t`` ``(B,)`` → ``[sin(2π W t), cos(2π W t)]`` ``(B, embed_dim)``, float32. ``t`` is used as
    given (the notebook feeds integer steps 1..T, which makes the features of neighbouring steps
    effectively unrelated). Always computed in float32: 2π·W·t reaches ~10⁵ rad for t ~ 1000.
    """

    embed_dim: int
    scale: float = 30.0

    @nn.compact
    def __call__(self, t):
        W = self.param(
            "W", lambda key, shape: jax.random.normal(key, shape, jnp.float32) * self.scale,
            (self.embed_dim // 2,))
        W = jax.lax.stop_gradient(W)
        # Same operation order as the notebook (t·W·2·π) so the float32 phases agree.
        proj = jnp.asarray(t, jnp.float32)[:, None] * W[None, :] * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class ConvTranspose(nn.Module):
    """PyTorch ``ConvTranspose2d`` (3×3 by default, square stride/padding) in NHWC.

    ``x`` ``(B, H, W, Cin)`` → ``(B, H', W', features)`` with
    ``H' = (H − 1)·stride − 2·padding + k + output_padding[0]`` (likewise W').

    The kernel is stored as ``(k, k, Cin, features)``; ``kernel[i, j, c, o]`` equals PyTorch's
    ``weight[c, o, i, j]``. It is the adjoint of a forward convolution: implemented as a stride-1
    convolution of the ``stride``-dilated input with the spatially flipped kernel and padding
    ``(k−1−padding, k−1−padding+output_padding)``. Initialised like PyTorch, including its fan_in
    quirk for transposed convs: fan_in = features·k·k (the *output* channels).
    """

    features: int
    stride: int = 2
    padding: int = _PAD
    output_padding: Tuple[int, int] = (0, 0)
    kernel_size: int = _KERNEL
    use_bias: bool = False
    dtype: Any = jnp.float32
    impl: str = "xla"  # see CONV_IMPLS; 'stride1'/'phases' apply to k 3, padding 1 only

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        cin = x.shape[-1]
        fan_in = self.features * k * k  # PyTorch's ConvTranspose2d quirk, see docstring
        kernel = self.param("kernel", torch_uniform_init(fan_in), (k, k, cin, self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        form = (self.stride, k, self.padding)
        if self.impl == "phases" and form == (1, 3, 1):
            y = conv_ops.conv_transpose3x3_col2im(x, kernel)
        elif self.impl == "phases" and form == (2, 3, 1):
            y = conv_ops.conv_transpose3x3_stride2_phases(x, kernel, self.output_padding)
        elif self.impl == "stride1" and form == (2, 3, 1):
            y = conv_ops.conv_transpose3x3_stride2(x, kernel, self.output_padding)
        else:
            y = conv_ops.conv_transpose(x, kernel, self.stride, self.padding, self.output_padding)
        if self.use_bias:
            bias = self.param("bias", torch_uniform_init(fan_in), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class _ReformulatedConv(nn.Module):
    """A 3×3 convolution without bias whose parameters are ``nn.Conv``'s (``kernel`` of shape
    ``(3, 3, Cin, features)``, so the two are interchangeable in a checkpoint), computed by the
    subclass's ``_form(x, kernel)`` from :mod:`conv_ops`."""

    features: int
    kernel_init: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (_KERNEL, _KERNEL, x.shape[-1], self.features))
        return self._form(x.astype(self.dtype), kernel.astype(self.dtype))


class StridedConv(_ReformulatedConv):
    """3×3 convolution, stride 2, padding 1, as :func:`conv_ops.conv3x3_stride2` (space-to-depth +
    a stride-1 convolution)."""

    _form = staticmethod(conv_ops.conv3x3_stride2)


class Im2colConv(_ReformulatedConv):
    """3×3 convolution, stride 1, padding 1, as :func:`conv_ops.conv3x3_im2col` (one matrix product
    of the 9 shifted copies of the input: for the input layer's few channels)."""

    _form = staticmethod(conv_ops.conv3x3_im2col)


class ScoreNet(nn.Module):
    """The source U-Net (the notebook's padded "ScoreNet", Coding II). See the module docstring.

    Attributes:
      channels: widths (c1, c2, c3, c4) of the four levels; each divisible by ``num_groups``.
      embed_dim: width E of the time embedding (even; E/2 Fourier frequencies).
      num_groups: GroupNorm groups.
      fourier_scale: std of the fixed Fourier frequencies W.
      out_channels: channels of the output; ``None`` = the input's channels.
      rho_head: if True, return μ = ρ0·(x − ρ1·δ) with learnable scalars ``params['rho0']``,
        ``params['rho1']`` (both initialised to 1) instead of the raw network output δ.
      dtype: computation dtype of convolutions and dense layers (params stay float32; the Fourier
        features and GroupNorm statistics are computed in float32; the output is float32).
      conv_impl: 'xla', 'stride1' or 'phases' (see ``CONV_IMPLS``): how the input, strided,
        transposed and output convolutions are computed; the parameters are the same either way.
      fused_norm: swish(GN(h + b)) as one fused block (``GroupNormSwish``, the CPU profile's) or
        as stock ``nn.GroupNorm`` then swish; the same parameters and numbers up to rounding.
      num_classes: K > 0: class-conditional, a learned embedding of the label ``y`` (−1: no class)
        added to the time embedding (``models/class_embed.py``); 0: unconditional.

    Call: ``x`` ``(B, H, W, C)`` float, ``t`` ``(B,)`` (or a scalar, broadcast) ints or floats used
    as given, ``y`` ``(B,)`` int labels (conditional networks only; None = no class) →
    ``(B, H, W, out_channels)`` float32. Unusable shapes or widths raise ``ValueError`` at
    init/trace time (see ``check_config``, ``check_image_shape``).
    """

    channels: Sequence[int] = (8, 16, 32, 64)
    embed_dim: int = 256
    num_groups: int = 4
    fourier_scale: float = 30.0
    out_channels: Optional[int] = None
    rho_head: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "xla"
    fused_norm: bool = True
    num_classes: int = 0

    def _dense(self, features: int, fan_in: int, name: str):
        init = torch_uniform_init(fan_in)
        return nn.Dense(features, kernel_init=init, bias_init=init, dtype=self.dtype, name=name)

    def _conv(self, features: int, stride: int, cin: int, name: str):
        init = torch_uniform_init(cin * _KERNEL * _KERNEL)
        if stride == 2 and self.conv_impl == "stride1":
            return StridedConv(features, kernel_init=init, dtype=self.dtype, name=name)
        if stride == 1 and self.conv_impl == "phases":
            return Im2colConv(features, kernel_init=init, dtype=self.dtype, name=name)
        return nn.Conv(features, (_KERNEL, _KERNEL), strides=(stride, stride),
                       padding=((_PAD, _PAD), (_PAD, _PAD)), use_bias=False,
                       kernel_init=init, dtype=self.dtype, name=name)

    def _norm_act(self, name: str):
        """(h, tb) → swish(GN(h + tb)), tb (B, C): one block (same parameters as ``GroupNorm``)."""
        if self.fused_norm:
            return GroupNormSwish(num_groups=self.num_groups, epsilon=1e-5, dtype=self.dtype, name=name)
        norm = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)
        return lambda h, tb: nn.swish(norm(h + tb[:, None, None, :].astype(h.dtype)))

    @nn.compact
    def __call__(self, x, t, y=None):
        if x.ndim != 4:
            raise ValueError(f"ScoreNet: x must be (B, H, W, C), got shape {x.shape}")
        check_config(self.channels, self.embed_dim, self.num_groups)
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"ScoreNet: unknown conv_impl {self.conv_impl!r}; valid: {CONV_IMPLS}")
        check_image_shape(x.shape[1:])
        B, H, W, C = x.shape
        out_ch = C if self.out_channels is None else int(self.out_channels)
        if out_ch <= 0:
            raise ValueError(f"ScoreNet: out_channels must be positive, got {self.out_channels}")
        if self.rho_head and out_ch != C:
            raise ValueError(
                f"ScoreNet: rho_head needs out_channels == input channels ({C}), got {out_ch}")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (B,))
        if t.shape != (B,):
            raise ValueError(f"ScoreNet: t must have shape ({B},) or (), got {t.shape}")

        c1, c2, c3, c4 = (int(c) for c in self.channels)
        E = int(self.embed_dim)
        act = nn.swish

        # Time embedding: (B,) -> (B, E).
        feats = GaussianFourierFeatures(E, self.fourier_scale, name="time_features")(t)
        emb = add_class_embedding(act(self._dense(E, E, "time_embed")(feats)), y, self.num_classes, self.dtype)

        def tbias(features, name):  # (B, E) -> (B, features)
            return self._dense(features, E, name)(emb)

        h = x.astype(self.dtype)
        # Encoder.
        h1 = self._norm_act("norm1")(self._conv(c1, 1, C, "conv1")(h), tbias(c1, "dense1"))
        h2 = self._norm_act("norm2")(self._conv(c2, 2, c1, "conv2")(h1), tbias(c2, "dense2"))
        h3 = self._norm_act("norm3")(self._conv(c3, 2, c2, "conv3")(h2), tbias(c3, "dense3"))
        h4 = self._norm_act("norm4")(self._conv(c4, 2, c3, "conv4")(h3), tbias(c4, "dense4"))

        def up(features, h, skip_shape, name):
            op = tuple(_output_padding(a, b) for a, b in zip(h.shape[1:3], skip_shape[1:3]))
            return ConvTranspose(features, stride=2, output_padding=op, dtype=self.dtype,
                                 impl=self.conv_impl, name=name)(h)

        # Decoder.
        u = self._norm_act("tnorm4")(up(c3, h4, h3.shape, "tconv4"), tbias(c3, "dense5"))
        u = jnp.concatenate([u, h3], axis=-1)
        u = self._norm_act("tnorm3")(up(c2, u, h2.shape, "tconv3"), tbias(c2, "dense6"))
        u = jnp.concatenate([u, h2], axis=-1)
        u = self._norm_act("tnorm2")(up(c1, u, h1.shape, "tconv2"), tbias(c1, "dense7"))
        u = jnp.concatenate([u, h1], axis=-1)
        delta = ConvTranspose(out_ch, stride=1, use_bias=True, dtype=self.dtype, impl=self.conv_impl,
                              name="tconv1")(u).astype(jnp.float32)

        if not self.rho_head:
            return delta
        rho0 = self.param("rho0", nn.initializers.ones, ())
        rho1 = self.param("rho1", nn.initializers.ones, ())
        return rho0 * (x.astype(jnp.float32) - rho1 * delta)

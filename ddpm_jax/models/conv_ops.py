"""Exact reformulations of the U-Net's strided, transposed and output convolutions.

XLA on CPU lowers a convolution with a dilated input (``lhs_dilation``: a transposed
convolution, and the input gradient of every strided convolution) and the weight gradient of a
transposed convolution (``rhs_dilation``) to a slow generic loop, while plain stride-1
convolutions go to its fast kernels. These functions compute the same numbers through stride-1
convolutions and matrix products. All use the weights exactly as stored (``(3, 3, Cin, Cout)``,
HWIO); the tests check values and gradients against the direct formulations to float rounding.

Notation for one spatial axis (the other is the same): a 3×3 kernel tap ``k ∈ {0, 1, 2}``.

- Strided convolution, padding 1: y[m] = Σ_k x[2m − 1 + k]·w[k]. With the input split into pairs
  X[j] = (x[2j], x[2j+1]) (space-to-depth) this is y[m] = X[m−1][1]·w[0] + X[m][0]·w[1] +
  X[m][1]·w[2]: a 2×2 stride-1 convolution of X (4·Cin channels) padded by one at the start
  (:func:`conv3x3_stride2`).
- Transposed convolution (PyTorch ``ConvTranspose2d``, stride 2, padding 1): y[o] = Σ_{i,k:
  o = 2i − 1 + k} x[i]·w[k], so the even outputs are y[2m] = x[m]·w[1] and the odd ones
  y[2m+1] = x[m]·w[2] + x[m+1]·w[0]. The four (row, column) phases come either from one 2×2
  stride-1 convolution with 4·Cout outputs (:func:`conv_transpose3x3_stride2`: simple, but 16
  multiply-adds per 9 useful ones) or from four convolutions of 1×1, 1×2, 2×1 and 2×2 taps
  (:func:`conv_transpose3x3_stride2_phases`: only the useful ones); either way the phases are
  interleaved (depth-to-space) and cropped to the PyTorch size 2H − 1 + output_padding. The
  phase form's gradients are matrix products with the 9 stride-2 slices of the cotangent
  (custom backward).
- Transposed convolution, stride 1, padding 1 (the output layer, few output channels):
  y[q] = Σ_k x[q + 1 − k]·w[k], computed as z[p, k] = x[p]·w[k] (one matrix product) and a
  shifted sum of z, its kernel gradient as one matrix product too
  (:func:`conv_transpose3x3_col2im`).
- Convolution, stride 1, padding 1 (the input layer, few input channels): y[q] = Σ_k x[q + k − 1]·w[k],
  computed from the 9 shifted copies of x by broadcast multiply-adds (or one matrix product,
  im2col, for more channels), its kernel gradient by one matrix product (:func:`conv3x3_im2col`).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

__all__ = ["conv_transpose", "conv3x3", "conv3x3_im2col", "conv3x3_stride2", "conv_transpose3x3_stride2", "conv_transpose3x3_stride2_phases",
           "conv_transpose3x3_col2im"]

_DN = ("NHWC", "HWIO", "NHWC")


def conv_transpose(x, kernel, stride: int, padding: int, output_padding: Tuple[int, int] = (0, 0)):
    """PyTorch ``ConvTranspose2d`` as written: the convolution of the ``stride``-dilated input with
    the spatially flipped kernel, padded by ``(k − 1 − padding, k − 1 − padding + output_padding)``.

    ``x`` (B, H, W, Cin), ``kernel`` (k, k, Cin, Cout) → (B, (H − 1)·stride − 2·padding + k +
    op_h, likewise W, Cout). The reference every reformulation below is tested against.
    """
    lo = kernel.shape[0] - 1 - padding
    return jax.lax.conv_general_dilated(x, jnp.flip(kernel, (0, 1)).astype(x.dtype), (1, 1),
                                        [(lo, lo + op) for op in output_padding],
                                        lhs_dilation=(stride, stride), dimension_numbers=_DN)


def _interleave_phases(y, output_padding: Tuple[int, int]):
    """Depth-to-space of the four sub-pixel phases, then the crop to PyTorch's size.

    ``y`` (B, H, W, 4·Cout), channel = phase·Cout + o with the phases (row, column) in the order
    (0, 0), (0, 1), (1, 0), (1, 1) → (B, 2H − 1 + op_h, 2W − 1 + op_w, Cout), out[2m + pi, 2n + pj]
    = phase (pi, pj) at (m, n).
    """
    B, H, W, O4 = y.shape
    O = O4 // 4
    y = y.reshape(B, H, W, 2, 2, O).transpose(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, O)
    return y[:, : 2 * H - 1 + output_padding[0], : 2 * W - 1 + output_padding[1]]


def _two_by_two(taps, zero):
    """A (2, 2, ...) kernel from {(di, dj): tap}; missing taps are zero."""
    return jnp.stack([jnp.stack([taps.get((di, dj), zero) for dj in range(2)]) for di in range(2)])


def conv3x3_stride2(x, kernel):
    """3×3 convolution, stride 2, padding 1 (PyTorch sizes: ceil(H/2)) via space-to-depth.

    ``x`` (B, H, W, Cin), ``kernel`` (3, 3, Cin, Cout) → (B, ⌈H/2⌉, ⌈W/2⌉, Cout).
    """
    B, H, W, C = x.shape
    Hp, Wp = -(-H // 2) * 2, -(-W // 2) * 2
    x = jnp.pad(x, ((0, 0), (0, Hp - H), (0, Wp - W), (0, 0)))  # the zero padding PyTorch adds at the end
    X = x.reshape(B, Hp // 2, 2, Wp // 2, 2, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, Hp // 2, Wp // 2, 4 * C)
    zero = jnp.zeros_like(kernel[0, 0])
    tap = {(0, 1): 0, (1, 0): 1, (1, 1): 2}  # (offset d: 0 = X[m−1], 1 = X[m]; phase) -> kernel index k

    def taps(di, dj):  # (4·Cin, Cout): the input channels of X in phase order (pi, pj)
        return jnp.concatenate([
            kernel[tap[(di, pi)], tap[(dj, pj)]] if (di, pi) in tap and (dj, pj) in tap else zero
            for pi in range(2) for pj in range(2)], axis=0)

    k2 = jnp.stack([jnp.stack([taps(di, dj) for dj in range(2)]) for di in range(2)])
    return jax.lax.conv_general_dilated(X, k2.astype(x.dtype), (1, 1), [(1, 0), (1, 0)], dimension_numbers=_DN)


def conv_transpose3x3_stride2(x, kernel, output_padding: Tuple[int, int] = (0, 0)):
    """PyTorch ``ConvTranspose2d(k=3, stride=2, padding=1, output_padding)`` via four phases.

    ``x`` (B, H, W, Cin), ``kernel`` (3, 3, Cin, Cout) with ``kernel[i, j, c, o]`` = PyTorch's
    ``weight[c, o, i, j]`` → (B, 2H − 1 + op_h, 2W − 1 + op_w, Cout).
    """
    C, O = x.shape[-1], kernel.shape[-1]
    w = kernel
    zero = jnp.zeros_like(w[0, 0])
    phases = [
        _two_by_two({(0, 0): w[1, 1]}, zero),                                             # (even, even)
        _two_by_two({(0, 0): w[1, 2], (0, 1): w[1, 0]}, zero),                            # (even, odd)
        _two_by_two({(0, 0): w[2, 1], (1, 0): w[0, 1]}, zero),                            # (odd, even)
        _two_by_two({(0, 0): w[2, 2], (0, 1): w[2, 0], (1, 0): w[0, 2], (1, 1): w[0, 0]}, zero),  # (odd, odd)
    ]
    k2 = jnp.stack(phases, axis=-2).reshape(2, 2, C, 4 * O)  # output channel = phase·O + o
    y = jax.lax.conv_general_dilated(x, k2.astype(x.dtype), (1, 1), [(0, 1), (0, 1)], dimension_numbers=_DN)
    return _interleave_phases(y, output_padding)


def conv_transpose3x3_stride2_phases(x, kernel, output_padding: Tuple[int, int] = (0, 0)):
    """The same transposed convolution as :func:`conv_transpose3x3_stride2`, each phase its own
    convolution with only its non-zero taps: no multiply-adds on zeros (the 2×2 form does 16 per
    9 useful); its gradients through matrix products.

    ``x`` (B, H, W, Cin), ``kernel`` (3, 3, Cin, Cout) → (B, 2H − 1 + op_h, 2W − 1 + op_w, Cout).
    Forward, with the phases of the module docstring (``x`` zero beyond its end):

        y[2m,   2n  ] = x[m, n]·w[1, 1]                                   1×1
        y[2m,   2n+1] = x[m, n]·w[1, 2] + x[m, n+1]·w[1, 0]                 1×2
        y[2m+1, 2n  ] = x[m, n]·w[2, 1] + x[m+1, n]·w[0, 1]                 2×1
        y[2m+1, 2n+1] = x[m, n]·w[2, 2] + x[m, n+1]·w[2, 0]
                      + x[m+1, n]·w[0, 2] + x[m+1, n+1]·w[0, 0]             2×2

    then the four interleaved (depth-to-space) and cropped to the PyTorch size. Backward
    (``custom_vjp``): each input pixel p scatters x[p]·w[k] to the output pixel 2p − 1 + k, so with
    G[p, k] = g[2p − 1 + k] the 9 stride-2 slices of g = ∂L/∂y (zero outside; ``_taps``),

        input gradient:  ∂L/∂x[p] = Σ_k G[p, k]·w[k]ᵀ   (one (B·H·W, 9·Cout) × (9·Cout, Cin) product),
        kernel gradient: ∂L/∂w[k] = Σ_p x[p]ᵀ G[p, k]   (one (Cin, B·H·W) × (B·H·W, 9·Cout) product).

    Autodiff of the four phase convolutions instead runs eight small convolutions whose kernel
    gradients XLA:CPU computes slowly, so this backward is the faster one (docs/performance.md).
    """
    return _phases_transpose(x, kernel, tuple(int(p) for p in output_padding))


def _phases_forward(x, kernel, output_padding):
    w = kernel.astype(x.dtype)
    conv = lambda k, pad: jax.lax.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=_DN)  # noqa: E731
    # All four as convolutions (the 1×1 one too), so that XLA writes the input (often a skip
    # concatenation) once for all of them rather than once more in a matrix layout.
    ee = conv(w[1:2, 1:2], [(0, 0), (0, 0)])  # tap w[1, 1]
    eo = conv(w[1:2, ::-2], [(0, 0), (0, 1)])  # taps [w[1, 2], w[1, 0]]
    oe = conv(w[::-2, 1:2], [(0, 1), (0, 0)])  # taps [w[2, 1]; w[0, 1]]
    oo = conv(w[::-2, ::-2], [(0, 1), (0, 1)])  # taps [[w[2, 2], w[2, 0]], [w[0, 2], w[0, 0]]]
    return _interleave_phases(jnp.concatenate([ee, eo, oe, oo], axis=-1), output_padding)


_phases_transpose = jax.custom_vjp(_phases_forward, nondiff_argnums=(2,))


def _phases_fwd(x, kernel, output_padding):
    return _phases_forward(x, kernel, output_padding), (x, kernel)


def _phases_bwd(output_padding, res, g):
    x, kernel = res
    _, H, W, C = x.shape
    G = jnp.stack(_taps(g, stride=2, size=(H, W)), axis=3)  # (B, H, W, 9, Cout)
    taps = kernel.astype(x.dtype).reshape(9, C, kernel.shape[-1])
    dx = jnp.einsum("bhwko,kco->bhwc", G, taps)
    dw = jnp.einsum("bhwc,bhwko->kco", x, G).reshape(kernel.shape)
    return dx, dw.astype(kernel.dtype)


_phases_transpose.defvjp(_phases_fwd, _phases_bwd)


def _col2im_forward(x, kernel, pad_input: bool = False):
    """y = col2im(x·w). ``pad_input``: pad x by one pixel before the product instead of padding z
    after it (the product then has (H + 2)(W + 2) rows instead of H·W, but z is written once
    instead of twice)."""
    B, H, W, C = x.shape
    O = kernel.shape[-1]
    taps = kernel.astype(x.dtype).reshape(9, C, O).transpose(1, 0, 2)  # (Cin, 9, Cout), tap k = 3i + j
    if pad_input:
        zp = jnp.einsum("bhwc,cko->bhwko", jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), taps)
    else:
        zp = jnp.pad(jnp.einsum("bhwc,cko->bhwko", x, taps), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    return sum(zp[:, 2 - i: 2 - i + H, 2 - j: 2 - j + W, 3 * i + j] for i in range(3) for j in range(3))


def _taps(y, stride: int = 1, size=None):
    """The 9 slices y[stride·p − 1 + k] of ``y`` (B, Ho, Wo, C) for the output pixels p of
    ``size`` (H, W) (default: y's own; zero outside), tap k = 3i + j: a list of (B, H, W, C).

    Stride 1: the shifted copies of a 3×3 padding-1 convolution; stride 2: the slices of a stride-2
    transposed convolution's cotangent that each input pixel scattered to."""
    _, Ho, Wo, _ = y.shape
    H, W = (Ho, Wo) if size is None else size
    yp = jnp.pad(y, ((0, 0), (1, stride * (H - 1) + 2 - Ho), (1, stride * (W - 1) + 2 - Wo), (0, 0)))
    return [yp[:, i: i + stride * (H - 1) + 1: stride, j: j + stride * (W - 1) + 1: stride]
            for i in range(3) for j in range(3)]


#: Up to this many channels, a sum over taps and channels is written as broadcast multiply-adds
#: (one fused loop) rather than a matrix product with so few rows.
_MAX_MULTIPLY_ADD_CHANNELS = 4


def _taps_multiply_add(ys, w):
    """Σ_k Σ_c ys[k][..., c]·w[k, c, :] as 9·C broadcast multiply-adds: ``ys`` the 9 (B, H, W, C)
    copies of :func:`_taps`, ``w`` (9, C, O) → (B, H, W, O)."""
    return sum(ys[k][..., c: c + 1] * w[k, c] for k in range(9) for c in range(w.shape[1]))


@jax.custom_vjp
def conv_transpose3x3_col2im(x, kernel):
    """PyTorch ``ConvTranspose2d(k=3, stride=1, padding=1)`` (the U-Net's output layer) through
    matrix products: fast on CPU when Cout is small (an image's 1 or 3 channels), where the
    convolution's own matrix products have only Cout columns.

    ``x`` (B, H, W, Cin), ``kernel`` (3, 3, Cin, Cout) → (B, H, W, Cout). Each input pixel
    scatters x[p]·w[k] to the output pixel q = p − 1 + k (k the 2-D tap), so

        forward:         z[p, k] = x[p]·w[k]   (one (B·H·W, Cin) × (Cin, 9·Cout) product),
                         y[q] = Σ_k z[q + 1 − k, k]   (col2im: a shifted sum, z zero outside);
        kernel gradient: ∂L/∂w[k] = Σ_p x[p]ᵀ g[p − 1 + k]   (one (Cin, B·H·W) × (B·H·W, 9·Cout)
                         product with the 9 shifted copies of g = ∂L/∂y, stacked ahead of the
                         pixels so that no transpose is needed);
        input gradient:  ∂L/∂x[p] = Σ_k g[p − 1 + k]·w[k]ᵀ   (for Cout ≤ 4, 9·Cout broadcast
                         multiply-adds in one loop; else one matrix product).

    It is faster than autodiff of the forward, or the direct convolution's input gradient (a
    convolution from Cout channels, off XLA:CPU's fast kernels): docs/performance.md.

    Evaluated without differentiation (sampling, evaluation) the product reads x padded by one
    pixel (XLA writes the padding with x's producer, usually the skip concatenation), so that z
    comes out padded instead of being padded in a pass of its own, one pass fewer.
    Under differentiation that form is slower (the residual x is then written twice,
    or the kernel gradient's product grows by the padding), so the training step keeps the
    unpadded product. Both give the same numbers up to float rounding (tested).
    """
    return _col2im_forward(x, kernel, pad_input=True)


def _col2im_fwd(x, kernel):
    return _col2im_forward(x, kernel), (x, kernel)


def _col2im_bwd(res, g):
    x, kernel = res
    C, O = kernel.shape[2:]
    gs = _taps(g)
    G = jnp.stack(gs)  # (9, B, H, W, Cout): taps ahead of the pixels
    w = kernel.astype(g.dtype).reshape(9, C, O)
    if O <= _MAX_MULTIPLY_ADD_CHANNELS:
        dx = _taps_multiply_add(gs, w.transpose(0, 2, 1))
    else:
        dx = jnp.einsum("kbhwo,kco->bhwc", G, w)
    dw = jnp.einsum("bhwc,kbhwo->kco", x, G).reshape(kernel.shape)
    return dx, dw.astype(kernel.dtype)


conv_transpose3x3_col2im.defvjp(_col2im_fwd, _col2im_bwd)


def conv3x3(x, kernel):
    """The 3×3 stride-1 convolution with padding 1 as written (``nn.Conv``'s): y[q] = Σ_k x[q + k − 1]·w[k].

    ``x`` (B, H, W, Cin), ``kernel`` (3, 3, Cin, Cout) → (B, H, W, Cout)."""
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), [(1, 1), (1, 1)], dimension_numbers=_DN)


@jax.custom_vjp
def conv3x3_im2col(x, kernel):
    """:func:`conv3x3` for few input channels (the U-Net's input layer reads an image's 1 or 3),
    where the convolution's own matrix products have only Cin rows and XLA:CPU does not send it to
    its fast kernels.

    ``x`` (B, H, W, Cin), ``kernel`` (3, 3, Cin, Cout) → (B, H, W, Cout). With P[q, k] = x[q + k − 1]
    the 9 shifted copies of x (zero outside; ``_taps``)::

        forward:         y[q] = Σ_k P[q, k]·w[k]   (Cin ≤ 4: 9·Cin broadcast multiply-adds in one
                         loop; else im2col, one (B·H·W, 9·Cin) × (9·Cin, Cout) product);
        kernel gradient: ∂L/∂w[k] = Σ_q P[q, k]ᵀ g[q]   (im2col: one (9·Cin, B·H·W) × (B·H·W, Cout)
                         product, the copies stacked ahead of the pixels);
        input gradient:  the direct convolution's.
    """
    w = kernel.reshape(9, *kernel.shape[2:]).astype(x.dtype)
    if x.shape[-1] <= _MAX_MULTIPLY_ADD_CHANNELS:
        return _taps_multiply_add(_taps(x), w)
    return jnp.einsum("bhwkc,kco->bhwo", jnp.stack(_taps(x), axis=3), w)


def _im2col_fwd(x, kernel):
    return conv3x3_im2col(x, kernel), (x, kernel)


def _im2col_bwd(res, g):
    x, kernel = res
    dx = jax.vjp(lambda a: conv3x3(a, kernel), x)[1](g)[0]
    dw = jnp.einsum("kbhwc,bhwo->kco", jnp.stack(_taps(x)), g).reshape(kernel.shape)
    return dx, dw.astype(kernel.dtype)


conv3x3_im2col.defvjp(_im2col_fwd, _im2col_bwd)

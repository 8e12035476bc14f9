"""Exact reformulations of the U-Net's stride-2 convolutions as stride-1 convolutions.

XLA on CPU lowers a convolution with a dilated input (``lhs_dilation``: a transposed
convolution, and the input gradient of every strided convolution) to a slow generic loop, while
plain stride-1 convolutions go to its fast (Eigen / oneDNN) kernels. These functions compute the
same numbers through stride-1 convolutions only, so forward *and* backward passes stay fast.
Both use the weights exactly as stored (``(3, 3, Cin, Cout)``, HWIO); the tests check them
against the direct formulations to float rounding.

Notation for one spatial axis (the other is the same): a 3×3 kernel tap ``k ∈ {0, 1, 2}``.

- Strided convolution, padding 1: y[m] = Σ_k x[2m − 1 + k]·w[k]. With the input split into pairs
  X[j] = (x[2j], x[2j+1]) (space-to-depth) this is y[m] = X[m−1][1]·w[0] + X[m][0]·w[1] +
  X[m][1]·w[2]: a 2×2 stride-1 convolution of X (4·Cin channels) padded by one at the start.
- Transposed convolution (PyTorch ``ConvTranspose2d``, stride 2, padding 1): y[o] = Σ_{i,k:
  o = 2i − 1 + k} x[i]·w[k], so the even outputs are y[2m] = x[m]·w[1] and the odd ones
  y[2m+1] = x[m]·w[2] + x[m+1]·w[0]. All four (row, column) phases come from one 2×2 stride-1
  convolution with 4·Cout outputs (input padded by one at the end), then depth-to-space, then a
  crop to the PyTorch size 2H − 1 + output_padding.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

__all__ = ["conv3x3_stride2", "conv_transpose3x3_stride2"]

_DN = ("NHWC", "HWIO", "NHWC")


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
    B, H, W, C = x.shape
    O = kernel.shape[-1]
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
    y = y.reshape(B, H, W, 2, 2, O).transpose(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, O)
    return y[:, : 2 * H - 1 + output_padding[0], : 2 * W - 1 + output_padding[1]]

"""ddpm_jax.models.group_norm: the same GroupNorm as flax's ``nn.GroupNorm``, summed in another order,
and the U-Net's swish(GroupNorm(h + b)) block with its written-out backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.group_norm import GroupNorm, GroupNormSwish, group_norm, group_norm_swish


def _flax(num_groups, dtype=jnp.float32):
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, use_fast_variance=False, dtype=dtype)


@pytest.mark.parametrize("shape,groups", [((3, 28, 28, 8), 4), ((2, 7, 5, 12), 3), ((2, 4, 4, 6), 1), ((1, 3, 2, 4), 4)])
def test_equals_flax_group_norm_in_value_and_gradients(x64, shape, groups):
    """Value and the gradients with respect to x, scale and bias (for a random cotangent) equal
    nn.GroupNorm's, in float64: only the summation order differs, so the tolerance is float64
    rounding of sums of ~10³ terms (1e-12). Per-channel scales/biases and a non-zero mean so that
    the per-group statistics, not only the normalisation, are exercised; groups of 1 channel
    (C = G) and a single group (layer norm) included."""
    rng = np.random.default_rng(0)
    C = shape[-1]
    x = jnp.asarray(3.0 * rng.normal(size=shape) + 2.0)
    scale = jnp.asarray(1.0 + 0.3 * rng.normal(size=(C,)))
    bias = jnp.asarray(0.3 * rng.normal(size=(C,)))
    g = jnp.asarray(rng.normal(size=shape))
    ref = _flax(groups, jnp.float64)

    def value_and_grads(f):
        y, vjp = jax.vjp(f, x, scale, bias)
        return (y,) + vjp(g)

    want = value_and_grads(lambda a, s, b: ref.apply({"params": {"scale": s, "bias": b}}, a))
    got = value_and_grads(lambda a, s, b: group_norm(a, s, b, groups, 1e-5))
    assert got[0].dtype == jnp.float64  # computed in the input's (wider) precision
    for u, v in zip(got, want):
        assert u.shape == v.shape
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


def test_module_has_flax_parameters_and_output_dtype():
    """Same parameter names, shapes and initial values as nn.GroupNorm (checkpoints move between
    the two); statistics in float32 and the output in the module's dtype."""
    x = jnp.ones((2, 8, 8, 16), jnp.bfloat16)
    ours = GroupNorm(4, dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    theirs = _flax(4, jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert GroupNorm(4, dtype=jnp.bfloat16).apply(ours, x).dtype == jnp.bfloat16


def test_float32_matches_float64_for_data_far_from_zero():
    """The variance is two-pass (E[(x − μ)²], not E[x²] − μ²), so data with mean 1000 and std 1
    normalise to float32 accuracy: the error is a few float32 ulps of |x| ≈ 1000 relative to the
    std, ~1e-4 (2⁻²⁴·1000·a few); E[x²] − μ² would lose everything (μ² ≈ 1e6 in 24 bits)."""
    rng = np.random.default_rng(1)
    x64_np = 1000.0 + rng.normal(size=(2, 6, 6, 8))
    x = jnp.asarray(x64_np, jnp.float32)
    y = np.asarray(group_norm(x, jnp.ones(8), jnp.zeros(8), 2))
    xg = np.asarray(x, np.float64).reshape(2, 6, 6, 2, 4)
    want = ((xg - xg.mean(axis=(1, 2, 4), keepdims=True))
            / np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, want, atol=5e-4)


def _swish_block_inputs(shape, rng, loc=2.0):
    B, C = shape[0], shape[-1]
    h = jnp.asarray(3.0 * rng.normal(size=shape) + loc)
    tb = jnp.asarray(rng.normal(size=(B, C)))
    scale = jnp.asarray(1.0 + 0.3 * rng.normal(size=(C,)))
    bias = jnp.asarray(0.3 * rng.normal(size=(C,)))
    return h, tb, scale, bias


@pytest.mark.parametrize("shape,groups", [((3, 28, 28, 8), 4), ((2, 7, 5, 12), 3), ((2, 4, 4, 6), 1), ((1, 3, 2, 4), 4)])
def test_swish_block_equals_swish_of_group_norm_in_value_and_gradients(x64, shape, groups):
    """group_norm_swish(h, b, γ, β) = swish(group_norm(h + b, γ, β)) in value and in the gradients
    with respect to h, b, γ and β (the written-out backward against autodiff of the composition,
    for a random cotangent), in float64: the two differ in summation order and in y = h·(γ/σ) +
    (β − m·γ/σ) against (x − μ)·γ/σ + β, so the tolerance is float64 rounding of sums of ~10³
    terms of size ~10 (1e-12). Per-example, per-channel biases b that differ between examples,
    a non-zero mean, groups of 1 channel and a single group included."""
    rng = np.random.default_rng(2)
    args = _swish_block_inputs(shape, rng)
    g = jnp.asarray(rng.normal(size=shape))

    def value_and_grads(f):
        y, vjp = jax.vjp(f, *args)
        return (y,) + vjp(g)

    want = value_and_grads(lambda h, b, s, c: jax.nn.swish(group_norm(h + b[:, None, None, :], s, c, groups, 1e-5)))
    got = value_and_grads(lambda h, b, s, c: group_norm_swish(h, b, s, c, groups, 1e-5))
    assert got[0].dtype == jnp.float64
    for u, v in zip(got, want):
        assert u.shape == v.shape
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


def test_swish_block_float32_far_from_zero():
    """h of mean 1000 and std 1 plus a bias b of −500, in float32, against the float64 composition:
    the variance is two-pass about h's own offset m = μ − b, and y = h·(γ/σ) + (β − m·γ/σ) cancels
    at |h|·γ/σ ≈ 1000, so the error is a few float32 ulps of 1000 (2⁻²⁴·1000 ≈ 6e-5, times a
    few): atol 5e-4, as for group_norm. E[h²] − E[h]² would lose everything."""
    rng = np.random.default_rng(3)
    h64 = 1000.0 + rng.normal(size=(2, 6, 6, 8))
    tb64 = np.full((2, 8), -500.0)
    got = np.asarray(group_norm_swish(jnp.asarray(h64, jnp.float32), jnp.asarray(tb64, jnp.float32),
                                      jnp.ones(8), jnp.zeros(8), 2))
    xg = (np.asarray(jnp.asarray(h64, jnp.float32), np.float64) + tb64[:, None, None, :]).reshape(2, 6, 6, 2, 4)
    y = ((xg - xg.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + 1e-5)).reshape(h64.shape)
    np.testing.assert_allclose(got, y / (1 + np.exp(-y)), atol=5e-4)


def test_swish_block_module_has_group_norm_parameters_and_output_dtype():
    """GroupNormSwish has GroupNorm's parameters (names, shapes, initial values: checkpoints move
    between the two) and equals swish(GroupNorm(h + b)) with them; output in the module's dtype."""
    rng = np.random.default_rng(4)
    h, tb = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32), jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
    ours = GroupNormSwish(4).init(jax.random.PRNGKey(0), h, tb)
    theirs = GroupNorm(4).init(jax.random.PRNGKey(0), h)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    want = jax.nn.swish(GroupNorm(4).apply(theirs, h + tb[:, None, None, :]))
    # float32: both compute the same statistics, so they differ by rounding of O(1) values (~1e-6)
    np.testing.assert_allclose(GroupNormSwish(4).apply(ours, h, tb), want, rtol=0, atol=1e-5)
    assert GroupNormSwish(4, dtype=jnp.bfloat16).apply(ours, h.astype(jnp.bfloat16), tb).dtype == jnp.bfloat16


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="not divisible by num_groups=3"):
        group_norm_swish(jnp.ones((1, 2, 2, 8)), jnp.ones((1, 8)), jnp.ones(8), jnp.zeros(8), 3)
    with pytest.raises(ValueError, match=r"channel bias must have shape \(1, 8\)"):
        group_norm_swish(jnp.ones((1, 2, 2, 8)), jnp.ones((8,)), jnp.ones(8), jnp.zeros(8), 2)
    with pytest.raises(ValueError, match=r"h must be \(B, H, W, C\)"):
        group_norm_swish(jnp.ones((2, 8)), jnp.ones((2, 8)), jnp.ones(8), jnp.zeros(8), 2)
    with pytest.raises(ValueError, match=r"must be \(B, H, W, C\)"):
        GroupNormSwish(2).init(jax.random.PRNGKey(0), jnp.ones((2, 8)), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="not divisible by num_groups=3"):
        group_norm(jnp.ones((1, 2, 2, 8)), jnp.ones(8), jnp.zeros(8), 3)
    with pytest.raises(ValueError, match=r"must be \(B, H, W, C\)"):
        GroupNorm(2).init(jax.random.PRNGKey(0), jnp.ones((2, 8)))

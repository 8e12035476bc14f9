"""ddpm_jax.models.group_norm: the same GroupNorm as flax's ``nn.GroupNorm``, summed in another order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.group_norm import GroupNorm, group_norm


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


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="not divisible by num_groups=3"):
        group_norm(jnp.ones((1, 2, 2, 8)), jnp.ones(8), jnp.zeros(8), 3)
    with pytest.raises(ValueError, match=r"must be \(B, H, W, C\)"):
        GroupNorm(2).init(jax.random.PRNGKey(0), jnp.ones((2, 8)))

"""Tests of the U-Net (``ddpm_jax.models``): shapes, parameter counts, the fixed Fourier features,
the ρ-head, PyTorch-style transposed convolutions and initialisation, validation, jit.

Medium/large presets are only traced (``jax.eval_shape``) to keep the file fast on CPU.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax.models import (
    PRESETS,
    ConvTranspose,
    GaussianFourierFeatures,
    ScoreNet,
    count_params,
    make_model,
    param_labels,
)
from ddpm_jax.models import conv_ops

KEY = jax.random.PRNGKey(0)
SHAPES = [(28, 28, 1), (32, 32, 3)]

# Parameter counts of the PyTorch reference (/work/shared/bench/torch_seed_ref.py, ScoreNetEps,
# 1 input channel), measured once with torch 2.13 (count_params(model) -> (total, trainable)).
# Recorded here so the test needs no torch; the formula below is the primary check.
TORCH_REFERENCE_COUNTS = {
    "small": (165865, 165737),
    "medium": (1115425, 1115297),
    "large": (3897537, 3897409),
}


def expected_param_count(channels, embed_dim, in_ch, out_ch, rho_head=False):
    """(total, trainable) derived from the architecture (DESIGN.md "Model")."""
    c1, c2, c3, c4 = channels
    E = embed_dim
    k2 = 9  # 3×3 kernels
    fourier = E // 2  # fixed W, not trainable
    time_dense = E * E + E
    enc_convs = k2 * (in_ch * c1 + c1 * c2 + c2 * c3 + c3 * c4)  # no bias
    dec_convs = k2 * (c4 * c3 + 2 * c3 * c2 + 2 * c2 * c1)  # no bias; skips double the input
    final = k2 * 2 * c1 * out_ch + out_ch  # with bias
    widths = [c1, c2, c3, c4, c3, c2, c1]  # 4 encoder + 3 decoder blocks
    time_biases = sum(E * c + c for c in widths)
    norms = sum(2 * c for c in widths)
    rho = 2 if rho_head else 0
    total = fourier + time_dense + enc_convs + dec_convs + final + time_biases + norms + rho
    return total, total - fourier


def _abstract_params(model, shape, batch=1):
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.eval_shape(model.init, KEY, x, t)["params"]


def init_params(model, channels=1, key=KEY):
    """Parameters do not depend on H, W: initialise on one 8×8 image (the eager per-op compile
    cache is then shared by every test, which keeps this file fast on CPU)."""
    return model.init(key, jnp.zeros((1, 8, 8, channels)), jnp.ones((1,)))["params"]


@pytest.fixture(scope="module")
def small28():
    model = make_model("small", image_shape=(28, 28, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
    t = jnp.array([1, 7, 100, 200])
    return model, init_params(model), x, t


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape", SHAPES + [(29, 33, 1), (8, 8, 1)])
def test_small_forward_shape(shape):
    model = make_model("small", image_shape=shape)
    x = jax.random.normal(KEY, (2, *shape))
    t = jnp.array([1, 200])
    params = init_params(model, shape[-1])
    y = jax.jit(model.apply)({"params": params}, x, t)
    assert y.shape == (2, *shape)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("preset", ["medium", "large"])
@pytest.mark.parametrize("shape", SHAPES)
def test_preset_shapes_abstract(preset, shape):
    model = make_model(preset, image_shape=shape)
    x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((3,), jnp.int32)

    def fwd(key, x, t):
        return model.apply(model.init(key, x, t), x, t)

    y = jax.eval_shape(fwd, KEY, x, t)
    assert y.shape == (3, *shape) and y.dtype == jnp.float32


def test_out_channels_and_scalar_t():
    model = ScoreNet(out_channels=2)
    x = jnp.ones((2, 16, 16, 3))
    y = jax.eval_shape(lambda: model.apply(model.init(KEY, x, jnp.float32(3.0)), x, 3.0))
    assert y.shape == (2, 16, 16, 2)


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho_head", [False, True])
def test_param_count_formula(preset, shape, rho_head):
    model = make_model(preset, image_shape=shape, rho_head=rho_head)
    got = count_params(_abstract_params(model, shape))
    want = expected_param_count(PRESETS[preset], 256, shape[-1], shape[-1], rho_head)
    assert got == want


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_param_count_matches_torch_reference(preset):
    model = make_model(preset, image_shape=(28, 28, 1))
    assert count_params(_abstract_params(model, (28, 28, 1))) == TORCH_REFERENCE_COUNTS[preset]


def test_count_params_accepts_variables_dict(small28):
    _, params, _, _ = small28
    assert count_params({"params": params}) == count_params(params)


# --------------------------------------------------------------------------- Fourier features


def test_fourier_W_frozen_and_scaled(small28):
    model, params, x, t = small28
    W = params["time_features"]["W"]
    assert W.shape == (128,)
    # The sample std of n = 128 Gaussian draws has relative standard error ≈ 1/√(2n) = 0.0625;
    # allow 4 standard errors (25 %). The mean's standard error is σ/√n ≈ 2.65; allow 4 of those.
    n = W.shape[0]
    assert abs(float(jnp.std(W)) / 30.0 - 1.0) < 4 / math.sqrt(2 * n)
    assert abs(float(jnp.mean(W))) < 4 * 30.0 / math.sqrt(n)

    g = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t) * g)))(params)
    assert bool(jnp.all(grads["time_features"]["W"] == 0.0))
    assert float(jnp.abs(grads["time_embed"]["kernel"]).max()) > 0.0  # the rest does train


def test_fourier_scale_is_used():
    layer = GaussianFourierFeatures(embed_dim=512, scale=5.0)
    t = jnp.array([1.0, 2.0])
    variables = layer.init(KEY, t)
    W = variables["params"]["W"]
    n = W.shape[0]  # 256 draws: relative SE of the std ≈ 1/√512 ≈ 0.044; 4 SE allowed
    assert abs(float(jnp.std(W)) / 5.0 - 1.0) < 4 / math.sqrt(2 * n)
    feats = layer.apply(variables, t)
    proj = 2 * jnp.pi * t[:, None] * W[None, :]
    np.testing.assert_allclose(feats, jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], -1),
                               atol=2e-3)  # phases ~1e2 rad: float32 rounding of the product


def test_param_labels_freeze_W_under_multi_transform(small28):
    model, params, x, t = small28
    rho_model = make_model("small", image_shape=(28, 28, 1), rho_head=True)
    rparams = init_params(rho_model)
    labels = param_labels(rparams)
    assert labels["time_features"]["W"] == "frozen"
    assert labels["rho0"] == "rho" and labels["rho1"] == "rho"
    assert labels["conv1"]["kernel"] == "net" and labels["time_embed"]["kernel"] == "net"
    assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(rparams)
    assert param_labels({"params": rparams})["params"] == labels

    tx = optax.multi_transform(
        {"net": optax.adam(1e-2), "rho": optax.adam(0.2), "frozen": optax.set_to_zero()}, labels)
    loss = lambda p: jnp.mean(rho_model.apply({"params": p}, x, t) ** 2)

    @jax.jit
    def step(p):
        updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
        return optax.apply_updates(p, updates)

    new = step(rparams)
    assert bool(jnp.all(new["time_features"]["W"] == rparams["time_features"]["W"]))
    assert not bool(jnp.all(new["conv1"]["kernel"] == rparams["conv1"]["kernel"]))
    assert float(new["rho0"]) != 1.0


# --------------------------------------------------------------------------- rho head


def test_rho_head(small28):
    _, _, x, t = small28
    plain = make_model("small", image_shape=(28, 28, 1))
    rho = make_model("small", image_shape=(28, 28, 1), rho_head=True)
    rparams = init_params(rho)
    assert float(rparams["rho0"]) == 1.0 and float(rparams["rho1"]) == 1.0
    assert rparams["rho0"].shape == () and rparams["rho1"].shape == ()
    net_params = {k: v for k, v in rparams.items() if k not in ("rho0", "rho1")}

    delta = jax.jit(plain.apply)({"params": net_params}, x, t)
    mu = jax.jit(rho.apply)({"params": rparams}, x, t)
    np.testing.assert_allclose(mu, x - delta, rtol=0, atol=1e-6)

    # Gradients reach ρ0, ρ1 with the analytic values of L = Σ g·ρ0(x − ρ1 δ):
    # ∂L/∂ρ0 = Σ g·(x − ρ1 δ), ∂L/∂ρ1 = −ρ0 Σ g·δ   (at ρ0 = ρ1 = 1).
    g = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(g * rho.apply({"params": p}, x, t))))(rparams)
    np.testing.assert_allclose(grads["rho0"], jnp.sum(g * (x - delta)), rtol=1e-4)
    np.testing.assert_allclose(grads["rho1"], -jnp.sum(g * delta), rtol=1e-4)


# --------------------------------------------------------------------------- time, jit, dtype


def test_output_depends_on_t_and_jit(small28):
    model, params, x, t = small28
    apply = lambda p, x, t: model.apply({"params": p}, x, t)
    y = apply(params, x, t)
    y_jit = jax.jit(apply)(params, x, t)
    np.testing.assert_allclose(y_jit, y, rtol=1e-5, atol=1e-5)

    t2 = t.at[1].set(8)  # change only example 1's time step
    y2 = jax.jit(apply)(params, x, t2)
    assert float(jnp.abs(y2[1] - y[1]).max()) > 1e-3
    np.testing.assert_allclose(y2[0], y[0], rtol=1e-5, atol=1e-5)
    # float t is accepted and used as given (no rescaling): t = 7.0 behaves as the integer 7.
    y3 = jax.jit(apply)(params, x, t.astype(jnp.float32))
    np.testing.assert_allclose(y3, y, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute(small28):
    _, params, x, t = small28
    model = make_model("small", image_shape=(28, 28, 1), dtype=jnp.bfloat16)
    y = jax.jit(model.apply)({"params": params}, x, t)
    y32 = jax.jit(make_model("small", image_shape=(28, 28, 1)).apply)({"params": params}, x, t)
    assert y.dtype == jnp.float32
    abstract = _abstract_params(model, (28, 28, 1))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(abstract))
    assert float(jnp.abs(y - y32).max()) < 0.1 * float(jnp.abs(y32).max())


# --------------------------------------------------------------------------- PyTorch semantics


@pytest.mark.parametrize("in_size,target", [(4, 7), (7, 14), (4, 8), (8, 16)])
def test_conv_transpose_is_adjoint_of_strided_conv(in_size, target):
    # PyTorch's ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=op) is the
    # input-gradient of Conv2d(cout, cin, 3, stride=2, padding=1) with the same weight tensor,
    # taken at the input size the output_padding selects (here: the skip size `target`).
    cin, cout = 3, 2
    op = target - (2 * in_size - 1)
    layer = ConvTranspose(cout, stride=2, output_padding=(op, op))
    y = jax.random.normal(jax.random.PRNGKey(4), (2, in_size, in_size, cin))
    params = layer.init(KEY, y)["params"]
    out = layer.apply({"params": params}, y)
    assert out.shape == (2, target, target, cout)

    kernel_hwio = jnp.transpose(params["kernel"], (0, 1, 3, 2))  # conv: cout -> cin

    def conv(z):
        return jax.lax.conv_general_dilated(z, kernel_hwio, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    z = jnp.zeros((2, target, target, cout))
    _, vjp = jax.vjp(conv, z)
    np.testing.assert_allclose(out, vjp(y)[0], rtol=1e-5, atol=1e-5)


def test_torch_default_init_bounds(small28):
    # U(−1/√fan_in, 1/√fan_in); transposed convs use fan_in = out_channels·k·k (PyTorch quirk).
    _, p, _, _ = small28
    c1, c2, c3, c4 = PRESETS["small"]
    bounds = {
        ("conv2", "kernel"): 1 / math.sqrt(c1 * 9),
        ("conv4", "kernel"): 1 / math.sqrt(c3 * 9),
        ("tconv4", "kernel"): 1 / math.sqrt(c3 * 9),  # in = c4, out = c3
        ("tconv2", "kernel"): 1 / math.sqrt(c1 * 9),  # in = 2·c2, out = c1
        ("dense4", "kernel"): 1 / math.sqrt(256),
        ("time_embed", "kernel"): 1 / math.sqrt(256),
        ("time_embed", "bias"): 1 / math.sqrt(256),
    }
    for (mod, name), b in bounds.items():
        w = np.asarray(p[mod][name])
        assert np.abs(w).max() <= b, (mod, name)
        # ≥ 256 uniform draws: the largest |w| is within 5 % of the bound with near certainty,
        # and the std is b/√3 up to a few percent.
        assert np.abs(w).max() > 0.95 * b, (mod, name)
        assert abs(w.std() / (b / math.sqrt(3)) - 1) < 0.15, (mod, name)
    assert bool(jnp.all(p["norm1"]["scale"] == 1.0)) and bool(jnp.all(p["norm1"]["bias"] == 0.0))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("shape", [(7, 7, 1), (28, 4, 1), (1, 1, 1), (28, 28), (28, 28, 0)])
def test_bad_image_shape_raises(shape):
    with pytest.raises(ValueError, match="ScoreNet"):
        make_model("small", image_shape=shape)


def test_bad_image_shape_raises_at_init():
    with pytest.raises(ValueError, match="too small"):
        ScoreNet().init(KEY, jnp.zeros((1, 6, 6, 1)), jnp.ones((1,)))


@pytest.mark.parametrize("channels,groups", [((8, 16, 30, 64), 4), ((8, 16, 32), 4),
                                             ((6, 12, 24, 48), 4), ((8, 16, 32, 64), 3)])
def test_bad_channels_raise(channels, groups):
    with pytest.raises(ValueError, match="ScoreNet"):
        make_model(channels, image_shape=(28, 28, 1), num_groups=groups)
    if len(channels) == 4:
        with pytest.raises(ValueError, match="divisible"):
            ScoreNet(channels=channels, num_groups=groups).init(
                KEY, jnp.zeros((1, 28, 28, 1)), jnp.ones((1,)))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="small"):
        make_model("huge", image_shape=(28, 28, 1))


def test_rho_head_needs_matching_channels():
    with pytest.raises(ValueError, match="rho_head"):
        ScoreNet(out_channels=2, rho_head=True).init(KEY, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))


# --------------------------------------------------------------------------- stride-1 reformulations


@pytest.mark.parametrize("h,w", [(28, 28), (14, 14), (7, 7), (5, 8), (8, 8)])
def test_space_to_depth_conv_equals_strided_conv(x64, h, w):
    """conv_ops.conv3x3_stride2 is the 3x3 stride-2 padding-1 convolution (even and odd sizes):
    in float64 the two differ by summation order only, ~1e-15 relative."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, h, w, 3)))
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 5)))
    want = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = conv_ops.conv3x3_stride2(x, k)
    assert got.shape == want.shape == (2, -(-h // 2), -(-w // 2), 5)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _value_and_vjp(f, x, k, g):
    y, vjp = jax.vjp(f, x, k)
    return (y,) + vjp(g)


@pytest.mark.parametrize("form", ["conv_transpose3x3_stride2", "conv_transpose3x3_stride2_phases"])
@pytest.mark.parametrize("h,w,op", [(4, 4, (0, 0)), (4, 4, (1, 1)), (7, 7, (0, 0)), (7, 5, (1, 0)), (14, 14, (0, 1))])
def test_phase_transposed_convs_equal_the_dilated_form(x64, h, w, op, form):
    """conv_ops' sub-pixel forms of the stride-2 transposed convolution (one four-phase 2x2
    convolution; four convolutions of 1x1, 1x2, 2x1, 2x2 taps) equal ConvTranspose's
    input-dilated convolution (the PyTorch ConvTranspose2d, checked against the adjoint above) in
    value and in both gradients (input and kernel, for a random cotangent), every output_padding;
    float64, so the tolerance is summation-order rounding."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, h, w, 3)))
    layer = ConvTranspose(4, stride=2, output_padding=op, dtype=jnp.float64)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
    g = jnp.asarray(rng.normal(size=(2, 2 * h - 1 + op[0], 2 * w - 1 + op[1], 4)))
    want = _value_and_vjp(lambda a, b: layer.apply({"params": {"kernel": b}}, a), x, k, g)
    got = _value_and_vjp(lambda a, b: getattr(conv_ops, form)(a, b, op), x, k, g)
    for u, v in zip(got, want):
        assert u.shape == v.shape
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


#: conv_ops' matrix-product forms of the stride-1 3x3 layers -> the direct layer they replace.
_MATMUL_FORMS = {
    # col2im (matrix product + shifted sum; custom backward: the kernel gradient as one matrix
    # product with the shifted cotangent) for the output layer, PyTorch ConvTranspose2d(k=3, padding=1)
    "conv_transpose3x3_col2im": lambda cout: ConvTranspose(cout, stride=1, dtype=jnp.float64),
    # im2col (one matrix product of the 9 shifted copies of x; custom backward: the kernel gradient
    # as one matrix product with the same copies) for the input layer, nn.Conv 3x3 padding 1
    "conv3x3_im2col": lambda cout: nn.Conv(cout, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=jnp.float64),
}


@pytest.mark.parametrize("form", list(_MATMUL_FORMS))
@pytest.mark.parametrize("h,w,cin,cout", [(28, 28, 16, 1), (28, 28, 1, 8), (7, 5, 4, 3), (7, 5, 3, 4), (8, 8, 2, 2)])
def test_matrix_product_forms_equal_the_direct_layers(x64, h, w, cin, cout, form):
    """conv_ops' col2im and im2col forms equal the layers they replace (see _MATMUL_FORMS) in value
    and in both gradients (input and kernel, for a random cotangent); float64: summation-order
    rounding."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, h, w, cin)))
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)))
    g = jnp.asarray(rng.normal(size=(2, h, w, cout)))
    layer = _MATMUL_FORMS[form](cout)
    want = _value_and_vjp(lambda a, b: layer.apply({"params": {"kernel": b}}, a), x, k, g)
    got = _value_and_vjp(getattr(conv_ops, form), x, k, g)
    for u, v in zip(got, want):
        assert u.shape == v.shape
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
    # Without differentiation a custom_vjp runs its primal, which may be another form (col2im's
    # pads its input): it must give the same value too.
    np.testing.assert_allclose(getattr(conv_ops, form)(x, k), want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["stride1", "phases"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_conv_impls_give_the_same_network(shape, impl):
    """ScoreNet with conv_impl='stride1' or 'phases' has the same parameter tree and initial
    values as 'xla', and with the same params the same output and gradients, up to float32
    summation order (measured ~4e-7 relative on the output, ~1e-6 relative on gradients;
    tolerance 2e-5)."""
    a = make_model("small", image_shape=shape)
    b = make_model("small", image_shape=shape, conv_impl=impl)
    x = jax.random.normal(jax.random.PRNGKey(1), (4,) + shape)
    t = jnp.arange(1, 5.0)
    pa, pb = a.init(KEY, x, t)["params"], b.init(KEY, x, t)["params"]
    assert jax.tree_util.tree_structure(pa) == jax.tree_util.tree_structure(pb)
    for u, v in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(u, v)
    ya, yb = a.apply({"params": pa}, x, t), b.apply({"params": pa}, x, t)
    np.testing.assert_allclose(yb, ya, rtol=0, atol=2e-5 * float(jnp.abs(ya).max()))
    ga = jax.grad(lambda p: jnp.sum(a.apply({"params": p}, x, t) ** 2))(pa)
    gb = jax.grad(lambda p: jnp.sum(b.apply({"params": p}, x, t) ** 2))(pa)
    for u, v in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(v, u, rtol=0, atol=2e-5 * (float(jnp.abs(u).max()) + 1e-30))


def test_unknown_conv_impl_raises():
    with pytest.raises(ValueError, match="unknown conv_impl 'cudnn'"):
        make_model("small", image_shape=(28, 28, 1), conv_impl="cudnn")

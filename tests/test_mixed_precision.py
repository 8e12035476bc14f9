"""The compute dtype (``model.dtype``): bfloat16 networks give the float32 loss to within bfloat16
rounding, keep float32 params, gradients and optimiser state, and train through the trainer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import objectives, rng, schedules
from ddpm_jax.models import make_ddpm_unet, make_model, make_model_fn, model_from_config
from ddpm_jax.trainer import train_and_evaluate
from helpers import make_digits_like, tiny_config

#: bfloat16's unit roundoff: 8 significand bits, u = 2^-9.
BF16_U = 2.0 ** -9

FAMILIES = {
    "scorenet": lambda dt: make_model("small", image_shape=(28, 28, 1), dtype=dt),
    "unet": lambda dt: make_ddpm_unet(image_shape=(28, 28, 1), ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                                      attn_resolutions=(7,), dropout=0.0, num_groups=8, dtype=dt),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_loss_is_the_f32_loss_within_bf16_rounding(family):
    """The same params, batch, t and noise through the float32 and the bfloat16 network.

    Each bf16 layer rounds its inputs and outputs to 8 significand bits (relative error u ≈ 2e-3
    per rounding); over the network's ~20 layers the prediction carries a relative error of a
    few u up to ~10u (measured 0.5 % ScoreNet, 2 % U-Net). The loss is the mean of 64 × 784
    squared residuals whose rounding errors are nearly independent, so they average out: its
    relative error stays well below one rounding of the prediction (measured 8e-4 and 8e-5).
    Tolerances: prediction 16u = 3.1 %, loss 4u = 7.8e-3."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 28, 28, 1)).astype(np.float32))
    sched = schedules.make_schedule("linear", 1000, beta_start=1e-4, beta_end=0.02)
    keys = rng.per_example_keys(jax.random.PRNGKey(0), jnp.arange(64))
    loss = objectives.get_objective("eps", weighting="simple", reduction="mean")
    m32, m16 = FAMILIES[family](jnp.float32), FAMILIES[family](jnp.bfloat16)
    params = m32.init(jax.random.PRNGKey(1), x[:1], jnp.ones((1,)))["params"]
    # away from the zero-initialised output layers, so that every layer contributes
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise = [0.05 * jax.random.normal(jax.random.PRNGKey(i), a.shape) for i, a in enumerate(leaves)]
    params = jax.tree_util.tree_unflatten(treedef, [a + n for a, n in zip(leaves, noise)])

    def run(model):
        fn = make_model_fn(model.apply, params, num_steps=1000)
        value = float(jax.jit(lambda xx: loss(fn, sched, xx, keys)[0])(x))
        pred = jax.jit(fn)(x, jnp.full((64,), 500))
        grads = jax.jit(jax.grad(lambda p: loss(make_model_fn(model.apply, p, num_steps=1000), sched, x, keys)[0]))(params)
        return value, pred, grads

    l32, p32, _ = run(m32)
    l16, p16, g16 = run(m16)
    assert p16.dtype == jnp.float32  # the output is cast back for the loss
    assert float(jnp.linalg.norm(p16 - p32) / jnp.linalg.norm(p32)) < 16 * BF16_U
    assert abs(l16 - l32) / l32 < 4 * BF16_U, (l16, l32)
    assert {a.dtype for a in jax.tree_util.tree_leaves(g16)} == {jnp.dtype(jnp.float32)}
    assert not np.array_equal(np.asarray(p16), np.asarray(p32))  # it did compute in bf16


def test_config_dtype_reaches_the_network_and_the_state_stays_float32(tmp_path):
    for name in ("scorenet", "unet"):
        c = ml_collections.ConfigDict(dict(name=name, preset="small", rho_head=False, embed_dim=256, num_groups=8,
                                           fourier_scale=30.0, conv_impl="auto", ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                           attn_resolutions=(), dropout=0.0, time_input="index", dtype="bfloat16"))
        assert model_from_config(c, (28, 28, 1)).dtype == jnp.bfloat16
    arrays = {k: (v[..., None] if k.endswith("images") else v.astype(np.int32)) for k, v in make_digits_like().items()}
    config = tiny_config("eps", **{"train.num_steps": 3, "model.dtype": "bfloat16"})
    out = train_and_evaluate(config, str(tmp_path), arrays=arrays, progress=False)
    assert out["step"] == 3 and np.isfinite(out["train_loss"]) and np.isfinite(out["val_loss"])
    from ddpm_jax.runs import load_run

    run = load_run(str(tmp_path))
    assert {a.dtype for a in jax.tree_util.tree_leaves((run.params, run.ema_params))} == {jnp.dtype(jnp.float32)}

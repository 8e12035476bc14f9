"""The U-Net of Ho et al. (``ddpm_jax.models.DDPMUNet``) and what comes with it: its parameter
count against the paper's, shapes, dropout only in training, real training steps, validation,
model selection by config, random flips in the batch pipeline, and ``experiments.model_summary``.

Networks are tiny (ch 8, 4 groups) except where only traced (``jax.eval_shape``).
"""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import data, objectives, rng
from ddpm_jax.config import ConfigError, validate_config
from ddpm_jax.models import (
    DDPMUNet,
    ScoreNet,
    count_params,
    describe_model,
    make_ddpm_unet,
    make_model_fn,
    model_from_config,
    takes_train,
)
from ddpm_jax.train_state import create_train_state, make_optimizer
from ddpm_jax.train_step import DROPOUT_STREAM, StepConfig, eval_step, train_step
from helpers import REPO, cpu_env, make_digits_like, tiny_config

sys.path.insert(0, REPO)
from configs import cifar10, mnist, mnist_unet  # noqa: E402

KEY = jax.random.PRNGKey(0)
ARRAYS = {k: (v[..., None] if k.endswith("images") else v.astype(np.int32)) for k, v in make_digits_like().items()}
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.3, num_groups=4)


def expected_param_count(ch, ch_mult, num_res_blocks, attn_resolutions, size, channels):
    """The parameter count derived from the layout (module docstring of ddpm_unet.py): every
    convolution and dense layer with bias, GroupNorm with scale and bias."""
    def conv(cin, cout, k=3):
        return k * k * cin * cout + cout

    def dense(cin, cout):
        return cin * cout + cout

    def res(cin, cout):
        nin = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout) + dense(4 * ch, cout) + 2 * cout + conv(cout, cout) + nin

    def attn(c):
        return 2 * c + 4 * dense(c, c)  # norm, q, k, v, proj_out

    total = dense(ch, 4 * ch) + dense(4 * ch, 4 * ch) + conv(channels, ch)
    skips, cur = [ch], ch
    for i, m in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            total += res(cur, ch * m) + (attn(ch * m) if size in attn_resolutions else 0)
            cur = ch * m
            skips.append(cur)
        if i != len(ch_mult) - 1:
            total += conv(cur, cur)
            skips.append(cur)
            size //= 2
    total += 2 * res(cur, cur) + attn(cur)
    for i in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += res(cur + skips.pop(), ch * ch_mult[i]) + (attn(ch * ch_mult[i]) if size in attn_resolutions else 0)
            cur = ch * ch_mult[i]
        if i != 0:
            total += conv(cur, cur)
            size *= 2
    return total + 2 * cur + conv(cur, channels)


def abstract_params(model, shape):
    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(model.init, KEY, x, t)["params"]


def random_params(model, shape, scale=0.2, seed=3):
    """Params of the right shapes drawn from N(0, scale²), without compiling ``init`` (at init the
    last convolution of every residual branch is ~1e-10, which would hide what dropout does)."""
    leaves, tree = jax.tree_util.tree_flatten(abstract_params(model, shape))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


# --------------------------------------------------------------------------- parameter count


def test_cifar10_has_the_papers_35_746_307_parameters():
    config = cifar10.get_config()
    model = model_from_config(config.model, (32, 32, 3))
    assert isinstance(model, DDPMUNet)
    total, trainable = count_params(abstract_params(model, (32, 32, 3)))
    assert total == trainable == 35_746_307
    assert expected_param_count(128, (1, 2, 2, 2), 2, (16,), 32, 3) == 35_746_307


@pytest.mark.parametrize("settings, shape", [
    (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,)), (28, 28, 1)),
    (dict(ch=16, ch_mult=(1, 3), num_res_blocks=2, attn_resolutions=(8, 4)), (8, 8, 3)),
    (dict(ch=8, ch_mult=(2, 1, 2), num_res_blocks=3, attn_resolutions=()), (12, 16, 1)),
])
def test_param_count_formula(settings, shape):
    model = make_ddpm_unet(image_shape=shape, dropout=0.0, num_groups=8 if settings["ch"] % 8 == 0 else 4, **settings)
    got, _ = count_params(abstract_params(model, shape))
    assert got == expected_param_count(settings["ch"], settings["ch_mult"], settings["num_res_blocks"],
                                       settings["attn_resolutions"], shape[0], shape[2])


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape, ch_mult, attn", [((28, 28, 1), (1, 2, 2), (14,)), ((32, 32, 3), (1, 2, 2, 2), (16,))])
def test_output_shape(shape, ch_mult, attn):
    model = make_ddpm_unet(image_shape=shape, ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn,
                           dropout=0.1, num_groups=4)
    x = jax.random.normal(KEY, (2,) + shape)
    t = jnp.array([1.0, 700.0])
    params = random_params(model, shape)
    names = set(params)
    assert {"down_1_attn_0", "mid_attn_1", "up_1_attn_0"} <= names and "down_0_attn_0" not in names
    y = jax.jit(model.apply)({"params": params}, x, t)
    assert y.shape == x.shape and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))


# --------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def tiny_unet():
    model = make_ddpm_unet(image_shape=(8, 8, 1), **TINY)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    t = jnp.array([1.0, 5.0, 12.0, 20.0])
    params = random_params(model, (8, 8, 1))
    return model, params, x, t


def test_dropout_only_in_train_mode(tiny_unet):
    model, params, x, t = tiny_unet
    apply = jax.jit(model.apply, static_argnames="train")
    v = {"params": params}
    a = apply(v, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(7)})
    b = apply(v, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(8)})
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3  # two dropout keys, two outputs
    e1, e2 = apply(v, x, t), apply(v, x, t)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))  # evaluation is deterministic
    no_dropout = model.clone(dropout=0.0)
    z = jax.jit(no_dropout.apply, static_argnames="train")(v, x, t, train=True)
    np.testing.assert_allclose(np.asarray(z), np.asarray(e1), rtol=0, atol=1e-6)  # eval == train without dropout
    assert float(jnp.max(jnp.abs(a - e1))) > 1e-3


def test_model_fn_dropout_is_per_example(tiny_unet):
    """With one dropout key per example, an example's output does not depend on the rest of the
    batch (so not on how a batch is split over devices); without a key the network is the
    deterministic one, and a ScoreNet ignores the key."""
    model, params, x, t = tiny_unet
    assert takes_train(model.apply) and not takes_train(ScoreNet().apply)
    keys = rng.per_example_keys(jax.random.PRNGKey(9), jnp.arange(4))
    whole = jax.jit(lambda x, t, k: make_model_fn(model.apply, params, dropout_key=k)(x, t))
    full, half = whole(x, t, keys), whole(x[2:], t[2:], keys[2:])
    np.testing.assert_allclose(np.asarray(full[2:]), np.asarray(half), rtol=1e-5, atol=2e-5)
    det = jax.jit(make_model_fn(model.apply, params))(x, t)
    assert float(jnp.max(jnp.abs(full - det))) > 1e-3
    np.testing.assert_allclose(np.asarray(det), np.asarray(jax.jit(model.apply)({"params": params}, x, t)), atol=1e-6)


def test_train_step_uses_dropout_and_eval_step_does_not(tiny_unet):
    """The training step's loss is the loss of the network in training mode with dropout keys
    fold_in(fold_in(fold_in(rng, step), DROPOUT_STREAM), example); the evaluation step's is the
    deterministic network's (keys chosen so that both steps draw the same t and noise)."""
    model, params, x, t = tiny_unet
    loss_fn = objectives.get_objective("eps", weighting="simple", reduction="mean")
    schedule = tiny_schedule()
    tx = make_optimizer(tiny_config("eps").optim, steps_per_epoch=3, params=params)
    cfg = StepConfig(model.apply, loss_fn, tx, 0.999, "index")
    state = create_train_state(params, tx, jax.random.PRNGKey(4))
    step_key = jax.random.fold_in(state.rng, state.step)
    keys = rng.per_example_keys(step_key, jnp.arange(4))
    dropout_keys = rng.per_example_keys(jax.random.fold_in(step_key, DROPOUT_STREAM), jnp.arange(4))

    _, metrics = jax.jit(lambda s, b: train_step(cfg, s, schedule, b))(state, x)
    ev = jax.jit(lambda p, b: eval_step(cfg, p, schedule, b, jnp.ones(4), step_key, jnp.arange(4)))(params, x)
    loss = jax.jit(lambda p, b, dk: loss_fn(make_model_fn(model.apply, p, dropout_key=dk), schedule, b, keys))
    with_dropout, _ = loss(params, x, dropout_keys)
    deterministic, aux = loss(params, x, None)
    np.testing.assert_allclose(float(metrics["loss"]), float(with_dropout), rtol=1e-5)
    assert abs(float(with_dropout) - float(deterministic)) > 1e-3 * abs(float(deterministic))
    np.testing.assert_allclose(float(ev["loss_sum"]), float(jnp.sum(aux["per_example"])), rtol=1e-5)


def tiny_schedule():
    from ddpm_jax.schedules import make_schedule

    return make_schedule("linear", 20, beta_start=1e-4, beta_end=0.2)


# --------------------------------------------------------------------------- training


def unet_config(objective):
    overrides = {f"model.{k}": v for k, v in TINY.items()}
    return tiny_config(objective, **{"model.name": "unet", "model.rho_head": False, "data.scale": "[-1,1]",
                                     "train.num_steps": 3, "train.eval_every_epochs": 0,
                                     "train.sample_every_epochs": 0, **overrides})


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "mean", "xprev"])
def test_train_and_evaluate_with_the_unet(objective, tmp_path, monkeypatch):
    """Real steps through the trainer (data, step, evaluation, checkpoint, sample grid)."""
    from ddpm_jax import trainer

    out = trainer.train_and_evaluate(unet_config(objective), str(tmp_path), arrays=ARRAYS, progress=False)
    assert out["step"] == 3 and out["stopped_by"] is None
    assert np.isfinite(out["train_loss"]) and np.isfinite(out["val_loss"]) and np.isfinite(out["val_loss_ema"])
    assert (tmp_path / "samples" / "final.png").exists()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("shape, kw, fragment", [
    ((30, 30, 1), dict(ch_mult=(1, 2, 2, 2)), "H=30 is not divisible by 2^(len(ch_mult)-1) = 8"),
    ((28, 20, 1), dict(ch_mult=(1, 2, 2, 2)), "H=28 is not divisible"),
    ((32, 36, 3), dict(ch_mult=(1, 2, 2, 2)), "W=36 is not divisible"),
    ((28, 28, 1), dict(num_groups=3), "not divisible by num_groups=3"),
    ((28, 28, 1), dict(ch=2), "ch must be an integer >= 4"),
    ((28, 28, 1), dict(ch_mult=()), "ch_mult must be a non-empty"),
    ((28, 28, 1), dict(dropout=1.0), "dropout must be a rate in [0, 1)"),
])
def test_bad_sizes_and_settings_raise_one_line(shape, kw, fragment):
    settings = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4)
    settings.update(kw)
    with pytest.raises(ValueError) as e:
        make_ddpm_unet(image_shape=shape, **settings)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_image_size_is_refused_at_init_too():
    model = DDPMUNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4)
    with pytest.raises(ValueError, match="W=9 is not divisible"):
        abstract_params(model, (8, 9, 1))


def test_config_selects_the_family():
    old = mnist.get_config().model.to_dict()
    old.pop("name", None)  # a config saved before model.name existed
    assert isinstance(model_from_config(old, (28, 28, 1)), ScoreNet)
    assert describe_model(old) == "ScoreNet preset=small rho_head=False"
    assert describe_model(cifar10.get_config().model) == (
        "DDPMUNet ch=128 ch_mult=(1, 2, 2, 2) num_res_blocks=2 attn_resolutions=(16,) dropout=0.1 num_groups=32")
    unet = dict(old, name="unet", **TINY)
    assert isinstance(model_from_config(unet, (8, 8, 1)), DDPMUNet)
    with pytest.raises(ValueError, match="rho_head"):
        model_from_config(dict(unet, rho_head=True), (8, 8, 1))
    with pytest.raises(ValueError, match="unknown model.name 'resnet'"):
        model_from_config(dict(old, name="resnet"), (8, 8, 1))


def _set(config, dotted, value):
    node = config
    *path, last = dotted.split(".")
    for p in path:
        node = node[p]
    if last in node:
        del node[last]  # then set anew: ConfigDict would refuse a value of another type
    if value is not _DELETE:
        node[last] = value


_DELETE = object()


def test_configs_validate():
    for c in (cifar10.get_config(), mnist_unet.get_config(), mnist.get_config(), unet_config("mean")):
        validate_config(c)
    old = mnist.get_config()  # as saved before model.name and data.random_flip existed
    for section, key in (("model", "name"), ("data", "random_flip")):
        if key in old[section]:
            del old[section][key]
    validate_config(old)


@pytest.mark.parametrize("key, value, fragment", [
    ("model.name", "resnet", "config.model.name = 'resnet': must be one of ['scorenet', 'unet']"),
    ("model.ch", _DELETE, "config.model.ch is missing"),
    ("model.ch", 2, "config.model.ch = 2: must be >= 4"),
    ("model.ch_mult", (), "config.model.ch_mult = (): must be a non-empty sequence"),
    ("model.ch_mult", (1, 0), "config.model.ch_mult = (1, 0)"),
    ("model.attn_resolutions", ("16",), "config.model.attn_resolutions = ('16',): must be a sequence"),
    ("model.num_res_blocks", 0, "config.model.num_res_blocks = 0: must be >= 1"),
    ("model.dropout", 1.0, "config.model.dropout = 1.0"),
    ("model.num_groups", 3, "config.model: DDPMUNet: channel counts"),
    ("model.rho_head", True, "config.model.rho_head = True: the ρ-head is a ScoreNet option"),
    ("model.time_input", "seconds", "config.model.time_input"),
    ("data.random_flip", "yes", "config.data.random_flip = 'yes': must be True or False"),
])
def test_bad_unet_config_names_the_key(key, value, fragment):
    config = cifar10.get_config()
    _set(config, key, value)
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_scorenet_keys_still_required_for_scorenet():
    config = mnist.get_config()
    del config.model["preset"]
    with pytest.raises(ConfigError, match="config.model.preset is missing"):
        validate_config(config)
    config = cifar10.get_config()
    del config.model["name"]  # absent name: a ScoreNet config, whose keys are missing here
    with pytest.raises(ConfigError, match="config.model.preset is missing"):
        validate_config(config)


# --------------------------------------------------------------------------- random flips


def test_random_flips_are_deterministic_and_flip_about_half():
    n, gb = 64, 16
    images = np.arange(n * 3 * 5, dtype=np.float32).reshape(n, 3, 5, 1)
    labels = np.arange(n, dtype=np.int32)
    plain = data.BatchIterator(images, gb, seed=4)
    flipped = data.BatchIterator((images, labels), gb, seed=4, random_flip=True)
    again = data.BatchIterator((images, labels), gb, seed=4, start_step=7, random_flip=True)  # a resumed run
    halves = [data.BatchIterator(images, gb, seed=4, random_flip=True, process_index=i, process_count=2) for i in range(2)]
    fractions = []
    for step in range(60):
        imgs, labs = flipped.batch(step)
        ref = plain.batch(step)
        mask = data.flip_mask(4, step, gb)
        np.testing.assert_array_equal(imgs[mask], ref[mask][:, :, ::-1])
        np.testing.assert_array_equal(imgs[~mask], ref[~mask])
        np.testing.assert_array_equal(labs, labels[plain.local_indices(step)])  # labels are not flipped
        np.testing.assert_array_equal(imgs, again.batch(step)[0])
        np.testing.assert_array_equal(imgs, np.concatenate([h.batch(step) for h in halves]))
        fractions.append(mask.mean())
    assert not np.array_equal(data.flip_mask(4, 0, gb), data.flip_mask(4, 1, gb))
    assert not np.array_equal(data.flip_mask(4, 0, gb), data.flip_mask(5, 0, gb))
    # 960 fair coin flips: the fraction is 0.5 ± 0.016 (one standard error); allow 4 of them
    assert abs(np.mean(fractions) - 0.5) < 4 * math.sqrt(0.25 / (60 * gb))


# --------------------------------------------------------------------------- model summary


def _summary(*args):
    return subprocess.run([sys.executable, "-m", "experiments.model_summary", *args], capture_output=True, text=True,
                          cwd=REPO, env=cpu_env(), timeout=300)


def test_model_summary_ends_with_the_parameter_count():
    res = _summary("--config", "configs/mnist_unet.py", "--config.model.ch=8", "--config.model.num_groups=4")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    config = mnist_unet.get_config()
    config.model.ch, config.model.num_groups = 8, 4
    total, _ = count_params(abstract_params(model_from_config(config.model, (28, 28, 1)), (28, 28, 1)))
    assert lines[-1] == f"params: {total}"
    assert any(line.startswith("forward FLOPs per image: ") for line in lines)
    assert any(line.split()[0] == "mid_attn_1/q" for line in lines[2:-2])


def test_model_summary_bad_config_is_one_error_line():
    res = _summary("--config", "configs/mnist_unet.py", "--config.model.num_groups=5")
    assert res.returncode == 2 and res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config.model: DDPMUNet: channel counts"), res.stderr

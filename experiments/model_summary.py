"""The network of a config, summarised: ``python -m experiments.model_summary --config configs/cifar10.py``.

Prints one row per module (its path, parameter count and parameter shapes), the forward FLOPs
per image from XLA's cost analysis of the jitted ``apply`` at batch 1, and, as its last line,
``params: N`` (the total). Nothing is trained and no data is read: the parameters are abstract
(``jax.eval_shape``) and the forward pass is compiled, not run. The image shape comes from
``data.name`` (mnist-family 28×28×1, cifar10/cifar100/svhn_cropped 32×32×3) or ``--image_shape``.
Config overrides work as in ``experiments.train`` (``--config.model.ch=64``); a bad config is one
``error:`` line and exit code 2.
"""

import sys

from absl import app, flags

from experiments import cli
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/cifar10.py or configs/mnist.py.",
                                lock_config=True)
flags.DEFINE_string("image_shape", None, "H,W,C of the images; default: from config.data.name.")
flags.mark_flags_as_required(["config"])

#: (H, W, C) of the datasets the configs name.
IMAGE_SHAPES = {
    "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "kmnist": (28, 28, 1), "emnist": (28, 28, 1),
    "cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "svhn_cropped": (32, 32, 3),
}


def image_shape(config, flag_value):
    """``--image_shape`` parsed, else the shape of ``config.data.name`` (ValueError if unknown)."""
    if flag_value:
        try:
            shape = tuple(int(s) for s in flag_value.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"--image_shape={flag_value!r}: expected H,W,C, three positive integers")
        return shape
    name = config.data.name
    if name not in IMAGE_SHAPES:
        raise ValueError(f"no known image shape for data.name={name!r}; give --image_shape=H,W,C")
    return IMAGE_SHAPES[name]


def module_rows(params, prefix=""):
    """``[(module path, count, 'name shape, ...')]`` for every module holding parameters, in the
    order of their paths."""
    import math

    rows, own = [], []
    for name, value in params.items():
        if hasattr(value, "shape"):
            own.append((name, tuple(value.shape)))
        else:
            rows += module_rows(value, f"{prefix}{name}/")
    if own:
        count = sum(math.prod(s) for _, s in own)
        rows.insert(0, (prefix.rstrip("/") or "(top)", count, ", ".join(f"{n} {s}" for n, s in own)))
    return rows


def forward_flops(model, params, shape):
    """FLOPs of one forward pass at batch 1 (XLA's cost analysis of the compiled ``apply``)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    compiled = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def summarise(config, shape):
    """The summary's lines (the last one ``params: N``)."""
    import jax
    import jax.numpy as jnp

    from ddpm_jax.config import validate_config
    from ddpm_jax.models import count_params, describe_model, model_from_config

    validate_config(config)
    model = model_from_config(config.model, shape)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
    total, trainable = count_params(params)
    rows = module_rows(params)
    width = max(len("module"), *(len(r[0]) for r in rows))
    lines = [f"model: {describe_model(config.model)}; image {tuple(shape)}",
             f"{'module':<{width}}  {'params':>12}  shapes"]
    lines += [f"{path:<{width}}  {count:>12,}  {shapes}" for path, count, shapes in rows]
    flops = forward_flops(model, params, shape)
    lines.append(f"forward FLOPs per image: {flops / 1e9:.3f} G ({flops:,.0f}; XLA cost analysis, batch 1)")
    if trainable != total:
        lines.append(f"trainable: {trainable}")
    lines.append(f"params: {total}")
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        lines = summarise(FLAGS.config, image_shape(FLAGS.config, FLAGS.image_shape))
    except ValueError as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

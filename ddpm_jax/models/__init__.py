"""Networks: the source U-Net (``ScoreNet``) and helpers to build, count and label its params.

    model = make_model('small', image_shape=(28, 28, 1))
    params = model.init(key, jnp.zeros((1, 28, 28, 1)), jnp.ones((1,)))['params']
    model_fn = lambda x, t: model.apply({'params': params}, x, t)      # what losses/samplers take
    tx = optax.multi_transform({'net': optax.adam(1e-2), 'rho': optax.adam(0.2),
                                'frozen': optax.set_to_zero()}, param_labels(params))
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.group_norm import GroupNorm, GroupNormSwish
from ddpm_jax.models.scorenet import (
    MIN_IMAGE_SIZE,
    ConvTranspose,
    GaussianFourierFeatures,
    ScoreNet,
    check_config,
    check_image_shape,
    torch_uniform_init,
)

__all__ = [
    "PRESETS",
    "ScoreNet",
    "GaussianFourierFeatures",
    "ConvTranspose",
    "GroupNorm",
    "GroupNormSwish",
    "make_model",
    "count_params",
    "param_labels",
    "torch_uniform_init",
    "check_config",
    "check_image_shape",
    "MIN_IMAGE_SIZE",
    "TIME_INPUTS",
    "make_model_fn",
]

#: Channel widths of the source notebook's three sizes.
PRESETS = {
    "small": (8, 16, 32, 64),
    "medium": (32, 64, 128, 256),
    "large": (64, 128, 256, 512),
}


def make_model(preset_or_channels: Union[str, Sequence[int]], *, image_shape: Sequence[int],
               rho_head: bool = False, embed_dim: int = 256, num_groups: int = 4,
               fourier_scale: float = 30.0, dtype: Any = jnp.float32, conv_impl: str = "xla") -> ScoreNet:
    """Builds a ``ScoreNet`` from a preset name ('small' | 'medium' | 'large') or 4 widths.

    ``conv_impl`` picks how the strided, transposed and output convolutions are computed
    ('xla' | 'stride1' | 'phases', see :data:`ddpm_jax.models.scorenet.CONV_IMPLS`); parameters and
    results are the same.

    ``image_shape`` is ``(H, W, C)``; the output has ``C`` channels. The configuration is
    validated here (an abstract ``init`` via ``jax.eval_shape``: no FLOPs, no memory), so a bad
    preset, width, group count or image size raises ``ValueError`` before any training starts.
    """
    if isinstance(preset_or_channels, str):
        if preset_or_channels not in PRESETS:
            raise ValueError(f"unknown model preset {preset_or_channels!r}; "
                             f"choose one of {sorted(PRESETS)} or give 4 channel widths")
        channels = PRESETS[preset_or_channels]
    else:
        channels = tuple(preset_or_channels)
    check_config(channels, embed_dim, num_groups)
    check_image_shape(image_shape)
    model = ScoreNet(channels=tuple(int(c) for c in channels), embed_dim=embed_dim,
                     num_groups=num_groups, fourier_scale=fourier_scale, out_channels=None,
                     rho_head=rho_head, dtype=dtype, conv_impl=conv_impl)
    x = jax.ShapeDtypeStruct((1, *tuple(int(d) for d in image_shape)), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    return model


def _unwrap(params):
    """Accepts the ``params`` collection or a full variables dict ``{'params': ...}``."""
    if isinstance(params, dict) or hasattr(params, "keys"):
        keys = list(params.keys())
        if keys == ["params"]:
            return params["params"]
    return params


def _key_name(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _label(path) -> str:
    names = [_key_name(p) for p in path]
    if len(names) >= 2 and names[-2] == "time_features" and names[-1] == "W":
        return "frozen"
    if names and names[-1] in ("rho0", "rho1"):
        return "rho"
    return "net"


def param_labels(params):
    """Pytree of labels, same structure as ``params``, for ``optax.multi_transform``.

    ``'frozen'``: the fixed Fourier frequencies (``time_features/W``); ``'rho'``: the ρ-head
    scalars ``rho0``, ``rho1``; ``'net'``: everything else. Works on the ``params`` collection, a
    full ``{'params': ...}`` variables dict, or a larger tree containing a ScoreNet.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _label(path), params)


def count_params(params) -> Tuple[int, int]:
    """``(total, trainable)`` parameter counts; trainable excludes the frozen Fourier W.

    Accepts arrays or ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape(model.init,
    ...)``), and the ``params`` collection or a full ``{'params': ...}`` variables dict.
    """
    params = _unwrap(params)
    total = trainable = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        n = int(math.prod(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))
        total += n
        if _label(path) != "frozen":
            trainable += n
    return total, trainable


#: How the integer step t is fed to the network: 'index' passes t itself (the notebook),
#: 'fraction' passes t / T (so the Fourier features vary smoothly in t).
TIME_INPUTS = ("index", "fraction")


def make_model_fn(apply_fn, params, *, time_input: str = "index", num_steps: int = 1):
    """The ``model_fn(x_t, t) -> prediction`` that losses and samplers take.

    Args:
      apply_fn: e.g. ``model.apply``.
      params: the ``params`` collection.
      time_input: see :data:`TIME_INPUTS`.
      num_steps: T (used by 'fraction').

    Returns: ``model_fn(x (B, H, W, C), t (B,) int) -> (B, H, W, C)``.
    """
    if time_input not in TIME_INPUTS:
        raise ValueError(f"unknown time_input {time_input!r}; expected one of {TIME_INPUTS}")
    scale = 1.0 / num_steps if time_input == "fraction" else 1.0

    def model_fn(x, t):
        return apply_fn({"params": params}, x, jnp.asarray(t, jnp.float32) * scale)

    return model_fn

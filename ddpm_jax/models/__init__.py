"""Networks: the source U-Net (``ScoreNet``, ``models/scorenet.py``) and the U-Net of Ho et al.
(``DDPMUNet``, ``models/ddpm_unet.py``), and helpers to build, count and label their params.

    model = model_from_config(config.model, image_shape=(28, 28, 1))   # either family, by model.name
    model = make_model('small', image_shape=(28, 28, 1))               # a ScoreNet preset
    params = model.init(key, jnp.zeros((1, 28, 28, 1)), jnp.ones((1,)))['params']
    model_fn = lambda x, t: model.apply({'params': params}, x, t)      # what losses/samplers take
    tx = optax.multi_transform({'net': optax.adam(1e-2), 'rho': optax.adam(0.2),
                                'frozen': optax.set_to_zero()}, param_labels(params))
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ddpm_jax.models.ddpm_unet import DDPMUNet, check_unet_config, check_unet_image_shape
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
    "DDPMUNet",
    "MODEL_NAMES",
    "model_from_config",
    "describe_model",
    "make_ddpm_unet",
    "takes_train",
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
               fourier_scale: float = 30.0, dtype: Any = jnp.float32, conv_impl: str = "xla",
               fused_norm: bool = True, num_classes: int = 0) -> ScoreNet:
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
                     rho_head=rho_head, dtype=dtype, conv_impl=conv_impl, fused_norm=fused_norm,
                     num_classes=int(num_classes))
    x = jax.ShapeDtypeStruct((1, *tuple(int(d) for d in image_shape)), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    return model


def _as_tuple(v) -> Tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else v


def make_ddpm_unet(*, image_shape: Sequence[int], ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                   num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                   num_groups: int = 32, dtype: Any = jnp.float32, num_classes: int = 0) -> DDPMUNet:
    """Builds a ``DDPMUNet`` (Ho et al. 2020) for images of shape ``image_shape = (H, W, C)``; the
    output has ``C`` channels. The defaults are the paper's CIFAR-10 network (35,746,307 params at
    32×32×3); ``dtype`` is the compute dtype (params stay float32). Validated like :func:`make_model`
    (an abstract ``init`` via ``jax.eval_shape``), so
    bad settings or an image size the levels do not divide raise ``ValueError`` before any compile.
    """
    ch_mult, attn_resolutions = _as_tuple(ch_mult), _as_tuple(attn_resolutions)
    check_unet_config(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_groups)
    check_unet_image_shape(image_shape, ch_mult)
    model = DDPMUNet(ch=int(ch), ch_mult=tuple(int(m) for m in ch_mult), num_res_blocks=int(num_res_blocks),
                     attn_resolutions=tuple(int(r) for r in attn_resolutions), dropout=float(dropout),
                     num_groups=int(num_groups), dtype=dtype, num_classes=int(num_classes))
    x = jax.ShapeDtypeStruct((1, *tuple(int(d) for d in image_shape)), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    return model


#: Network families, chosen by ``config.model.name`` (absent: 'scorenet', as in runs saved before
#: the key existed).
MODEL_NAMES = ("scorenet", "unet")


def model_name(model_config) -> str:
    """``model_config['name']``, or 'scorenet' where the key is absent."""
    return model_config.get("name", "scorenet")


def model_from_config(model_config, image_shape: Sequence[int], profile=None):
    """The network that a config's ``model`` section describes, for images ``(H, W, C)``.

    ``name`` 'scorenet' (or absent): :func:`make_model` with ``preset``, ``rho_head``,
    ``embed_dim``, ``num_groups``, ``fourier_scale``, ``conv_impl`` ('auto' or absent: the
    platform profile's, ``ddpm_jax.platform_profile``), and the profile's choice of fused or stock
    GroupNorm. 'unet': :func:`make_ddpm_unet` with ``ch``, ``ch_mult``, ``num_res_blocks``,
    ``attn_resolutions``, ``dropout``, ``num_groups`` (stock layers on every platform). Either
    family computes in ``dtype`` ('float32', absent, or 'bfloat16'; params stay float32) and is
    class-conditional with ``num_classes`` > 0 (absent: 0, unconditional). ``profile``:
    a :class:`ddpm_jax.platform_profile.Profile` (default: this process's). Validated before
    anything is compiled: ``ValueError``, one line.
    """
    from ddpm_jax import platform_profile

    profile = profile or platform_profile.current()
    conv_impl = model_config.get("conv_impl", "auto")
    dtype = jnp.dtype(model_config.get("dtype", "float32"))
    num_classes = model_config.get("num_classes", 0)
    conv_impl = profile.conv_impl if conv_impl == "auto" else conv_impl
    name = model_name(model_config)
    m = model_config
    if name == "scorenet":
        return make_model(m["preset"], image_shape=image_shape, rho_head=m["rho_head"], embed_dim=m["embed_dim"],
                          num_groups=m["num_groups"], fourier_scale=m["fourier_scale"],
                          conv_impl=conv_impl, fused_norm=profile.fused_group_norm, dtype=dtype, num_classes=num_classes)
    if name == "unet":
        if m.get("rho_head", False):
            raise ValueError("model.rho_head = True: the ρ-head is a ScoreNet option (model.name='scorenet')")
        return make_ddpm_unet(image_shape=image_shape, ch=m["ch"], ch_mult=m["ch_mult"],
                              num_res_blocks=m["num_res_blocks"], attn_resolutions=m["attn_resolutions"],
                              dropout=m["dropout"], num_groups=m["num_groups"], dtype=dtype, num_classes=num_classes)
    raise ValueError(f"unknown model.name {name!r}; choose one of {list(MODEL_NAMES)}")


def describe_model(model_config) -> str:
    """One line naming the network and its settings, for logs, e.g. ``ScoreNet preset=small
    rho_head=False`` or ``DDPMUNet ch=128 ch_mult=(1, 2, 2, 2) num_res_blocks=2
    attn_resolutions=(16,) dropout=0.1 num_groups=32``."""
    m = model_config
    k = m.get("num_classes", 0)
    return _describe(m) + (f" num_classes={k}" if k else "")


def _describe(m) -> str:
    if model_name(m) == "unet":
        return (f"DDPMUNet ch={m['ch']} ch_mult={tuple(m['ch_mult'])} num_res_blocks={m['num_res_blocks']} "
                f"attn_resolutions={tuple(m['attn_resolutions'])} dropout={m['dropout']} num_groups={m['num_groups']}")
    return f"ScoreNet preset={m['preset']} rho_head={m['rho_head']}"


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
#: 'fraction' passes t / T (so the Fourier features vary smoothly in t), 'index_from_zero' passes
#: t − 1 (networks trained with the steps counted 0..T−1, as the DDPM paper's code and diffusers
#: count them: the checkpoints that :mod:`ddpm_jax.pretrained` imports).
TIME_INPUTS = ("index", "fraction", "index_from_zero")


def takes_train(apply_fn) -> bool:
    """True if ``apply_fn`` is a Flax module's ``apply`` whose ``__call__`` has a ``train``
    argument (``DDPMUNet``; not ``ScoreNet``): the network has a training mode (dropout)."""
    module = getattr(apply_fn, "__self__", None)
    if not isinstance(module, nn.Module):
        return False
    return "train" in inspect.signature(type(module).__call__).parameters


def make_model_fn(apply_fn, params, *, time_input: str = "index", num_steps: int = 1, dropout_key=None):
    """The ``model_fn(x_t, t) -> prediction`` that losses and samplers take.

    Args:
      apply_fn: e.g. ``model.apply``.
      params: the ``params`` collection.
      time_input: see :data:`TIME_INPUTS`.
      num_steps: T (used by 'fraction').
      dropout_key: None (default): the deterministic network (evaluation, sampling). Otherwise
        the network in training mode (``train=True``) with its dropout drawn from this key: one
        key, or one key per example (``(B, 2)`` raw or ``(B,)`` typed, as
        :func:`ddpm_jax.rng.per_example_keys` gives), with which each example's dropout comes
        from its own key, so it does not depend on how a batch is split over devices. Ignored
        for a network without a training mode (:func:`takes_train` false: ``ScoreNet``).

    Returns: ``model_fn(x (B, H, W, C), t (B,) int, y=None) -> (B, H, W, C)``; ``y`` ``(B,)`` int
    labels for a class-conditional network (−1: no class, :mod:`ddpm_jax.guidance`).
    """
    if time_input not in TIME_INPUTS:
        raise ValueError(f"unknown time_input {time_input!r}; expected one of {TIME_INPUTS}")
    scale = 1.0 / num_steps if time_input == "fraction" else 1.0
    shift = 1.0 if time_input == "index_from_zero" else 0.0  # the network sees (t − shift) · scale
    variables = {"params": params}

    def labels(y):  # unconditional networks are called as before, without the argument
        return {} if y is None else {"y": y}

    if dropout_key is None or not takes_train(apply_fn):
        def model_fn(x, t, y=None):
            return apply_fn(variables, x, (jnp.asarray(t, jnp.float32) - shift) * scale, **labels(y))
        return model_fn

    from ddpm_jax import rng  # noqa: PLC0415  (ddpm_jax.rng imports nothing of this package)

    def one(x, t, key, y):
        return apply_fn(variables, x, t, train=True, rngs={"dropout": key}, **labels(y))

    def model_fn(x, t, y=None):
        t = jnp.broadcast_to((jnp.asarray(t, jnp.float32) - shift) * scale, x.shape[:1])
        if not rng.is_key_batch(dropout_key):
            return one(x, t, dropout_key, y)
        # each example on its own, with its own key (vmap batches the network back together)
        # (y = None is an empty pytree to vmap: it stays None inside)
        return jax.vmap(lambda xi, ti, ki, yi: one(xi[None], ti[None], ki, None if yi is None else yi[None])[0])(
            x, t, dropout_key, y)

    return model_fn

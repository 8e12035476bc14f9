"""The DDPM paper's released checkpoints (the diffusers layout) as ordinary runs of this codebase.

    folder = locate("ddpm-ema-cifar10-32")                 # config.json, weights, scheduler_config.json
    imported = load_pretrained(folder, base_config)         # config + DDPMUNet params, every check done
    save_as_run(imported, "runs/ddpm_cifar10")              # config.json + checkpoints/0/, as the trainer writes

A released model is a folder holding a ``UNet2DModel`` (``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``) and a ``DDPMScheduler``
(``scheduler_config.json``), either side by side at the folder's root or in ``unet/`` and
``scheduler/`` sub-folders. The network becomes a :class:`ddpm_jax.models.DDPMUNet`
(``model.name='unet'``: ``ch = block_out_channels[0]``, ``ch_mult = block_out_channels / ch``,
``num_res_blocks = layers_per_block``, attention at the heights of the levels whose blocks are
``Attn*Block2D``), the scheduler the config's ``schedule``, ``objective.name`` and ``sampling``
(``eps_ddpm``, σ_t² = β_t for ``fixed_large`` and β̃_t for ``fixed_small``, x̂_0 clipped to [−1, 1]
when ``clip_sample``). A configuration that ``DDPMUNet`` cannot compute exactly is refused with one
line naming its key.

Every difference between the two layouts is converted in this module and nowhere else:

1. **Time index.** diffusers and the paper's code count the steps 0..T−1; this codebase counts
   1..T (``docs/conventions.md``). The imported network is fed t − 1 for this codebase's t through
   ``model.time_input = 'index_from_zero'`` (:data:`ddpm_jax.models.TIME_INPUTS`), so training,
   fine-tuning and every sampler see the same network. Schedules need no shift: diffusers'
   ``betas[k]`` is β_{k+1} here, and the schedule is rebuilt from its recipe (:func:`process_settings`).
2. **Sinusoid.** diffusers' ``Timesteps(ch, flip_sin_to_cos=False, freq_shift=1)`` is
   ``[sin(t·f_j), cos(t·f_j)]`` with ``f_j = exp(−ln(10⁴)·j/(ch/2 − 1))``, exactly
   :func:`ddpm_jax.models.ddpm_unet.timestep_embedding`; other settings are refused.
3. **Padding.** diffusers' stride-2 downsampling convolution with ``downsample_padding=0`` pads
   (0, 1) on each spatial axis by hand and then convolves without padding: that is TensorFlow's
   'SAME' on even sizes, which ``DDPMUNet`` uses. ``downsample_padding=1`` (symmetric) is refused.
4. **Attention names.** Attention layers are ``nn.Linear`` stored under the current names
   (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) or the legacy ones (``query``, ``key``, ``value``,
   ``proj_attn``; :func:`current_names`); a legacy 1×1-convolution shape ``(C, C, 1, 1)`` is accepted.
5. **Block order.** ``down_blocks[i]`` is level i (``down_{i}_*``); ``up_blocks[k]`` is level
   L − 1 − k (``up_{L-1-k}_*``): diffusers numbers the up path from the bottom (:func:`torch_name`).
6. **Tensor layouts.** PyTorch convolutions are OIHW, Flax's HWIO; ``nn.Linear`` is ``(out, in)``,
   ``nn.Dense`` ``(in, out)``; GroupNorm's ``weight`` is Flax's ``scale`` (:func:`to_flax`).

Weights are read without executing pickled code and without PyTorch: ``.safetensors`` through the
``safetensors`` package's NumPy API, ``.bin`` through the project's restricted reader of PyTorch's
format (:mod:`ddpm_jax.torch_checkpoint`). This module imports neither PyTorch nor diffusers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "PretrainedError", "Folder", "UNetLayout", "Imported", "locate", "network_settings", "process_settings",
    "config_from_diffusers", "read_tensors", "current_names", "torch_name", "to_flax", "params_from_state_dict",
    "load_pretrained", "check_new_workdir", "initial_state", "save_as_run", "recipe_overrides", "is_ema_folder",
    "WEIGHT_FILES", "TIME_INPUT",
]

#: The weight files of a diffusers model folder, in order of preference.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: How an imported network is fed the step: t − 1 (difference 1 of the module docstring).
TIME_INPUT = "index_from_zero"

_UNET_CLASS = "UNet2DModel"
_SCHEDULER_CLASS = "DDPMScheduler"


class PretrainedError(ValueError):
    """A folder that cannot be imported; the message is one line naming the file and the key or tensor."""


# ------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Folder:
    """A located model folder: ``path`` as given (absolute), the UNet's directory, its config and
    weight file (``weights`` None when absent), and the scheduler's config file and contents."""

    path: str
    unet_dir: str
    unet_config: Dict[str, Any]
    weights: Optional[str]
    scheduler_path: str
    scheduler_config: Dict[str, Any]


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{path} does not hold a JSON object")
    return value


def locate(source: str) -> Folder:
    """Finds the UNet and the scheduler of a diffusers model folder ``source``: ``config.json``
    with ``_class_name`` 'UNet2DModel' at the root or in ``unet/``, ``scheduler_config.json`` at the
    root or in ``scheduler/``, and the weights (:data:`WEIGHT_FILES`; ``.safetensors`` preferred).

    Raises:
      PretrainedError: not a directory, no UNet2DModel, no scheduler (one line each).
    """
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.isdir(path):
        raise PretrainedError(f"--source {path} is not a directory")
    unet_dir = os.path.join(path, "unet") if os.path.isfile(os.path.join(path, "unet", "config.json")) else path
    config_path = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(config_path):
        raise PretrainedError(f"{path} is not a diffusers UNet2DModel folder: no config.json in it or in unet/")
    unet_config = _read_json(config_path)
    cls = unet_config.get("_class_name")
    if cls != _UNET_CLASS:
        raise PretrainedError(f"{config_path} describes {cls!r}, not a {_UNET_CLASS}: only the DDPM U-Net is imported")
    scheduler_path = next((p for p in (os.path.join(path, "scheduler", "scheduler_config.json"),
                                       os.path.join(path, "scheduler_config.json")) if os.path.isfile(p)), None)
    if scheduler_path is None:
        raise PretrainedError(f"{path} has no scheduler_config.json (at its root or in scheduler/): the noise "
                              "schedule the network was trained with is unknown")
    weights = next((os.path.join(unet_dir, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(unet_dir, n))), None)
    return Folder(path=path, unet_dir=unet_dir, unet_config=unet_config, weights=weights,
                  scheduler_path=scheduler_path, scheduler_config=_read_json(scheduler_path))


def is_ema_folder(path: str) -> bool:
    """Whether the folder's name marks EMA weights, as the paper's releases ``google/ddpm-ema-*``
    do: an 'ema' word in its name (for the Hugging Face cache's ``models--google--ddpm-ema-.../
    snapshots/<hash>``, in the model's name)."""
    path = os.path.abspath(path)
    names = [os.path.basename(path)]
    if os.path.basename(os.path.dirname(path)) == "snapshots":
        names.append(os.path.basename(os.path.dirname(os.path.dirname(path))))
    return any("ema" in re.split(r"[^a-z0-9]+", n.lower()) for n in names)


# ------------------------------------------------------------------------------------------------
# The configuration
# ------------------------------------------------------------------------------------------------

#: UNet2DModel's constructor defaults (diffusers 0.42): the value of a key absent from config.json.
_UNET_DEFAULTS: Dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}

#: Keys whose value must be exactly this for DDPMUNet to compute the same function, and why.
_UNET_FIXED: Dict[str, Tuple[Any, str]] = {
    "center_input_sample": (False, "the network takes x_t as it is"),
    "time_embedding_type": ("positional", "DDPMUNet embeds t with a sinusoid"),
    "flip_sin_to_cos": (False, "DDPMUNet's sinusoid is [sin, cos]"),
    "freq_shift": (1, "DDPMUNet's sinusoid has frequencies exp(-ln(1e4) j/(ch/2 - 1))"),
    "mid_block_type": ("UNetMidBlock2D", "DDPMUNet's middle is ResBlock, Attn, ResBlock"),
    "mid_block_scale_factor": (1, "DDPMUNet's residual blocks add without rescaling"),
    "downsample_padding": (0, "DDPMUNet downsamples with 'SAME' padding, (0, 1) on even sizes"),
    "downsample_type": ("conv", "DDPMUNet downsamples with a stride-2 convolution"),
    "upsample_type": ("conv", "DDPMUNet upsamples by nearest x2 and a convolution"),
    "norm_eps": (1e-6, "DDPMUNet's GroupNorm has epsilon 1e-6"),
    "resnet_time_scale_shift": ("default", "DDPMUNet adds the time embedding (no scale-shift)"),
    "add_attention": (True, "DDPMUNet's middle has attention"),
    "class_embed_type": (None, "only unconditional networks are imported"),
    "num_class_embeds": (None, "only unconditional networks are imported"),
}

_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """A UNet2DModel as DDPMUNet settings: ``image_shape`` (H, W, C) is the folder's
    ``sample_size`` and ``in_channels``; ``dropout`` is the folder's (used only in training)."""

    ch: int
    ch_mult: Tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: Tuple[int, ...]
    num_groups: int
    image_shape: Tuple[int, int, int]
    dropout: float


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def network_settings(unet_config: Dict[str, Any], where: str = "config.json") -> UNetLayout:
    """The :class:`UNetLayout` of a UNet2DModel ``config.json`` (absent keys take diffusers'
    defaults). ``where`` names the file in messages.

    Raises:
      PretrainedError: a key DDPMUNet cannot express, e.g. ``resnet_time_scale_shift='scale_shift'``,
        several attention heads, another block type, channel counts that are not ``ch·ch_mult``.
    """
    unknown = sorted(k for k in unet_config if not k.startswith("_") and k not in _UNET_DEFAULTS)
    if unknown:
        raise PretrainedError(f"{where}: key {unknown[0]!r} is not a UNet2DModel setting this import knows "
                              "(written by another diffusers version?); its effect on the network cannot be checked")
    c = {**_UNET_DEFAULTS, **unet_config}

    def refuse(key, why):
        raise PretrainedError(f"{where}: {key} = {json.dumps(c[key])} cannot be expressed by DDPMUNet: {why}")

    for key, (want, why) in _UNET_FIXED.items():
        if c[key] != want or type(c[key]) is bool and not isinstance(want, bool):
            refuse(key, f"{why} (needs {json.dumps(want)})")
    if c["act_fn"] not in ("silu", "swish"):
        refuse("act_fn", "DDPMUNet's activation is swish (silu)")

    boc = c["block_out_channels"]
    if not isinstance(boc, (list, tuple)) or not boc or not all(_is_int(b) and b > 0 for b in boc):
        refuse("block_out_channels", "needs a non-empty list of positive integers")
    ch = int(boc[0])
    if any(b % ch for b in boc):
        refuse("block_out_channels", f"DDPMUNet's level widths are ch * ch_mult with ch = the first, {ch}")
    ch_mult = tuple(int(b) // ch for b in boc)
    levels = len(boc)
    if c["time_embedding_dim"] not in (None, 4 * ch):
        refuse("time_embedding_dim", f"DDPMUNet's time embedding has 4 * ch = {4 * ch} features")
    if not _is_int(c["layers_per_block"]) or c["layers_per_block"] < 1:
        refuse("layers_per_block", "needs an integer >= 1")

    down, up = c["down_block_types"], c["up_block_types"]
    for key, types, known in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
        if not isinstance(types, (list, tuple)) or len(types) != levels:
            refuse(key, f"needs one block type per entry of block_out_channels ({levels})")
        bad = [b for b in types if b not in known]
        if bad:
            refuse(key, f"block type {bad[0]!r} is not one of {sorted(known)}")
    attn_levels = [i for i in range(levels) if _DOWN_TYPES[down[i]]]
    if attn_levels != [i for i in range(levels) if _UP_TYPES[up[levels - 1 - i]]]:
        refuse("up_block_types", "DDPMUNet has attention at the same levels on the way up as on the way down "
               "(up_block_types lists the levels from the bottom)")
    heads = c["attention_head_dim"]
    widths = [boc[i] for i in attn_levels] + [boc[-1]]  # the attention levels and the middle
    if heads is not None and (not _is_int(heads) or any(w != heads for w in widths)):
        refuse("attention_head_dim", f"DDPMUNet's attention has one head (attention_head_dim null, or the width of "
               f"every attention layer: {sorted(set(widths))})")
    groups = c["norm_num_groups"]
    if not _is_int(groups) or groups < 1:
        refuse("norm_num_groups", "needs an integer >= 1")
    if c["attn_norm_num_groups"] not in (None, groups):
        refuse("attn_norm_num_groups", f"DDPMUNet's attention normalises with norm_num_groups = {groups} groups")
    if c["in_channels"] != c["out_channels"] or not _is_int(c["in_channels"]) or c["in_channels"] < 1:
        refuse("out_channels", f"DDPMUNet predicts as many channels as it takes (in_channels = {c['in_channels']})")
    size = c["sample_size"]
    size = (size, size) if _is_int(size) else size
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(s) and s > 0 for s in size):
        refuse("sample_size", "needs the image size (an integer, or [height, width])")
    image_shape = (int(size[0]), int(size[1]), int(c["in_channels"]))
    dropout = c["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        refuse("dropout", "needs a rate in [0, 1)")

    from ddpm_jax.models.ddpm_unet import check_unet_config, check_unet_image_shape  # noqa: PLC0415 (flax)

    attn_resolutions = tuple(image_shape[0] // 2 ** i for i in attn_levels)
    try:
        check_unet_config(ch, ch_mult, int(c["layers_per_block"]), attn_resolutions, float(dropout), int(groups))
        check_unet_image_shape(image_shape, ch_mult)
    except ValueError as e:
        raise PretrainedError(f"{where}: {e}") from None
    return UNetLayout(ch=ch, ch_mult=ch_mult, num_res_blocks=int(c["layers_per_block"]),
                      attn_resolutions=attn_resolutions, num_groups=int(groups), image_shape=image_shape,
                      dropout=float(dropout))


#: DDPMScheduler's constructor defaults (diffusers 0.42) for the keys that shape the process.
_SCHEDULER_DEFAULTS: Dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
}
#: diffusers' beta_schedule -> this codebase's schedule of the same β_t (ddpm_jax.schedules).
_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}
#: variance_type -> sampling.ddpm_variance (the *_log variants are the same variances, kept in log space).
_VARIANCES = {"fixed_large": "beta", "fixed_large_log": "beta", "fixed_small": "posterior",
              "fixed_small_log": "posterior"}
#: prediction_type -> objective.name (what the network predicts; ddpm_jax.objectives.PREDICTS).
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def process_settings(scheduler_config: Dict[str, Any], where: str = "scheduler_config.json") -> Dict[str, Any]:
    """The diffusion process of a DDPMScheduler config as this codebase's config entries:
    ``{'schedule': {name, num_steps[, beta_start, beta_end]}, 'objective': name, 'ddpm_variance':
    'beta' | 'posterior', 'clip_x0': bool}``. T = ``num_train_timesteps``; diffusers' β_k
    (k = 0..T−1) is β_{k+1} here (the same array, indexed from 1).

    Raises:
      PretrainedError: another scheduler class, trained betas, thresholding, a learned variance, a
        clip range other than the data's [−1, 1], or a schedule with no counterpart here.
    """
    cls = scheduler_config.get("_class_name", _SCHEDULER_CLASS)
    if cls != _SCHEDULER_CLASS:
        raise PretrainedError(f"{where} describes {cls!r}, not a {_SCHEDULER_CLASS}")
    c = {**_SCHEDULER_DEFAULTS, **scheduler_config}

    def refuse(key, why):
        raise PretrainedError(f"{where}: {key} = {json.dumps(c[key])} cannot be expressed here: {why}")

    T = c["num_train_timesteps"]
    if not _is_int(T) or T < 2:
        refuse("num_train_timesteps", "needs an integer T >= 2")
    if c["trained_betas"] is not None:
        refuse("trained_betas", "give the schedule by beta_schedule")
    if c["rescale_betas_zero_snr"]:
        refuse("rescale_betas_zero_snr", "the schedules here are the published ones, unrescaled")
    name = _SCHEDULES.get(c["beta_schedule"])
    if name is None:
        refuse("beta_schedule", f"needs one of {sorted(_SCHEDULES)}")
    schedule: Dict[str, Any] = {"name": name, "num_steps": int(T)}
    if name in ("linear", "quadratic"):
        schedule.update(beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]))
    if c["variance_type"] not in _VARIANCES:
        refuse("variance_type", f"the reverse variance must be fixed: one of {sorted(_VARIANCES)}")
    if c["prediction_type"] not in _PREDICTIONS:
        refuse("prediction_type", f"needs one of {sorted(_PREDICTIONS)}")
    if c["thresholding"]:
        refuse("thresholding", "the samplers here clip x̂_0 to the data range (clip_sample) instead")
    if not isinstance(c["clip_sample"], bool):
        refuse("clip_sample", "needs true or false")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        refuse("clip_sample_range", "x̂_0 is clipped to the data range [-1, 1]")
    from ddpm_jax import schedules  # noqa: PLC0415

    try:
        schedules.make_schedule(name, int(T), **{k: v for k, v in schedule.items() if k not in ("name", "num_steps")})
    except ValueError as e:
        raise PretrainedError(f"{where}: {e}") from None
    return {"schedule": schedule, "objective": _PREDICTIONS[c["prediction_type"]],
            "ddpm_variance": _VARIANCES[c["variance_type"]], "clip_x0": bool(c["clip_sample"])}


def config_from_diffusers(unet_config: Dict[str, Any], scheduler_config: Dict[str, Any], base, *,
                          unet_where: str = "config.json", scheduler_where: str = "scheduler_config.json"):
    """A training config for the imported network: ``base`` (a recipe such as ``configs/cifar10.py``'s,
    which supplies the data, optimiser, training and checkpoint keys; not modified) with the keys the
    folder decides replaced:

    - ``model``: ``name='unet'``, ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
      ``num_groups`` from :func:`network_settings`, ``time_input='index_from_zero'``,
      ``num_classes=0``; ``dropout`` (training only) and ``dtype`` stay the recipe's when it is a
      'unet' recipe, else the folder's dropout and float32;
    - ``schedule`` (:func:`process_settings`), ``objective.name`` (what the network predicts);
    - ``data.scale='[-1,1]'`` (the range diffusers' DDPM models take);
    - ``sampling``: the paper's ancestral sampler, ``method='eps_ddpm'`` with the folder's
      ``ddpm_variance`` and ``clip_x0``, every step (``num_steps=0``).

    Returns a ``ml_collections.ConfigDict``. Raises :class:`PretrainedError` (one line).
    """
    import ml_collections  # noqa: PLC0415

    layout = network_settings(unet_config, unet_where)
    process = process_settings(scheduler_config, scheduler_where)
    config = ml_collections.ConfigDict(base.to_dict() if hasattr(base, "to_dict") else copy.deepcopy(dict(base)))
    old_model = config.model.to_dict() if "model" in config else {}
    unet_recipe = old_model.get("name") == "unet"
    model = {"name": "unet", "ch": layout.ch, "ch_mult": layout.ch_mult, "num_res_blocks": layout.num_res_blocks,
             "attn_resolutions": layout.attn_resolutions,
             "dropout": float(old_model["dropout"]) if unet_recipe and "dropout" in old_model else layout.dropout,
             "num_groups": layout.num_groups, "time_input": TIME_INPUT,
             "dtype": old_model.get("dtype", "float32") if unet_recipe else "float32", "num_classes": 0}
    config.model = ml_collections.ConfigDict(model)
    schedule = config.schedule.to_dict() if "schedule" in config else {}
    # keys of the recipe's schedule that this schedule does not take stay (schedule_from_config ignores them)
    schedule.update(process["schedule"])
    config.schedule = ml_collections.ConfigDict(schedule)
    config.objective.name = process["objective"]
    config.data.scale = "[-1,1]"
    s = config.sampling
    s.method, s.ddpm_variance, s.clip_x0 = "eps_ddpm", process["ddpm_variance"], process["clip_x0"]
    for key, value in (("num_steps", 0), ("eta", 0.0), ("grid", ""), ("guidance", 0.0)):
        if key in s:
            s[key] = value
    return config


# ------------------------------------------------------------------------------------------------
# The tensors
# ------------------------------------------------------------------------------------------------


def read_tensors(path: str) -> Dict[str, np.ndarray]:
    """The tensors of a weight file as float32 NumPy arrays, in the file's order. ``.safetensors``:
    the ``safetensors`` package's NumPy API; ``.bin``: :func:`ddpm_jax.torch_checkpoint.load_state_dict`,
    which reads PyTorch's format without PyTorch and without executing its pickle.

    Raises:
      PretrainedError: a truncated or damaged file; a pickle that names anything but the
        tensor-rebuild functions; not a flat mapping of names to tensors.
    """
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file  # noqa: PLC0415

            state = load_file(path)
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError, an unsupported dtype)
            raise PretrainedError(f"cannot read {path}: {_first_line(e)} (truncated or damaged? download it again)") from None
    else:
        from ddpm_jax import torch_checkpoint  # noqa: PLC0415

        try:
            state = torch_checkpoint.load_state_dict(path)
        except torch_checkpoint.UnsafePickleError as e:
            raise PretrainedError(_first_line(e)) from None
        except (torch_checkpoint.CheckpointFormatError, OSError) as e:
            raise PretrainedError(f"cannot read {path}: {_first_line(e)} (truncated or damaged? download it again)") from None
        if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
            raise PretrainedError(f"{path} does not hold a flat mapping of tensor names to tensors")
    return {str(k): np.asarray(v, np.float32) for k, v in state.items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


#: Legacy attention layer names -> the current ones (difference 4 of the module docstring).
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"(.+\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")


def current_names(state: Dict[str, np.ndarray], where: str = "the weights") -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """``(state under the current names, {current name: name in the file})``: attention tensors
    stored under the legacy names ``query``, ``key``, ``value``, ``proj_attn`` renamed to ``to_q``,
    ``to_k``, ``to_v``, ``to_out.0``; every other name unchanged. Raises :class:`PretrainedError`
    when one tensor is stored under both names."""
    out, original = {}, {}
    for name, value in state.items():
        m = _LEGACY_RE.fullmatch(name)
        new = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}" if m else name
        if new in out or (m and new in state):
            raise PretrainedError(f"{where}: tensor {name} is stored under its legacy and its current name ({new})")
        out[new], original[new] = value, name
    return out, original


#: DDPMUNet module names -> diffusers module names (differences 4 and 5 of the module docstring).
_TOP = {"conv_in": "conv_in", "temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
        "mid_block_1": "mid_block.resnets.0", "mid_attn_1": "mid_block.attentions.0",
        "mid_block_2": "mid_block.resnets.1", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEVEL_RE = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?")


def torch_name(path: Sequence[str], levels: int) -> str:
    """The diffusers tensor name of the DDPMUNet parameter at ``path`` (e.g. ``('up_3_attn_1', 'q',
    'kernel')`` → ``up_blocks.0.attentions.1.to_q.weight`` for ``levels = 4``: up level i is
    ``up_blocks[levels − 1 − i]``). ``kernel`` and ``scale`` are ``weight``."""
    module, *sub, leaf = path
    if module in _TOP:
        name = _TOP[module]
    else:
        m = _LEVEL_RE.fullmatch(module)
        if m is None:
            raise KeyError(f"no diffusers name for DDPMUNet module {module!r}")
        side, i, what, j = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        block = f"down_blocks.{i}" if side == "down" else f"up_blocks.{levels - 1 - i}"  # up blocks in reverse order
        name = {"block": f"{block}.resnets.{j}", "attn": f"{block}.attentions.{j}",
                "downsample": f"{block}.downsamplers.0.conv", "upsample": f"{block}.upsamplers.0.conv"}[what]
    if sub:
        (layer,) = sub
        table = _ATTN if "attn" in module else _RESNET
        name = f"{name}.{table[layer]}"
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def _torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The PyTorch shape of a tensor whose Flax shape is ``flax_shape``: HWIO → OIHW, (in, out) → (out, in)."""
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:
        return flax_shape[::-1]
    return tuple(flax_shape)


def to_flax(tensor: np.ndarray, flax_shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """A PyTorch tensor in the layout of the Flax parameter of shape ``flax_shape`` (difference 6):
    a convolution's OIHW weight → HWIO, a Linear's ``(out, in)`` → ``(in, out)`` (a legacy 1×1
    convolution ``(out, in, 1, 1)`` too), vectors unchanged; None when the shape does not fit."""
    want = _torch_shape(tuple(flax_shape))
    if len(flax_shape) == 2 and tensor.shape == want + (1, 1):
        tensor = tensor.reshape(want)
    if tensor.shape != want:
        return None
    if len(flax_shape) == 4:
        return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0))
    if len(flax_shape) == 2:
        return np.ascontiguousarray(tensor.T)
    return tensor


def params_from_state_dict(state: Dict[str, np.ndarray], abstract_params, *, where: str = "the weights"):
    """The DDPMUNet params (a tree like ``abstract_params``, e.g. ``jax.eval_shape(model.init, ...)
    ['params']``, of float32 NumPy arrays) from a UNet2DModel state dict, every tensor used once.

    Raises:
      PretrainedError: the first tensor the network needs that is missing, one of the wrong shape
        (its name, its shape and the shape needed), or the first tensor the network does not use.
    """
    import jax  # noqa: PLC0415

    state, original = current_names(state, where)
    levels = 1 + max((int(m.group(2)) for k in abstract_params if (m := _LEVEL_RE.fullmatch(k))), default=0)
    used = set()

    def convert(path, leaf):
        keys = tuple(getattr(p, "key", p) for p in path)
        name = torch_name(keys, levels)
        if name not in state:
            raise PretrainedError(f"{where}: tensor {name} is missing (the network's {'/'.join(keys)})")
        tensor = state[name]
        out = to_flax(tensor, tuple(leaf.shape))
        if out is None:
            raise PretrainedError(f"{where}: tensor {original[name]} has shape {tuple(tensor.shape)}; the network's "
                                  f"{'/'.join(keys)} needs {_torch_shape(tuple(leaf.shape))}")
        used.add(name)
        return out

    params = jax.tree_util.tree_map_with_path(convert, abstract_params)
    unused = [original[k] for k in state if k not in used]
    if unused:
        raise PretrainedError(f"{where}: tensor {unused[0]} is not used by the network ({len(unused)} unused); "
                              "the weights do not fit config.json")
    return params


# ------------------------------------------------------------------------------------------------
# Import and write a run
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Imported:
    """An imported model: ``config`` (ConfigDict), ``params`` (DDPMUNet params, NumPy float32),
    ``image_shape`` (H, W, C), and ``info``: 'source', 'weights' (the file read), 'ema' (whether the
    folder's name marks EMA weights), 'legacy_names', 'num_tensors', 'num_params'."""

    config: Any
    params: Any
    image_shape: Tuple[int, int, int]
    info: Dict[str, Any]


def load_pretrained(source, base) -> Imported:
    """Reads and checks a diffusers model folder (a path or a :class:`Folder`) against the recipe
    ``base`` (:func:`config_from_diffusers`): the configs, the validated training config, every
    tensor mapped, nothing written.

    Raises:
      PretrainedError: one line naming the file and the key or tensor (also the config's own
        validation, :func:`ddpm_jax.config.validate_config`, with ``data.path`` allowed empty: a
        run needs it only to train).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from ddpm_jax.config import ConfigError, validate_config  # noqa: PLC0415
    from ddpm_jax.models import count_params, model_from_config  # noqa: PLC0415

    folder = source if isinstance(source, Folder) else locate(source)
    unet_where = os.path.join(folder.unet_dir, "config.json")
    config = config_from_diffusers(folder.unet_config, folder.scheduler_config, base, unet_where=unet_where,
                                   scheduler_where=folder.scheduler_path)
    checked = copy.deepcopy(config)
    if checked.data.source in ("folder", "idx") and not checked.data.path:
        checked.data.path = "(given when training)"
    try:
        validate_config(checked)
    except ConfigError as e:
        raise PretrainedError(f"the imported config: {e}") from None
    if folder.weights is None:
        raise PretrainedError(f"{folder.unet_dir} holds no weights: none of {', '.join(WEIGHT_FILES)}")
    image_shape = network_settings(folder.unet_config, unet_where).image_shape
    model = model_from_config(config.model, image_shape)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32),
                              jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
    raw = read_tensors(folder.weights)
    params = params_from_state_dict(raw, abstract, where=folder.weights)
    info = {"source": folder.path, "weights": folder.weights, "ema": is_ema_folder(folder.path),
            "legacy_names": any(_LEGACY_RE.fullmatch(k) for k in raw), "num_tensors": len(raw),
            "num_params": count_params(params)[0]}
    return Imported(config=config, params=params, image_shape=image_shape, info=info)


def _is_empty_dir_or_absent(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def check_new_workdir(workdir: str) -> str:
    """The absolute ``workdir`` if it is absent or an empty directory; else :class:`PretrainedError`."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if not _is_empty_dir_or_absent(path):
        what = "is not a directory" if not os.path.isdir(path) else "is not empty"
        raise PretrainedError(f"--workdir {path} {what}: an imported model goes into a new run directory")
    return path


def initial_state(imported: Imported):
    """``(TrainState, meta)`` of step 0 as the trainer builds them (``ddpm_jax.trainer``): params
    and EMA params both the imported weights, the recipe's optimiser freshly initialised, the run's
    training key (:func:`ddpm_jax.rng.run_keys`); meta with the image shape and the import's ``info``."""
    import jax  # noqa: PLC0415

    from ddpm_jax import data, rng  # noqa: PLC0415
    from ddpm_jax.train_state import create_train_state, make_optimizer  # noqa: PLC0415

    config = imported.config
    params = jax.tree_util.tree_map(jax.numpy.asarray, imported.params)
    spe = data.steps_per_epoch(int(config.data.train_size), int(config.train.batch_size))
    tx = make_optimizer(config.optim, steps_per_epoch=spe, params=params)
    train_key = rng.run_keys(config.seed)[1]  # as ddpm_jax.trainer starts a run
    state = create_train_state(params, tx, train_key)
    meta = {"step": 0, "epoch": 0, "step_in_epoch": 0, "steps_per_epoch": spe, "image_shape": list(imported.image_shape),
            "wall_seconds": 0.0, "imported": dict(imported.info)}
    return state, meta


def save_as_run(imported: Imported, workdir: str) -> str:
    """Writes ``workdir/config.json`` and the checkpoint of step 0 (:func:`initial_state`) in the
    trainer's layout (``ddpm_jax.checkpointing``), so that sampling, evaluation and
    ``experiments.train`` (resuming) read it as any run. ``workdir`` must be absent or empty; the
    run is written whole or not at all (``ddpm_jax.run_writer.write_run``). Returns the absolute path."""
    from ddpm_jax.run_writer import write_run  # noqa: PLC0415

    path = check_new_workdir(workdir)
    state, meta = initial_state(imported)
    return write_run(path, imported.config.to_dict(), state, meta)


def recipe_overrides(config, base) -> Tuple[List[str], List[str]]:
    """``(flags, missing)``: the ``--config.key=value`` flags that turn the recipe ``base`` into
    ``config`` (for ``experiments.train``), and the keys of ``config`` that ``base`` lacks (which no
    flag can add)."""
    flags, missing = [], []

    def walk(new, old, prefix):
        for key, value in new.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                if not isinstance(old.get(key), dict):
                    missing.append(dotted)
                else:
                    walk(value, old[key], dotted + ".")
            elif key not in old:
                missing.append(dotted)
            elif json.dumps(value) != json.dumps(old[key]):
                flags.append(f"--config.{dotted}={_flag_value(value)}")

    walk(config.to_dict(), base.to_dict(), "")
    return flags, missing


def _flag_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)

"""Validation of a training config (``configs/*.py``), once, before any data or compile.

Every problem raises :class:`ConfigError` (a ``ValueError``) with one line that names the key,
e.g. ``config.train.batch_size = 0: must be an integer >= 1``.
"""

from __future__ import annotations

import numbers

from ddpm_jax import data, objectives, sampling, schedules, weightings

__all__ = ["ConfigError", "validate_config", "schedule_from_config", "sampler_options_from_config", "lookup", "REQUIRED_KEYS", "DTYPES",
           "TRAIN_DEFAULTS", "train_option", "distilled_steps", "check_distilled_sampler"]

#: Keys the rest of the project relies on.
REQUIRED_KEYS = (
    "seed",
    "data.source",
    "data.name",
    "data.path",
    "data.scale",
    "data.train_size",
    "data.val_size",
    "schedule.name",
    "schedule.num_steps",
    "model.time_input",
    "objective.name",
    "objective.weighting",
    "objective.reduction",
    "optim.learning_rate",
    "train.batch_size",
    "train.num_epochs",
    "train.num_steps",
    "train.ema_decay",
    "train.parallel",
    "sampling.method",
    "checkpoint.every_steps",
    "checkpoint.keep",
)

PARALLEL = ("jit", "pmap")
#: ``model.dtype``: the compute dtype of the network (params and optimiser state stay float32).
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value is missing or out of range; the message names the key."""


_MISSING = object()


def lookup(config, dotted: str, default=_MISSING):
    """``config['a']['b']`` for ``dotted = 'a.b'``, in a ConfigDict or a plain dict (a saved
    config.json); ``default`` where a part is missing, or ConfigError naming the key without one."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            if default is not _MISSING:
                return default
            raise ConfigError(f"config.{dotted} is missing") from None
    return node


_get = lookup


def _int(config, key, minimum=None, maximum=None):
    v = _get(config, key)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ConfigError(f"config.{key} = {v!r}: must be an integer")
    if minimum is not None and v < minimum:
        raise ConfigError(f"config.{key} = {v}: must be >= {minimum}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"config.{key} = {v}: must be <= {maximum}")
    return int(v)


def _float(config, key, low=None, high=None, low_open=False, high_open=False):
    v = _get(config, key)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"config.{key} = {v!r}: must be a number")
    v = float(v)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high or v != v:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"config.{key} = {v}: must be in {lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}")
    return v


def _choice(config, key, choices):
    v = _get(config, key)
    if v not in choices:
        raise ConfigError(f"config.{key} = {v!r}: must be one of {sorted(choices)}")
    return v


def schedule_from_config(config) -> "schedules.Schedule":
    """The config's schedule: ``schedule.name`` with T = ``schedule.num_steps`` and the entries of
    the schedule section that this schedule takes (``schedules.schedule_kwargs``)."""
    section = _get(config, "schedule")
    name = _get(config, "schedule.name")
    settings = {k: v for k, v in section.items() if k not in ("name", "num_steps")}
    return schedules.make_schedule(name, _get(config, "schedule.num_steps"), **schedules.schedule_kwargs(name, settings))


#: The config keys of the SNR weightings' parameters (``ddpm_jax.weightings``), all optional.
WEIGHTING_KEYS = {"min_snr": {"gamma": "objective.min_snr_gamma"},
                  "p2": {"k": "objective.p2_k", "gamma": "objective.p2_gamma"},
                  "edm": {"sigma_data": "objective.edm_sigma_data"}}


def weighting_params_from_config(config) -> dict:
    """The parameters of ``objective.weighting`` from their optional keys (:data:`WEIGHTING_KEYS`;
    absent keys take the papers' defaults); ``{}`` for 'elbo' and 'simple'."""
    keys = WEIGHTING_KEYS.get(_get(config, "objective.weighting"), {})
    return {name: _get(config, key) for name, key in keys.items() if _get(config, key, None) is not None}


def sampler_options_from_config(config) -> dict:
    """The config's sampler as keyword arguments of :func:`ddpm_jax.sampling.sample`: ``method``,
    ``num_steps`` (None: every step), ``eta``, ``ddpm_variance``, ``parameterisation`` (what the
    objective predicts), ``clip_x0`` (the data range, or None), ``grid`` when set, and ``guidance``
    (w) for a class-conditional model (``model.num_classes > 0``)."""
    s = config.sampling
    opts = {"method": s.method, "num_steps": s.get("num_steps", 0) or None, "eta": s.get("eta", 0.0),
            "ddpm_variance": s.ddpm_variance, "parameterisation": objectives.PREDICTS[config.objective.name],
            "clip_x0": data.data_range(config.data.scale) if s.get("clip_x0", False) else None}
    if s.get("grid", ""):
        opts["grid"] = s.grid
    if config.model.get("num_classes", 0):
        opts["guidance"] = float(s.get("guidance", 0.0))
    return opts


def distilled_steps(config):
    """N for a run distilled for N-step DDIM (``sampling.distilled_steps``, written by
    ``experiments.distill``), else None."""
    n = _get(config, "sampling").get("distilled_steps", 0) or 0
    return int(n) or None


def check_distilled_sampler(config, options: dict, grid=None) -> None:
    """ValueError (one line) unless ``options`` (``sampling.sample`` keyword arguments) are the
    sampler a distilled run was trained for: 'ddim' with η = 0 and its N steps, on the grid it
    records (so no ``grid``). A run that is not distilled passes."""
    n = distilled_steps(config)
    if n is None:
        return
    got = {"method": options.get("method"), "num_steps": options.get("num_steps"), "eta": float(options.get("eta") or 0.0)}
    if got != {"method": "ddim", "num_steps": n, "eta": 0.0} or grid:
        asked = ", ".join(f"{k} {v}" for k, v in got.items()) + (f", grid {grid}" if grid else "")
        raise ValueError(f"this run is a student distilled for {n}-step DDIM on its recorded grid (config.sampling."
                         f"distilled_steps = {n}): sample it with --method ddim --num_steps {n} --eta 0 and no --grid "
                         f"(asked for: {asked})")


#: Training options a config may leave out (configs written before they existed): key -> default.
TRAIN_DEFAULTS = {
    "t_sampling": "uniform",  # ddpm_jax.timestep_sampling: 'uniform' | 'log_normal' | 'importance'
    "t_log_normal_mean": -1.2,  # 'log_normal': ln σ ~ N(mean, std²) (Karras et al. 2022)
    "t_log_normal_std": 1.2,
    "t_importance_history": 10,  # 'importance': terms kept per t (Nichol & Dhariwal 2021)
    "t_importance_uniform": 1e-3,  # 'importance': the uniform share mixed in
    "ema": "constant",  # 'constant': ema_decay (warmed up) | 'power': EDM2's profile of width ema_sigma_rel
    "ema_sigma_rel": 0.1,
    "ema_snapshot_sigma_rels": (),  # power EMAs tracked beside, saved with each checkpoint for experiments.posthoc_ema
}


def train_option(config, key: str):
    """``config.train.<key>``, or its :data:`TRAIN_DEFAULTS` value when the config has no such key."""
    return _get(config, "train").get(key, TRAIN_DEFAULTS[key])


def _check_training_options(config) -> None:
    from ddpm_jax import ema, timestep_sampling  # noqa: PLC0415

    train = _get(config, "train")
    for key in ("t_sampling", "ema"):
        if key not in train:
            continue
        choices = timestep_sampling.T_SAMPLINGS if key == "t_sampling" else ("constant", "power")
        _choice(config, f"train.{key}", choices)
    if "t_log_normal_mean" in train:
        _float(config, "train.t_log_normal_mean")
    if "t_log_normal_std" in train:
        _float(config, "train.t_log_normal_std", low=0.0, low_open=True)
    if "t_importance_history" in train:
        _int(config, "train.t_importance_history", minimum=1)
    if "t_importance_uniform" in train:
        _float(config, "train.t_importance_uniform", 0.0, 1.0, low_open=True)
    rels = train_option(config, "ema_snapshot_sigma_rels")
    if not isinstance(rels, (tuple, list)) or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in rels):
        raise ConfigError(f"config.train.ema_snapshot_sigma_rels = {rels!r}: must be a sequence of numbers (e.g. (0.05, 0.1))")
    if len(set(rels)) != len(rels):
        raise ConfigError(f"config.train.ema_snapshot_sigma_rels = {rels!r}: each value once")
    for key, values in (("ema_sigma_rel", [train_option(config, "ema_sigma_rel")]), ("ema_snapshot_sigma_rels", rels)):
        for v in values:
            try:
                ema.gamma_from_sigma_rel(float(v))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config.train.{key}: {e}") from None


def validate_config(config) -> None:
    """Checks every key's type and range, and the combinations that must agree.

    Raises:
      ConfigError: the first problem found, naming its key.
    """
    for key in REQUIRED_KEYS:
        _get(config, key)
    _int(config, "seed", minimum=0)

    source = _choice(config, "data.source", data.SOURCES)
    if source in ("idx", "folder") and not _get(config, "data.path"):
        what = "the directory of IDX files" if source == "idx" else "the directory of images"
        raise ConfigError(f"config.data.path is empty: data.source='{source}' needs {what}")
    if not isinstance(_get(config, "data").get("url", ""), str):  # absent: the published mirrors
        raise ConfigError(f"config.data.url = {_get(config, 'data').get('url')!r}: must be a URL string ('' for the published mirrors)")
    _choice(config, "data.scale", data.SCALES)
    if not isinstance(_get(config, "data").get("random_flip", False), bool):  # absent: False
        raise ConfigError(f"config.data.random_flip = {_get(config, 'data').get('random_flip')!r}: must be True or False")
    _int(config, "data.train_size", minimum=1)
    _int(config, "data.val_size", minimum=0)

    # The schedule is cheap to build: build it, and report its own error under the config key.
    # T = 1 is refused: one reverse step from the prior is not a diffusion (and the 'mean'
    # objective's t = T term would be its only one).
    T = _int(config, "schedule.num_steps", minimum=2)
    try:
        schedule_from_config(config)
    except ValueError as e:
        raise ConfigError(f"config.schedule: {e}") from None

    from ddpm_jax.models import MODEL_NAMES, PRESETS, TIME_INPUTS  # the model module imports flax; keep it local
    from ddpm_jax.models.ddpm_unet import check_unet_config
    from ddpm_jax.models.scorenet import CONV_IMPLS

    # model.name selects the family; only that family's keys are checked. Absent: 'scorenet'
    # (configs saved before the key existed).
    model_name = _get(config, "model").get("name", "scorenet")
    if model_name not in MODEL_NAMES:
        raise ConfigError(f"config.model.name = {model_name!r}: must be one of {list(MODEL_NAMES)}")
    if model_name == "scorenet":
        _choice(config, "model.preset", PRESETS)
        _int(config, "model.embed_dim", minimum=2)
        _int(config, "model.num_groups", minimum=1)
        _float(config, "model.fourier_scale", low=0.0, low_open=True)
        _choice(config, "model.conv_impl", ("auto",) + tuple(CONV_IMPLS))
        rho = _get(config, "model.rho_head")
        if not isinstance(rho, bool):
            raise ConfigError(f"config.model.rho_head = {rho!r}: must be True or False")
    else:
        def int_seq(key, nonempty):
            v = _get(config, key)
            if (not isinstance(v, (tuple, list)) or (nonempty and not v)
                    or any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < 1 for e in v)):
                raise ConfigError(f"config.{key} = {v!r}: must be a {'non-empty ' if nonempty else ''}"
                                  "sequence of integers >= 1")
            return tuple(int(e) for e in v)

        ch = _int(config, "model.ch", minimum=4)
        ch_mult = int_seq("model.ch_mult", nonempty=True)
        blocks = _int(config, "model.num_res_blocks", minimum=1)
        attn = int_seq("model.attn_resolutions", nonempty=False)
        dropout = _float(config, "model.dropout", 0.0, 1.0, high_open=True)
        groups = _int(config, "model.num_groups", minimum=1)
        try:
            check_unet_config(ch, ch_mult, blocks, attn, dropout, groups)
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        rho = _get(config, "model").get("rho_head", False)
        if rho is not False:
            raise ConfigError(f"config.model.rho_head = {rho!r}: the ρ-head is a ScoreNet option "
                              "(model.name='scorenet'); set it to False")
    _choice(config, "model.time_input", TIME_INPUTS)
    if "num_classes" in _get(config, "model"):  # absent: 0, unconditional
        _int(config, "model.num_classes", minimum=0)
    if _get(config, "model").get("dtype", "float32") not in DTYPES:  # absent: float32
        raise ConfigError(f"config.model.dtype = {_get(config, 'model').get('dtype')!r}: must be one of {list(DTYPES)}")

    name = _choice(config, "objective.name", objectives.OBJECTIVES)
    weighting = _choice(config, "objective.weighting", objectives.WEIGHTINGS)
    if weighting in WEIGHTING_KEYS:
        try:
            weightings.check_params(weighting, weighting_params_from_config(config))
        except ValueError as e:
            key = next((k for p, k in WEIGHTING_KEYS[weighting].items() if f": {p} " in str(e)), "objective.weighting")
            raise ConfigError(f"config.{key}: {e}") from None
    _choice(config, "objective.reduction", objectives.REDUCTIONS)
    if rho and objectives.PREDICTS[name] != "mean":
        raise ConfigError(
            f"config.model.rho_head = True, but objective {name!r} predicts {objectives.PREDICTS[name]!r}: "
            "the ρ-head outputs a reverse mean, so use it with objective 'mean' or 'xprev'"
        )

    _float(config, "optim.learning_rate", low=0.0, low_open=True)
    _float(config, "optim.rho_learning_rate", low=0.0, low_open=True)
    _float(config, "optim.b1", 0.0, 1.0, high_open=True)
    _float(config, "optim.b2", 0.0, 1.0, high_open=True)
    _float(config, "optim.eps", low=0.0)
    _float(config, "optim.decay_factor", 0.0, 1.0, low_open=True)
    _int(config, "optim.decay_every_epochs", minimum=0)
    _int(config, "optim.warmup_steps", minimum=0)
    if "anneal_steps" in _get(config, "optim"):  # absent: 0 (no linear annealing)
        if _int(config, "optim.anneal_steps", minimum=0) and _get(config, "optim.decay_every_epochs"):
            raise ConfigError("config.optim.anneal_steps and config.optim.decay_every_epochs are two learning-rate "
                              "schedules: set one of them to 0")
    _float(config, "optim.grad_clip_norm", low=0.0)

    batch = _int(config, "train.batch_size", minimum=1)
    if "label_dropout" in _get(config, "train"):  # absent: 0
        _float(config, "train.label_dropout", 0.0, 1.0, high_open=True)
    if "grad_accum_steps" in _get(config, "train"):  # absent: 1
        _int(config, "train.grad_accum_steps", minimum=1, maximum=batch)
    num_steps = _int(config, "train.num_steps", minimum=0)
    _int(config, "train.num_epochs", minimum=0 if num_steps > 0 else 1)
    _float(config, "train.ema_decay", 0.0, 1.0, high_open=True)
    _check_training_options(config)
    _choice(config, "train.parallel", PARALLEL)
    _int(config, "train.log_every_steps", minimum=1)
    _int(config, "train.max_nonfinite_steps", minimum=1)
    _int(config, "train.eval_every_epochs", minimum=0)
    _int(config, "train.sample_every_epochs", minimum=0)
    _int(config, "train.num_grid_samples", minimum=1)

    _choice(config, "sampling.method", sampling.METHODS)
    _choice(config, "sampling.ddpm_variance", sampling.DDPM_VARIANCES)
    if not isinstance(_get(config, "sampling.clip_x0"), bool):
        raise ConfigError(f"config.sampling.clip_x0 = {_get(config, 'sampling.clip_x0')!r}: must be True or False")
    # Optional settings of the strided samplers (absent: every step, η = 0, the method's default
    # grid): the sampler the grids and, unless flags say otherwise, experiments.sample / evaluate use.
    s = _get(config, "sampling")
    if "num_steps" in s or "eta" in s or "grid" in s:
        try:
            sampling.check_sampler_args(s.method, T, s.get("num_steps", 0) or None, s.get("eta", 0.0), s.ddpm_variance,
                                        grid=s.get("grid", "") or None)
        except ValueError as e:
            raise ConfigError(f"config.sampling: {e} (sampling.num_steps = 0 means every step, grid '' the method's default)") from None

    if s.get("distilled_steps", 0):  # a student of experiments.distill: its own sampler only
        _int(config, "sampling.distilled_steps", minimum=1, maximum=T)
        try:
            check_distilled_sampler(config, sampler_options_from_config(config), s.get("grid", "") or None)
        except ValueError as e:
            raise ConfigError(f"config.sampling: {e}") from None

    if "guidance" in s:  # absent: 0
        w = _float(config, "sampling.guidance", low=0.0)
        if w and not _get(config, "model").get("num_classes", 0):
            raise ConfigError(f"config.sampling.guidance = {w}: guidance needs a class-conditional model "
                              "(model.num_classes > 0)")

    _int(config, "checkpoint.every_steps", minimum=1)
    _int(config, "checkpoint.keep", minimum=1)

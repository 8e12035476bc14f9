"""Load a trained run from its workdir, for sampling and evaluation.

    run = load_run("runs/mnist")                  # latest checkpoint
    model_fn = run.model_fn(ema=True)             # (x_t, t) -> prediction, EMA params
    x = sampling.sample(model_fn, run.schedule, (16,) + run.image_shape, key,
                        method="eps_ddpm", parameterisation=run.parameterisation)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import data, distillation, objectives, sampling
from ddpm_jax.checkpointing import CheckpointError, CheckpointMismatchError, Checkpointer, read_config_json
from ddpm_jax.config import check_distilled_sampler, distilled_steps, sampler_options_from_config, schedule_from_config
from ddpm_jax.models import make_model_fn, model_from_config
from ddpm_jax.run_writer import META_FILE, PARAMS_FILE
from ddpm_jax.schedules import Schedule
from ddpm_jax.train_state import create_train_state, fit_to_saved, make_optimizer

__all__ = ["Run", "load_run", "sampling_tag"]


def sampling_tag(options: dict) -> str:
    """A short name for sampler options, e.g. 'eps_ddpm', 'eps_ddpm_posterior' (σ_t² = β̃_t; plain
    'eps_ddpm' is σ_t² = β_t), 'ddim_steps50_eta0', 'heun_steps10_edm_churn10', 'eps_ddpm_clip':
    different options, different names."""
    tag = options["method"]
    if options["method"] == "eps_ddpm" and options.get("ddpm_variance") == "posterior":
        tag += "_posterior"
    if options.get("num_steps"):
        tag += f"_steps{options['num_steps']}"
    if options["method"] == "ddim":
        tag += f"_eta{options.get('eta', 0.0):g}"
    if options.get("grid"):
        tag += f"_{options['grid']}"
    if "guidance" in options:
        tag += f"_w{options['guidance']:g}"
    if options.get("s_churn"):
        tag += f"_churn{options['s_churn']:g}"
        if (options["s_tmin"], options["s_tmax"], options["s_noise"]) != (0.0, float("inf"), 1.0):
            tag += f"_tmin{options['s_tmin']:g}_tmax{options['s_tmax']:g}_noise{options['s_noise']:g}"
    return tag + ("_clip" if options.get("clip_x0") is not None else "")


@dataclasses.dataclass
class Run:
    """A restored run. ``parameterisation`` is what the network predicts ('eps', 'x0', 'v',
    'mean'); ``image_shape`` is (H, W, C); ``data_scale`` is the config's data.scale; ``meta`` is
    the checkpoint's metadata (step, epoch, steps_per_epoch, image_shape, and ``wall_seconds``:
    training wall time up to this step, where the trainer recorded it)."""

    config: ml_collections.ConfigDict
    model: Any
    schedule: Schedule
    params: Any
    ema_params: Any
    step: int
    image_shape: Tuple[int, ...]
    workdir: str
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def parameterisation(self) -> str:
        return objectives.PREDICTS[self.config.objective.name]

    @property
    def data_scale(self) -> str:
        return self.config.data.scale

    @property
    def distilled_grid(self):
        """The ascending steps a distilled student samples on (``meta['distillation']['grid']``,
        written by ``experiments.distill``), or None for a run that is not distilled."""
        return (self.meta.get("distillation") or {}).get("grid")

    @property
    def num_classes(self) -> int:
        """K for a class-conditional run (labels 0..K−1), 0 for an unconditional one."""
        return int(self.config.model.get("num_classes", 0))

    def model_fn(self, ema: bool = True, params=None):
        """``model_fn(x_t, t)`` (``model_fn(x_t, t, y)`` with labels for a class-conditional run)
        with the EMA params (default), the raw params, or ``params`` when given."""
        if params is None:
            params = self.ema_params if ema else self.params
        return make_model_fn(self.model.apply, params, time_input=self.config.model.time_input,
                             num_steps=self.schedule.num_steps)

    def sampler_options(self, method=None, *, num_steps=None, eta=None, ddpm_variance=None, clip_x0=None, grid=None,
                        s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, guidance=None) -> dict:
        """Keyword arguments for :func:`ddpm_jax.sampling.sample`, defaults from the run's config,
        validated (ValueError) before anything is compiled. ``clip_x0``: bool or None (config).
        ``num_steps`` / ``eta`` / ``grid`` default to ``config.sampling``'s when ``method`` is the
        config's. The step grid and Heun's churn appear in the result only when set; ``guidance`` (w,
        default the config's ``sampling.guidance``, else 0) only for a class-conditional run."""
        base = sampler_options_from_config(self.config)
        if method is None or method == base["method"]:
            num_steps = num_steps or base["num_steps"]
            eta = base["eta"] if eta is None else eta
            grid = grid or base.get("grid")
        eta = 0.0 if eta is None else eta
        method = method or base["method"]
        ddpm_variance = ddpm_variance or base["ddpm_variance"]
        clip = base["clip_x0"] is not None if clip_x0 is None else clip_x0
        churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
        sampling.check_sampler_args(method, self.schedule.num_steps, num_steps, eta, ddpm_variance, self.parameterisation,
                                    grid, **churn)
        opts = {"method": method, "num_steps": num_steps, "eta": eta, "ddpm_variance": ddpm_variance,
                "parameterisation": self.parameterisation, "clip_x0": data.data_range(self.data_scale) if clip else None}
        if grid is not None:
            opts["grid"] = grid
        check_distilled_sampler(self.config, opts, grid)
        if distilled_steps(self.config) and len(self.distilled_grid or ()) != distilled_steps(self.config):
            raise ValueError(f"{self.workdir} is a distilled run whose checkpoint records no grid of "
                             f"{distilled_steps(self.config)} steps (meta 'distillation'): it cannot be sampled")
        if s_churn:
            opts.update(churn)
        w = base.get("guidance", 0.0) if guidance is None else guidance
        if self.num_classes:
            if not w >= 0:
                raise ValueError(f"--guidance={w}: must be >= 0 (0 = the conditional model)")
            opts["guidance"] = float(w)
        elif w:
            raise ValueError(f"--guidance={w}: {self.workdir} holds an unconditional model (model.num_classes = 0); "
                             "guidance needs a class-conditional one")
        return opts

    def make_sampler(self, batch_size: int, options: dict, *, ema: bool = True, return_trajectory: bool = False):
        """``fn(key) -> samples (batch_size, H, W, C)`` (and the trajectory if asked); for a
        class-conditional run ``fn(key, labels)`` with labels ``(batch_size,)`` int (−1: no class) and
        ``options['guidance']`` (without labels it draws from the "no class" model, unguided). One
        compiled ``lax.scan`` serves every batch, with the params passed in (not compiled in as
        constants); ``fn.compile(key[, labels])`` compiles it ahead of use. The samples are split
        over this process's devices when ``batch_size`` divides evenly (:func:`ddpm_jax.data.batch_sharding`); the
        noise does not depend on the split (JAX's partitionable threefry), so neither do the samples."""
        shape = (batch_size,) + self.image_shape
        sharding = None if return_trajectory else data.batch_sharding(batch_size)
        grid = self.distilled_grid if distilled_steps(self.config) else None

        def fn(params, key, labels=None):
            model_fn = self.model_fn(params=params)
            opts = dict(options)
            if grid is not None:  # a distilled student: DDIM on the grid it was trained for
                return distillation.sample_on_grid(model_fn, self.schedule, grid, shape, key,
                                                   parameterisation=opts["parameterisation"], clip_x0=opts["clip_x0"],
                                                   return_trajectory=return_trajectory)
            if labels is None:  # no class asked for: the "no class" model, unguided
                opts.pop("guidance", None)
            return sampling.sample(model_fn, self.schedule, shape, key, return_trajectory=return_trajectory, labels=labels,
                                   **opts)

        params = self.ema_params if ema else self.params
        if sharding is not None:  # replicated on the devices the samples are split over
            params = jax.device_put(params, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
        return _Sampler(jax.jit(fn, out_shardings=sharding), params)


class _Sampler:
    """A jitted ``fn(params, key)`` with its params bound: ``sampler(key)``; ``compile(key)``
    returns the compiled ``key -> samples``."""

    def __init__(self, jitted, params):
        self.jitted, self.params = jitted, params

    def __call__(self, key, labels=None):
        return self.jitted(self.params, key, labels)

    def compile(self, key, labels=None):
        compiled = self.jitted.lower(self.params, key, labels).compile()
        return lambda k, y=None: compiled(self.params, k, y)


def _restore(ckpt: Checkpointer, config, step: int):
    """(model, image_shape, state, meta) of checkpoint ``step``, restored into the config's model."""
    meta = ckpt.read_meta(step)
    image_shape = tuple(meta["image_shape"])
    model = model_from_config(config.model, image_shape)

    def abstract_state():
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + image_shape), jnp.ones((1,)))["params"]
        tx = make_optimizer(config.optim, steps_per_epoch=int(meta["steps_per_epoch"]), params=params)
        return create_train_state(params, tx, jax.random.PRNGKey(0))

    abstract = jax.eval_shape(abstract_state)
    state, _ = ckpt.restore(lambda saved: fit_to_saved(abstract, saved), step)  # with whatever options it was trained with
    return model, image_shape, state, meta


def is_params_run(workdir: str) -> bool:
    """Whether ``workdir`` holds a params run (``run_writer.write_params_run``: ``params.msgpack``
    and no ``checkpoints/``)."""
    return not os.path.isdir(os.path.join(workdir, "checkpoints")) and os.path.isfile(os.path.join(workdir, PARAMS_FILE))


def _params_meta(workdir: str):
    """``(meta, image_shape, step)`` of a params run's ``meta.json``; CheckpointError if unreadable."""
    meta_path = os.path.join(workdir, META_FILE)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        return meta, tuple(int(n) for n in meta["image_shape"]), int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path} is missing or not a params run's meta (step, image_shape): "
                              f"{type(e).__name__}: {e}") from None


def saved_steps(workdir: str) -> List[int]:
    """The steps :func:`load_run` restores from ``workdir``, ascending: a training run's kept
    checkpoints, a params run's one step, or none. CheckpointError: a params run's meta is unreadable."""
    if is_params_run(workdir):
        return [_params_meta(workdir)[2]]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []


def load_run(workdir: str, step: Optional[int] = None) -> Run:
    """Restores ``step`` (default: the latest) of the run in ``workdir``: a training run
    (``config.json`` and ``checkpoints/``) or a params run (``config.json``, ``params.msgpack``
    and ``meta.json``, ``ddpm_jax.run_writer.write_params_run``: the shipped form, whose params
    and EMA params are the file's).

    Raises:
      FileNotFoundError: no run in ``workdir``, or not the asked step.
      CheckpointError: the checkpoint does not fit the saved config, or is unreadable.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    cfg = read_config_json(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if cfg is not None and is_params_run(workdir):
        return _load_params_run(workdir, ml_collections.ConfigDict(cfg), step)
    if cfg is None or not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no training run in {workdir} (expected config.json and checkpoints/ written by experiments.train)")
    config = ml_collections.ConfigDict(cfg)
    ckpt = Checkpointer(ckpt_dir, every_steps=1, keep=10**6)
    try:
        for attempt in range(5):
            chosen = ckpt.latest_step() if step is None else step
            if chosen is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
            try:
                model, image_shape, state, meta = _restore(ckpt, config, chosen)
                break
            except CheckpointError:
                # Beside a running trainer the latest checkpoint can be removed by its retention
                # (checkpoint.keep) while it is read: then read the new latest. Otherwise: a failure.
                if step is not None or attempt == 4 or os.path.isdir(os.path.join(ckpt_dir, str(chosen))):
                    raise
                ckpt.reload()
    finally:
        ckpt.close()
    return Run(config=config, model=model, schedule=schedule_from_config(config), params=state.params,
               ema_params=state.ema_params, step=int(state.step), image_shape=image_shape, workdir=workdir, meta=dict(meta))


def _load_params_run(workdir: str, config, step: Optional[int]) -> Run:
    """The :class:`Run` of a params run (``config.json``, ``params.msgpack``, ``meta.json``)."""
    import flax.serialization
    import flax.traverse_util
    import numpy as np

    params_path = os.path.join(workdir, PARAMS_FILE)
    meta, image_shape, saved_step = _params_meta(workdir)
    if step is not None and step != saved_step:
        raise FileNotFoundError(f"{workdir} holds the params of step {saved_step} only, not step {step}")
    model = model_from_config(config.model, image_shape)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + image_shape), jnp.ones((1,)))["params"])
    try:
        with open(params_path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001  (msgpack raises several types for a damaged file)
        raise CheckpointError(f"{params_path} cannot be read ({type(e).__name__}): damaged or not a params file") from None
    want = flax.serialization.to_state_dict(abstract)
    flat_want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(want).items()}
    flat_saved = {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(saved).items()}
    if flat_want != flat_saved:
        bad = sorted(set(flat_want) ^ set(flat_saved)) or sorted(k for k in flat_want if flat_want[k] != flat_saved[k])
        raise CheckpointMismatchError(f"{params_path} does not hold this config's model (first difference: "
                                      f"{'/'.join(bad[0])}); config.json and params.msgpack belong together")
    params = jax.tree_util.tree_map(jnp.asarray, flax.serialization.from_state_dict(abstract, saved))
    return Run(config=config, model=model, schedule=schedule_from_config(config), params=params, ema_params=params,
               step=saved_step, image_shape=image_shape, workdir=workdir, meta=dict(meta))

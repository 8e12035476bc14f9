"""The training loop: ``train_and_evaluate(config, workdir)``.

A run is a set-up (:func:`_set_up`: validate, lock the workdir, load the data, build schedule,
model and optimiser, restore the newest checkpoint), a loop (:func:`_loop`: one step after
another, each followed by the periodic actions that are due — log, end-of-epoch evaluation and
sample grid, checkpoint — and a stop on Ctrl-C, SIGTERM or pre-emption) and a finish
(:func:`_finish`: final evaluation, grid and loss curve). Outputs (only process 0 writes):

    workdir/config.json  metrics.jsonl  tb/  checkpoints/  samples/epoch_XXXX.png  samples/final.png
    workdir/loss_curve.png  provenance.jsonl (a line per command: command, commit, machine, wall time)
    workdir/ema_snapshots/<step>.msgpack  with each checkpoint, when train.ema_snapshot_sigma_rels
                                          names power EMAs to track (experiments.posthoc_ema reads them)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import data, objectives, platform_profile, plots, provenance, rng, sampling, timestep_sampling
from ddpm_jax import ema as ema_lib
from ddpm_jax.checkpointing import Checkpointer, read_config_json, remove_partial_checkpoints, write_config_json
from ddpm_jax.config import (ConfigError, sampler_options_from_config, schedule_from_config, train_option,
                             validate_config, weighting_params_from_config)
from ddpm_jax.files import check_writable
from ddpm_jax.models import count_params, describe_model, make_model_fn, model_from_config
from ddpm_jax.resume import RESUME_MUST_MATCH, check_resume_compatible, lock_workdir, log, restore
from ddpm_jax.stop_signals import StopSignals
from ddpm_jax.train_state import create_train_state, make_optimizer, track_key
from ddpm_jax.train_step import Parallel, StepConfig
from ddpm_jax.workdir import prepare_workdir
from ddpm_jax.writers import MetricWriter, read_metrics

__all__ = ["train_and_evaluate", "prepare_workdir", "RESUME_MUST_MATCH", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient; the run stopped without saving."""


def train_and_evaluate(config, workdir: str, *, arrays: Optional[Dict[str, np.ndarray]] = None, progress: bool = True,
                       restore_step: Optional[int] = None) -> Dict[str, Any]:
    """Trains (or resumes) the run described by ``config`` in ``workdir``.

    Args:
      config: an ml_collections ConfigDict like ``configs/mnist.py``'s.
      workdir: output directory; an existing run there is resumed from its newest checkpoint that
        restores (damaged newer ones are moved to ``checkpoints_set_aside/``, never deleted).
      arrays: in-memory data for ``data.source='arrays'`` (tests).
      progress: show a tqdm progress bar.
      restore_step: resume from this checkpoint step instead; newer checkpoints are moved to
        ``checkpoints_set_aside/`` and the metrics after it are dropped.

    The workdir is locked for the whole run (:class:`ddpm_jax.workdir.WorkdirLock`): a second
    trainer on it raises ``WorkdirBusyError`` before touching anything.

    Returns:
      A summary dict: 'step', 'train_loss', 'val_loss', 'val_loss_ema', 'workdir', 'stopped_by'
      ('SIGINT' | 'SIGTERM' | 'complete' when there was nothing left to train | None).
    """
    validate_config(config)
    workdir = prepare_workdir(workdir)
    lock = lock_workdir(workdir)
    try:
        run = _set_up(config, workdir, arrays, restore_step)
        if run.step == run.total_steps and os.path.exists(os.path.join(workdir, "samples", "final.png")):
            log(f"{workdir} is already complete at step {run.step} (train.num_steps / num_epochs): nothing to train; "
                "raise train.num_steps or num_epochs to train further")
            run.close()
            return run.summary("complete")
        _loop(run, progress)
        return _finish(run)
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """Everything the loop and the periodic actions share."""

    config: Any
    workdir: str
    splits: Any
    schedule: Any  # placed on the devices once
    par: Parallel
    ckpt: Checkpointer
    writer: MetricWriter
    iterator: data.BatchIterator
    steps_per_epoch: int
    total_steps: int
    step: int
    state: Any  # the step's (device) form
    sample_grid: Callable  # (ema_params, schedule, key) -> images
    sample_key: Any
    eval_key: Any
    wall_before: float  # training seconds of the earlier commands, up to the resumed step
    t_begin: float = dataclasses.field(default_factory=time.time)
    is_main: bool = dataclasses.field(default_factory=lambda: jax.process_index() == 0)
    last_train: float = math.nan
    last_eval: Dict[str, float] = dataclasses.field(default_factory=dict)
    stopped_by: Optional[str] = None
    ema_tracks_start: Optional[int] = None  # the step the tracked power EMAs started at

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size

    def wall_seconds(self) -> float:
        """Training wall seconds up to now: this command's, from data loading on (compilation,
        evaluations and grids included), plus the earlier commands' up to the resumed step."""
        return self.wall_before + time.time() - self.t_begin

    def meta(self) -> Dict[str, Any]:
        """The metadata saved with a checkpoint of the current step."""
        spe = self.steps_per_epoch
        return {"step": self.step, "epoch": self.step // spe, "step_in_epoch": self.step % spe, "steps_per_epoch": spe,
                "image_shape": list(self.splits.image_shape), "wall_seconds": round(self.wall_seconds(), 3),
                "num_devices": self.par.num_devices, "padded_batch": self.par.padded_batch(self.batch_size),
                **({"ema_tracks_start": self.ema_tracks_start} if self.ema_tracks_start is not None else {})}

    def save(self, *, force: bool = False) -> bool:
        """A checkpoint of the current step (if due, or ``force``), and the tracked power EMAs'
        snapshot beside it (:func:`ddpm_jax.ema.write_snapshot`). Returns whether it saved."""
        plain = self.par.get_state(self.state)
        saved = self.ckpt.save(self.step, plain, self.meta(), force=force)
        if saved and plain.ema_tracks is not None:
            tracks = jax.device_get(plain.ema_tracks)
            if self.is_main:
                keys = sorted(tracks, key=lambda k: float(k.rsplit("_", 1)[1]))
                ema_lib.write_snapshot(self.workdir, self.step, self.ema_tracks_start,
                                       [float(k.rsplit("_", 1)[1]) for k in keys], [tracks[k] for k in keys])
        return saved

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()

    def summary(self, stopped_by: Optional[str]) -> Dict[str, Any]:
        return {"step": self.step, "train_loss": self.last_train, "val_loss": self.last_eval.get("val/loss", math.nan),
                "val_loss_ema": self.last_eval.get("val/loss_ema", math.nan), "workdir": self.workdir,
                "stopped_by": stopped_by}


def _build_step(config, image_shape, steps_per_epoch: int):
    """(model, initial params, StepConfig, Parallel) for the config."""
    model = model_from_config(config.model, image_shape)
    init_key = rng.run_keys(config.seed)[0]
    params = jax.jit(model.init)(init_key, jnp.zeros((1,) + image_shape), jnp.ones((1,)))["params"]
    total, trainable = count_params(params)
    log(f"model: {describe_model(config.model)} params={total:,} (trainable {trainable:,}); "
        f"objective={config.objective.name} ({config.objective.weighting}, {config.objective.reduction}); "
        f"T={config.schedule.num_steps}; compute dtype {config.model.get('dtype', 'float32')}")
    tx = make_optimizer(config.optim, steps_per_epoch=steps_per_epoch, params=params)
    loss_fn = objectives.get_objective(config.objective.name, weighting=config.objective.weighting,
                                       reduction=config.objective.reduction,
                                       weighting_params=weighting_params_from_config(config))
    power = train_option(config, "ema") == "power"
    step_cfg = StepConfig(apply_fn=model.apply, loss_fn=loss_fn, tx=tx, ema_decay=config.train.ema_decay,
                          time_input=config.model.time_input, accum_steps=config.train.get("grad_accum_steps", 1),
                          label_dropout=config.train.get("label_dropout", 0.0),
                          t_sampling=train_option(config, "t_sampling"),
                          t_log_normal=(float(train_option(config, "t_log_normal_mean")),
                                        float(train_option(config, "t_log_normal_std"))),
                          t_importance_uniform=float(train_option(config, "t_importance_uniform")),
                          ema_gamma=ema_lib.gamma_from_sigma_rel(float(train_option(config, "ema_sigma_rel"))) if power else None,
                          ema_track_gammas=tuple((track_key(v), ema_lib.gamma_from_sigma_rel(float(v)))
                                                 for v in train_option(config, "ema_snapshot_sigma_rels")))
    if step_cfg.t_sampling != "uniform" or power or step_cfg.ema_track_gammas:
        log(f"t sampling: {step_cfg.t_sampling}; EMA: " +
            (f"power, sigma_rel {train_option(config, 'ema_sigma_rel')}" if power else f"constant {config.train.ema_decay}") +
            (f"; power EMAs tracked for post-hoc EMA: sigma_rel {', '.join(k.split('_')[-1] for k, _ in step_cfg.ema_track_gammas)}"
             if step_cfg.ema_track_gammas else ""))
    return model, params, step_cfg, Parallel(step_cfg, mode=config.train.parallel)


def _log_layout(par: Parallel, batch_size: int, meta: Dict[str, Any]) -> None:
    """One line on the devices and the batch; one more when the batch is padded or the run
    resumes on another device count."""
    padded = par.padded_batch(batch_size)
    k = par.cfg.accum_steps
    log(f"devices: {jax.device_count()} x {jax.devices()[0].platform} ({par.mode}), {jax.process_count()} process(es); "
        f"global batch {batch_size}" + (f" in {k} micro-batches" if k > 1 else ""))
    if padded != batch_size:
        log(f"global batch {batch_size} padded to {padded} (a multiple of {par.num_devices} devices"
            + (f" x {k} micro-batches" if k > 1 else "") + f"): {padded - batch_size} zero-weight examples per step")
    before = meta.get("num_devices")
    if before is not None and before != par.num_devices:
        log(f"resuming on {par.num_devices} devices a run saved on {before}: the same batches, noise and loss "
            "weights (by example), summed in another order, so results differ from an uninterrupted run by float rounding")


def _make_grid_sampler(config, model, image_shape, par: Parallel):
    """The grid sampler: one compiled ``lax.scan`` from the EMA params, returning
    ``train.num_grid_samples`` images (of a class-conditional model: sample i of class i mod K,
    with the config's guidance)."""
    n_grid = config.train.num_grid_samples
    opts = sampler_options_from_config(config)
    k = _num_classes(config)
    labels = np.arange(n_grid, dtype=np.int32) % k if k else None
    # Split over this process's devices where they divide the grid, as runs.Run.make_sampler does
    # (a replicated output would have every device draw the whole grid); with several processes
    # replicated, so that every process gets the whole grid.
    grid_split = data.batch_sharding(n_grid)

    @functools.partial(jax.jit, out_shardings=par.replicated if grid_split is None else grid_split)
    def sample_grid(ema_params, sched, key):
        fn = make_model_fn(model.apply, ema_params, time_input=config.model.time_input, num_steps=sched.num_steps)
        return sampling.sample(fn, sched, (n_grid,) + image_shape, key, labels=labels, **opts)

    return sample_grid


def _num_classes(config) -> int:
    return int(config.model.get("num_classes", 0))


def _check_labels(config, splits) -> None:
    """A class-conditional config needs the data's labels in 0..model.num_classes − 1."""
    k = _num_classes(config)
    if k and splits.train_labels.size and not 0 <= int(splits.train_labels.min()) <= int(splits.train_labels.max()) < k:
        raise ConfigError(f"config.model.num_classes = {k}, but the training labels of {config.data.name} run "
                          f"{int(splits.train_labels.min())}..{int(splits.train_labels.max())}: set it to the number of classes")


def _set_up(config, workdir: str, arrays, restore_step: Optional[int]) -> _Run:
    """Refuses an incompatible workdir, then loads the data, builds everything and restores."""
    t_begin = time.time()
    cfg_dict = config.to_dict()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
        check_resume_compatible(read_config_json(workdir), cfg_dict, workdir)

    d = config.data
    splits = data.splits_from_config(config, arrays=arrays)
    batch_size = config.train.batch_size
    spe = data.steps_per_epoch(splits.train.shape[0], batch_size)
    total_steps = config.train.num_steps if config.train.num_steps > 0 else config.train.num_epochs * spe
    _check_labels(config, splits)
    log(f"data: {d.source} {d.name} train {splits.train.shape} val {splits.val.shape} scale {d.scale} "
        f"({time.time() - t_begin:.1f}s); {spe} steps/epoch, {total_steps} steps")

    image_shape = splits.image_shape
    model, params, step_cfg, par = _build_step(config, image_shape, spe)
    _, train_key, sample_key, eval_key = rng.run_keys(config.seed)
    state = create_train_state(params, step_cfg.tx, train_key, t_history=_empty_history(config),
                               ema_track_keys=[k for k, _ in step_cfg.ema_track_gammas])
    # jit: restore straight into the replicated (global, with several hosts) layout; pmap: on the host.
    state = par.put_state(state) if par.mode == "jit" else state
    if jax.process_index() == 0:  # room for at least one more checkpoint, before anything is compiled or trained
        state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
        check_writable(workdir, "--workdir", need_bytes=state_bytes + 2**20)
    state, start, ckpt, meta = restore(config, workdir, ckpt_dir, state, restore_step)
    state, tracks_start = _fit_options(config, step_cfg, state, start, meta)
    _log_layout(par, batch_size, meta)
    if start > total_steps:
        ckpt.close()
        raise ConfigError(f"{workdir} holds a checkpoint at step {start}, past this run's last step {total_steps}: "
                          "raise config.train.num_steps (or num_epochs), or resume an earlier step with --restore_step")
    if jax.process_index() == 0:
        write_config_json(workdir, cfg_dict)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    dropped = writer.resume_at(start)
    if dropped:
        log(f"metrics.jsonl: dropped {dropped} row(s) after step {start} (the part of the earlier run that is being redone)")
    schedule = schedule_from_config(config)
    train_arrays = {"image": splits.train, "label": splits.train_labels} if _num_classes(config) else splits.train
    iterator = data.BatchIterator(train_arrays, batch_size, seed=config.seed, start_step=start,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  random_flip=d.get("random_flip", False))
    return _Run(config=config, workdir=workdir, splits=splits,
                schedule=par.put_replicated(schedule) if par.mode == "jit" else schedule, par=par, ckpt=ckpt,
                writer=writer, iterator=iterator, steps_per_epoch=spe, total_steps=total_steps, step=start,
                state=par.put_state(state), sample_grid=_make_grid_sampler(config, model, image_shape, par),
                sample_key=sample_key, eval_key=eval_key, wall_before=float(meta.get("wall_seconds", 0.0)),
                t_begin=t_begin, ema_tracks_start=tracks_start)


def _empty_history(config):
    if train_option(config, "t_sampling") != "importance":
        return None
    return timestep_sampling.init_history(int(config.schedule.num_steps), int(train_option(config, "t_importance_history")))


def _fit_options(config, step_cfg: StepConfig, state, start: int, meta: Dict[str, Any]):
    """The restored state with the optional parts this config asks for: a checkpoint trained
    without the importance history or a tracked power EMA gets them here (the history empty, so
    t is uniform until it fills; the power EMAs all starting from the params at this step, which
    ``ddpm_jax.ema`` accounts for exactly), and parts the config no longer asks for are dropped.
    Returns (state, the step the tracked power EMAs started at, or None)."""
    empty = _empty_history(config)
    history = state.t_history
    if empty is None:
        history = None
    elif history is None or tuple(history.terms.shape) != tuple(empty.terms.shape):
        if start:
            log(f"t sampling 'importance': the loss history starts empty at step {start} (uniform t until it fills)")
        history = empty
    keys = [k for k, _ in step_cfg.ema_track_gammas]
    if not keys:
        return state.replace(t_history=history, ema_tracks=None), None
    if state.ema_tracks is not None and set(keys) <= set(state.ema_tracks):
        return state.replace(t_history=history, ema_tracks={k: state.ema_tracks[k] for k in keys}), int(meta.get("ema_tracks_start", 0))
    # one snapshot holds tracks of one start: a new σ_rel restarts them all here
    if start:
        log(f"power EMAs {', '.join(keys)}: tracked from step {start}, starting from the params")
    return state.replace(t_history=history, ema_tracks={k: jax.tree_util.tree_map(jnp.copy, state.params) for k in keys}), start


# ------------------------------------------------------------------------------------------------
# Periodic actions
# ------------------------------------------------------------------------------------------------


class _StepLog:
    """Collects the steps' device metrics and, every ``train.log_every_steps`` steps, fetches them
    in one transfer, writes a metrics row and counts steps with a non-finite loss or gradient."""

    def __init__(self, run: _Run, bar):
        self.run, self.bar = run, bar
        self.pending: List[Dict[str, Any]] = []
        self.bad_streak = self.bad_total = 0
        self.t, self.n = time.time(), 0

    def add(self, metrics) -> None:
        self.pending.append(metrics)
        self.n += 1

    def pause(self, seconds: float) -> None:
        """Leaves ``seconds`` (an evaluation, a grid) out of images/s."""
        self.t += seconds

    def flush(self) -> bool:
        """Writes the row; True when ``train.max_nonfinite_steps`` steps in a row were non-finite."""
        run = self.run
        fetched, self.pending = jax.device_get(self.pending), []
        good = [m for m in fetched if m["finite"]]
        too_many = False
        for m in fetched:
            self.bad_streak = 0 if m["finite"] else self.bad_streak + 1
            too_many |= self.bad_streak >= run.config.train.max_nonfinite_steps
        self.bad_total += len(fetched) - len(good)
        run.last_train = float(np.mean([m["loss"] for m in good])) if good else math.nan
        dt = time.time() - self.t
        ips = self.n * run.batch_size / dt if dt > 0 else math.nan
        self.t, self.n = time.time(), 0
        run.writer.write(run.step, {"train/loss": run.last_train,
                                    "train/grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else math.nan,
                                    "train/images_per_sec": ips, "train/epoch": run.step / run.steps_per_epoch,
                                    "train/wall_seconds": run.wall_seconds(), "train/nonfinite_steps": self.bad_total})
        self.bar.set_postfix(loss=f"{run.last_train:.4g}", img_s=f"{ips:.0f}", epoch=f"{run.step / run.steps_per_epoch:.2f}")
        return too_many


def _evaluate(run: _Run, state) -> Dict[str, float]:
    """Validation loss of the params and of their EMA (fixed keys), written as a metrics row."""
    out = {}
    if run.splits.val.shape[0]:
        for name, params in (("val/loss", state.params), ("val/loss_ema", state.ema_params)):
            out[name] = run.par.evaluate(params, run.schedule, run.splits.val, run.eval_key, run.batch_size,
                                         labels=run.splits.val_labels if _num_classes(run.config) else None)
        run.writer.write(run.step, out)
    return out


def _write_grid(run: _Run, state, name: str, title: str) -> Optional[str]:
    """A sample grid PNG from the EMA params (the same noise every time)."""
    x = np.asarray(run.sample_grid(state.ema_params, run.schedule, run.sample_key))  # gathers every device's part
    if run.is_main:
        return plots.save_image_grid(data.unscale_images(x, run.config.data.scale),
                                     os.path.join(run.workdir, "samples", name), title=title)
    return None


def _save_loss_curve(run: _Run) -> None:
    if run.is_main:
        plots.save_loss_curve(read_metrics(run.workdir), os.path.join(run.workdir, "loss_curve.png"))


def _end_of_epoch(run: _Run, bar) -> None:
    """Evaluation and sample grid when their epoch intervals say so; the loss curve."""
    epoch = run.step // run.steps_per_epoch
    t = run.config.train
    plain = run.par.get_state(run.state)
    if t.eval_every_epochs and epoch % t.eval_every_epochs == 0:
        run.last_eval = _evaluate(run, plain)
        bar.write(f"epoch {epoch}: train loss {run.last_train:.4f}, " +
                  ", ".join(f"{k} {v:.4f}" for k, v in run.last_eval.items()))
    if t.sample_every_epochs and epoch % t.sample_every_epochs == 0:
        _write_grid(run, plain, f"epoch_{epoch:04d}.png", f"epoch {epoch}, step {run.step} (EMA params)")
    _save_loss_curve(run)


# ------------------------------------------------------------------------------------------------
# Stopping
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# The loop and the finish
# ------------------------------------------------------------------------------------------------


def _loop(run: _Run, progress: bool) -> None:
    """Trains from ``run.step`` to ``run.total_steps`` or a stop; always leaves a checkpoint of
    the last step (except after non-finite steps, or when a write failed)."""
    from tqdm.auto import tqdm

    t = run.config.train
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", dynamic_ncols=True,
               disable=not (progress and run.is_main), file=sys.stderr, desc="train")
    steps = _StepLog(run, bar)
    window = platform_profile.dispatch_window()  # no all-reduce deadlock on XLA:CPU
    write_failed = False
    with StopSignals() as stop:
        try:
            while run.step < run.total_steps:
                batch = run.par.put_batch(run.iterator.batch(run.step))
                run.state, metrics = run.par.train(run.state, run.schedule, batch)
                window.add(metrics["loss"])
                steps.add(metrics)
                run.step += 1
                bar.update(1)
                run.stopped_by = stop.requested(run.step)
                if run.step % t.log_every_steps == 0 or run.step == run.total_steps or run.stopped_by:
                    if steps.flush():
                        run.stopped_by = "nonfinite"
                        break
                if run.step % run.steps_per_epoch == 0 and run.step < run.total_steps:
                    t0 = time.time()
                    _end_of_epoch(run, bar)
                    steps.pause(time.time() - t0)  # images/s counts training time only
                if run.step % run.config.checkpoint.every_steps == 0:
                    run.save()
                if run.stopped_by:
                    break
        except OSError:  # a full disk or lost permissions: no final save, the earlier checkpoints stand
            write_failed = True
            raise
        finally:
            bar.close()
            if write_failed:
                _abandon(run)
            else:
                if run.ckpt.latest_step() != run.step and run.stopped_by != "nonfinite":
                    run.save(force=True)
                run.ckpt.wait()
    if run.stopped_by == "nonfinite":
        run.close()
        raise NonFiniteError(
            f"stopped at step {run.step}: {steps.bad_streak} steps in a row had a NaN/Inf loss or gradient "
            f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); their updates were skipped and nothing was saved, so "
            f"the last checkpoint (step {run.ckpt.latest_step()}) is intact. Lower optim.learning_rate, set "
            "optim.grad_clip_norm, or check the data for NaNs")


def _abandon(run: _Run) -> None:
    """After an output failed to be written: ends the writers (a save still in flight included)
    without a second error, and removes any unfinished checkpoint, leaving the complete ones."""
    with contextlib.suppress(Exception):
        run.writer.close()
    with contextlib.suppress(Exception):
        run.ckpt.close()
    if run.is_main:
        remove_partial_checkpoints(run.ckpt.directory)


PROVENANCE_FILE = "provenance.jsonl"


def _record_provenance(run: _Run) -> None:
    """Appends one line per command to ``workdir/provenance.jsonl``: the step it reached, how it
    ended, the run's training wall seconds so far, and the command's provenance (command line,
    commit, machine, versions, this command's wall time)."""
    if not run.is_main:
        return
    row = {"step": run.step, "stopped_by": run.stopped_by, "train_wall_seconds": round(run.wall_seconds(), 3),
           **provenance.record()}
    try:
        with open(os.path.join(run.workdir, PROVENANCE_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # the checkpoint and metrics are what matter; say so and go on
        log(f"warning: could not append to {PROVENANCE_FILE}: {e}")


def _finish(run: _Run) -> Dict[str, Any]:
    """After the loop: a stopped run says how to resume; a finished one gets its final
    evaluation, grid and loss curve."""
    if run.stopped_by:
        log(f"stopped by {run.stopped_by} at step {run.step}: checkpoint saved in {run.ckpt.directory}; "
            "run the same command to resume")
    else:
        final = run.par.get_state(run.state)
        run.last_eval = _evaluate(run, final) or run.last_eval
        grid = _write_grid(run, final, "final.png", f"final, step {run.step} (EMA params)")
        _save_loss_curve(run)
        log(f"done: step {run.step}, train loss {run.last_train:.4f}" +
            "".join(f", {k} {v:.4f}" for k, v in run.last_eval.items()))
        log(f"outputs in {run.workdir}: checkpoints/ (latest step {run.ckpt.latest_step()}), metrics.jsonl, tb/, "
            f"loss_curve.png, samples/ (final grid: {grid})")
    _record_provenance(run)
    run.close()
    return run.summary(run.stopped_by)

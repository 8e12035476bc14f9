"""The training loop: ``train_and_evaluate(config, workdir)``.

Everything a run does happens here, in order: validate the config, check the workdir, load the
data, build schedule/model/optimiser, restore the latest checkpoint if there is one, then train
with a progress bar, logging metrics, evaluating on the validation split and drawing a sample
grid from the EMA params each epoch, checkpointing every N steps, at the end, and on Ctrl-C or
SIGTERM. Outputs (only process 0 writes):

    workdir/config.json  metrics.jsonl  tb/  checkpoints/  samples/epoch_XXXX.png  samples/final.png
    workdir/loss_curve.png
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import data, objectives, platform_profile, plots, sampling, schedules
from ddpm_jax.checkpointing import (Checkpointer, CheckpointError, read_config_json, remove_partial_checkpoints,
                                    write_config_json)
from ddpm_jax.config import ConfigError, schedule_from_config, validate_config
from ddpm_jax.files import check_writable
from ddpm_jax.workdir import WorkdirBusyError, WorkdirLock, prepare_workdir, set_aside
from ddpm_jax.models import count_params, describe_model, make_model_fn, model_from_config
from ddpm_jax.train_state import create_train_state, make_optimizer
from ddpm_jax.train_step import Parallel, StepConfig
from ddpm_jax.writers import MetricWriter, read_metrics

__all__ = ["train_and_evaluate", "prepare_workdir", "build_schedule", "build_model", "RESUME_MUST_MATCH", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient; the run stopped without saving."""

#: Config keys that must agree between a run and the checkpoints it resumes from.
RESUME_MUST_MATCH = (
    "seed", "data.source", "data.name", "data.scale", "data.train_size", "data.val_size",
    "data.random_flip", "schedule", "model.name", "model.preset", "model.embed_dim", "model.num_groups",
    "model.fourier_scale", "model.rho_head", "model.time_input", "model.ch", "model.ch_mult",
    "model.num_res_blocks", "model.attn_resolutions", "model.dropout", "objective", "optim", "train.batch_size",
)  # not model.conv_impl: how the convolutions are computed does not change the parameters

#: What a key absent from an older run's config.json meant.
RESUME_DEFAULTS = {"model.name": "scorenet", "data.random_flip": False}


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _get(d: Dict[str, Any], dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _resume_value(cfg: Dict[str, Any], dotted: str):
    """``cfg``'s value at ``dotted`` as JSON gives it back (tuples as lists), or its default."""
    value = _get(cfg, dotted)
    if value is None:
        value = RESUME_DEFAULTS.get(dotted)
    return json.loads(json.dumps(value))


def _check_resume_compatible(saved: Optional[Dict[str, Any]], current: Dict[str, Any], workdir: str) -> None:
    if saved is None:
        return
    diffs = [k for k in RESUME_MUST_MATCH if _resume_value(saved, k) != _resume_value(current, k)]
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with config.{k} = {_resume_value(saved, k)!r}, but this run has "
            f"{_resume_value(current, k)!r}; use a new --workdir (or the same config) — nothing was overwritten"
        )


def build_schedule(config) -> schedules.Schedule:
    """The config's schedule (the schedule section's entries that ``schedule.name`` takes)."""
    return schedule_from_config(config)


def build_model(config, image_shape):
    """The network of ``config.model`` (either family, by ``model.name``) for images ``(H, W, C)``."""
    return model_from_config(config.model, image_shape)


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT/SIGTERM set a flag the loop checks after each step (so the state is never caught
    half-updated); a second SIGINT raises KeyboardInterrupt at once."""
    flag = {"stop": None}

    def handler(signum, frame):
        if flag["stop"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    old = {}
    in_main_thread = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals cannot be handled here
            in_main_thread = False
    try:
        yield flag
    finally:
        if in_main_thread:
            for sig, h in old.items():
                signal.signal(sig, h)


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
    lock = _lock_workdir(workdir)
    try:
        return _train_and_evaluate(config, workdir, arrays=arrays, progress=progress, restore_step=restore_step)
    finally:
        if lock is not None:
            lock.release()


def _lock_workdir(workdir: str) -> Optional[WorkdirLock]:
    """Process 0 locks the workdir; with several processes the outcome is broadcast, so that
    either all of them go on or all raise."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except ConfigError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirBusyError(f"{workdir} is in use by another trainer (process 0 could not lock it)")
    if error is not None:
        raise error
    return lock


def _sync(name: str) -> None:
    """All processes wait here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _restore(config, workdir: str, ckpt_dir: str, state, restore_step: Optional[int]):
    """(state, start step, Checkpointer, meta): the run's checkpoints opened, unfinished saves
    removed, and the newest checkpoint that restores (or ``restore_step``) loaded into ``state``
    (``meta``: its metadata, ``{}`` for a fresh run).

    Checkpoints that fail to restore, and with ``restore_step`` the newer ones, are moved to
    ``checkpoints_set_aside/`` (one line each says which and where); nothing is deleted."""
    is_main = jax.process_index() == 0
    if is_main:
        for path in remove_partial_checkpoints(ckpt_dir):
            _log(f"removed {path}: an unfinished save of an interrupted run")
    _sync("removed_partial_checkpoints")
    ckpt = Checkpointer(ckpt_dir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep)
    steps = ckpt.all_steps()
    if restore_step is not None and restore_step not in steps:
        ckpt.close()
        raise CheckpointError(f"--restore_step={restore_step}: {ckpt_dir} has no checkpoint of that step "
                              f"(it has: {', '.join(map(str, steps)) or 'none'})")
    if not steps:
        return state, 0, ckpt, {}
    damaged = {}
    if restore_step is not None:
        state, meta = ckpt.restore(state, restore_step)
        start = restore_step
    else:
        state, meta, start, damaged = ckpt.restore_newest(state)
    moves = [(s, "damaged") for s in sorted(damaged)] + [(s, f"after-step-{start}") for s in steps if s > start and s not in damaged]
    if is_main:
        for s, reason in moves:
            dest = set_aside(workdir, ckpt_dir, s, reason)
            why = f"cannot be restored ({_reason(damaged[s])})" if s in damaged else f"is newer than --restore_step={start}"
            _log(f"checkpoint step {s} {why}: moved to {dest}; resuming from step {start}")
    if moves:
        _sync("set_aside_checkpoints")
        ckpt.reload()
    _log(f"resumed from {ckpt_dir} at step {start} (epoch {meta.get('epoch')}, step-in-epoch {meta.get('step_in_epoch')})")
    return state, int(start), ckpt, meta


def _abandon(writer: MetricWriter, ckpt: Checkpointer, ckpt_dir: str, is_main: bool) -> None:
    """After an output failed to be written: ends the writers (a save still in flight included)
    without a second error, and removes any unfinished checkpoint, leaving the complete ones."""
    with contextlib.suppress(Exception):
        writer.close()
    with contextlib.suppress(Exception):
        ckpt.close()
    if is_main:
        remove_partial_checkpoints(ckpt_dir)


def _reason(line: str) -> str:
    """A restore error without its 'cannot restore checkpoint step N from DIR: ' prefix."""
    return line.split(": ", 1)[1] if line.startswith("cannot restore") and ": " in line else line


def _train_and_evaluate(config, workdir: str, *, arrays, progress: bool, restore_step: Optional[int]) -> Dict[str, Any]:
    is_main = jax.process_index() == 0
    cfg_dict = config.to_dict()

    # Refuse an incompatible workdir before loading anything.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved_cfg = read_config_json(workdir)
    has_ckpt = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if has_ckpt:
        _check_resume_compatible(saved_cfg, cfg_dict, workdir)

    # Data.
    t0 = t_begin = time.time()
    d = config.data
    splits = data.splits_from_config(config, arrays=arrays)
    batch_size = config.train.batch_size
    data.check_batch_divisible(batch_size, jax.device_count())
    spe = data.steps_per_epoch(splits.train.shape[0], batch_size)
    total_steps = config.train.num_steps if config.train.num_steps > 0 else config.train.num_epochs * spe
    _log(f"data: {d.source} {d.name} train {splits.train.shape} val {splits.val.shape} scale {d.scale} "
         f"({time.time() - t0:.1f}s); {spe} steps/epoch, {total_steps} steps")

    # Schedule, model, optimiser, state.
    schedule = build_schedule(config)
    image_shape = splits.image_shape
    model = build_model(config, image_shape)
    root = jax.random.PRNGKey(config.seed)
    init_key, train_key, sample_key, eval_key = jax.random.split(root, 4)
    params = jax.jit(model.init)(init_key, jnp.zeros((1,) + image_shape), jnp.ones((1,)))["params"]
    total, trainable = count_params(params)
    _log(f"model: {describe_model(config.model)} "
         f"params={total:,} (trainable {trainable:,}); objective={config.objective.name} "
         f"({config.objective.weighting}, {config.objective.reduction}); T={schedule.num_steps}")
    tx = make_optimizer(config.optim, steps_per_epoch=spe, params=params)
    loss_fn = objectives.get_objective(config.objective.name, weighting=config.objective.weighting,
                                       reduction=config.objective.reduction)
    step_cfg = StepConfig(apply_fn=model.apply, loss_fn=loss_fn, tx=tx, ema_decay=config.train.ema_decay,
                          time_input=config.model.time_input)
    par = Parallel(step_cfg, mode=config.train.parallel)
    _log(f"devices: {jax.device_count()} x {jax.devices()[0].platform} ({par.mode}), "
         f"{jax.process_count()} process(es); global batch {batch_size}")
    state = create_train_state(params, tx, train_key)
    # jit: restore straight into the replicated (global, with several hosts) layout; pmap: on the host.
    state = par.put_state(state) if par.mode == "jit" else state

    if is_main:  # room for at least one more checkpoint, before anything is compiled or trained
        state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
        check_writable(workdir, "--workdir", need_bytes=state_bytes + 2**20)
    state, start, ckpt, start_meta = _restore(config, workdir, ckpt_dir, state, restore_step)
    # Wall seconds of training up to a step: this command's, from data loading on (compilation,
    # evaluations and grids included), plus the earlier commands' up to the resumed step.
    wall_before = float(start_meta.get("wall_seconds", 0.0))

    def wall_seconds():
        return wall_before + time.time() - t_begin

    if start > total_steps:
        ckpt.close()
        raise ConfigError(f"{workdir} holds a checkpoint at step {start}, past this run's last step {total_steps}: "
                          "raise config.train.num_steps (or num_epochs), or resume an earlier step with --restore_step")
    if is_main:
        write_config_json(workdir, cfg_dict)
    writer = MetricWriter(workdir, enabled=is_main)
    dropped = writer.resume_at(start)
    if dropped:
        _log(f"metrics.jsonl: dropped {dropped} row(s) after step {start} (the part of the earlier run that is being redone)")
    if start == total_steps and os.path.exists(os.path.join(workdir, "samples", "final.png")):
        _log(f"{workdir} is already complete at step {start} (train.num_steps / num_epochs): nothing to train; "
             "raise train.num_steps or num_epochs to train further")
        writer.close()
        ckpt.close()
        return {"step": start, "train_loss": math.nan, "val_loss": math.nan, "val_loss_ema": math.nan,
                "workdir": workdir, "stopped_by": "complete"}

    # Sampler for the grids: one compiled lax.scan, EMA params, fixed noise across epochs.
    n_grid = config.train.num_grid_samples
    param_kind = objectives.PREDICTS[config.objective.name]
    # Split over this process's devices where they divide the grid, as runs.Run.make_sampler does
    # (a replicated output would have every device draw the whole grid); with several processes
    # replicated, so that every process gets the whole grid.
    grid_split = data.batch_sharding(n_grid)

    @functools.partial(jax.jit, out_shardings=par.replicated if grid_split is None else grid_split)
    def sample_grid(ema_params, sched, key):
        fn = make_model_fn(model.apply, ema_params, time_input=config.model.time_input, num_steps=sched.num_steps)
        return sampling.sample(fn, sched, (n_grid,) + image_shape, key, method=config.sampling.method,
                               num_steps=config.sampling.get("num_steps", 0) or None, eta=config.sampling.get("eta", 0.0),
                               grid=config.sampling.get("grid", "") or None,
                               ddpm_variance=config.sampling.ddpm_variance, parameterisation=param_kind,
                               clip_x0=data.data_range(d.scale) if config.sampling.clip_x0 else None)

    samples_dir = os.path.join(workdir, "samples")

    def write_grid(st, name, title):
        x = np.asarray(sample_grid(st.ema_params, schedule, sample_key))  # gathers every device's part
        if is_main:
            path = plots.save_image_grid(data.unscale_images(x, d.scale), os.path.join(samples_dir, name), title=title)
            return path

    def evaluate(st, step):
        out = {}
        if splits.val.shape[0]:
            out["val/loss"] = par.evaluate(st.params, schedule, splits.val, eval_key, batch_size)
            out["val/loss_ema"] = par.evaluate(st.ema_params, schedule, splits.val, eval_key, batch_size)
            writer.write(step, out)
        return out

    def meta_for(step):
        return {"step": int(step), "epoch": int(step // spe), "step_in_epoch": int(step % spe), "steps_per_epoch": spe,
                "image_shape": list(image_shape), "wall_seconds": round(wall_seconds(), 3)}

    iterator = data.BatchIterator(splits.train, batch_size, seed=config.seed, start_step=start,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  random_flip=config.data.get("random_flip", False))
    state_dev = par.put_state(state)
    del state
    last_train, last_eval = float("nan"), {}
    stopped_by = None
    max_bad = config.train.max_nonfinite_steps
    bad_streak, bad_total = 0, 0  # steps skipped for a non-finite loss/gradient: in a row, in all
    pending = []
    window = platform_profile.dispatch_window()  # no all-reduce deadlock on XLA:CPU
    t_log, n_log = time.time(), 0
    log_every = config.train.log_every_steps

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True, disable=not (progress and is_main),
               file=sys.stderr, desc="train")
    step = start
    write_failed = False
    with _stop_on_signals() as flag:
        try:
            while step < total_steps:
                batch = par.put_batch(iterator.batch(step))
                state_dev, metrics = par.train(state_dev, schedule, batch)
                window.add(metrics["loss"])
                pending.append(metrics)
                step += 1
                n_log += 1
                bar.update(1)
                if step % log_every == 0 or step == total_steps or flag["stop"]:
                    fetched = jax.device_get(pending)
                    pending = []
                    good = [m for m in fetched if m["finite"]]
                    for m in fetched:
                        bad_streak = 0 if m["finite"] else bad_streak + 1
                        if bad_streak >= max_bad:
                            stopped_by = "nonfinite"
                    bad_total += len(fetched) - len(good)
                    last_train = float(np.mean([m["loss"] for m in good])) if good else float("nan")
                    dt = time.time() - t_log
                    ips = n_log * batch_size / dt if dt > 0 else float("nan")
                    t_log, n_log = time.time(), 0
                    writer.write(step, {"train/loss": last_train,
                                        "train/grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else float("nan"),
                                        "train/images_per_sec": ips, "train/epoch": step / spe,
                                        "train/wall_seconds": wall_seconds(),
                                        "train/nonfinite_steps": bad_total})
                    if stopped_by == "nonfinite":
                        break
                    bar.set_postfix(loss=f"{last_train:.4g}", img_s=f"{ips:.0f}", epoch=f"{step / spe:.2f}")
                if step % spe == 0 and step < total_steps:
                    t_epoch_end = time.time()
                    epoch = step // spe
                    plain = par.get_state(state_dev)
                    if config.train.eval_every_epochs and epoch % config.train.eval_every_epochs == 0:
                        last_eval = evaluate(plain, step)
                        bar.write(f"epoch {epoch}: train loss {last_train:.4f}, " +
                                  ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                    if config.train.sample_every_epochs and epoch % config.train.sample_every_epochs == 0:
                        write_grid(plain, f"epoch_{epoch:04d}.png", f"epoch {epoch}, step {step} (EMA params)")
                    if is_main:
                        plots.save_loss_curve(read_metrics(workdir), os.path.join(workdir, "loss_curve.png"))
                    t_log += time.time() - t_epoch_end  # images/s counts training time only
                if step % config.checkpoint.every_steps == 0:
                    ckpt.save(step, par.get_state(state_dev), meta_for(step))
                if flag["stop"]:
                    stopped_by = flag["stop"]
                    break
        except OSError:  # a full disk or lost permissions: no final save, the earlier checkpoints stand
            write_failed = True
            raise
        finally:
            bar.close()
            final = par.get_state(state_dev)
            if not write_failed:
                if ckpt.latest_step() != step and stopped_by != "nonfinite":
                    ckpt.save(step, final, meta_for(step), force=True)
                ckpt.wait()
            else:
                _abandon(writer, ckpt, ckpt_dir, is_main)
    if stopped_by == "nonfinite":
        writer.close()
        ckpt.close()
        raise NonFiniteError(
            f"stopped at step {step}: {bad_streak} steps in a row had a NaN/Inf loss or gradient "
            f"(train.max_nonfinite_steps={max_bad}); their updates were skipped and nothing was saved, so the "
            f"last checkpoint (step {ckpt.latest_step()}) is intact. Lower optim.learning_rate, set "
            "optim.grad_clip_norm, or check the data for NaNs")
    if stopped_by:
        _log(f"stopped by {stopped_by} at step {step}: checkpoint saved in {ckpt_dir}; run the same command to resume")
    else:
        last_eval = evaluate(final, step) or last_eval
        grid = write_grid(final, "final.png", f"final, step {step} (EMA params)")
        if is_main:
            plots.save_loss_curve(read_metrics(workdir), os.path.join(workdir, "loss_curve.png"))
        _log(f"done: step {step}, train loss {last_train:.4f}" +
             "".join(f", {k} {v:.4f}" for k, v in last_eval.items()))
        _log(f"outputs in {workdir}: checkpoints/ (latest step {ckpt.latest_step()}), metrics.jsonl, tb/, "
             f"loss_curve.png, samples/ (final grid: {grid})")
    writer.close()
    ckpt.close()
    return {"step": step, "train_loss": last_train, "val_loss": last_eval.get("val/loss", math.nan),
            "val_loss_ema": last_eval.get("val/loss_ema", math.nan), "workdir": workdir, "stopped_by": stopped_by}

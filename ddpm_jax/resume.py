"""What a training run continues from: the workdir lock (agreed by every process), the check that
a workdir's checkpoints belong to this config, and the restore of the newest checkpoint that
loads, with damaged or unwanted ones moved aside (never deleted)."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import jax
import numpy as np

from ddpm_jax.checkpointing import Checkpointer, CheckpointError, remove_partial_checkpoints
from ddpm_jax.config import ConfigError, lookup
from ddpm_jax.workdir import WorkdirBusyError, WorkdirLock, set_aside

__all__ = ["RESUME_MUST_MATCH", "RESUME_DEFAULTS", "check_resume_compatible", "lock_workdir", "sync", "restore", "log"]

#: Config keys that must agree between a run and the checkpoints it resumes from.
RESUME_MUST_MATCH = (
    "seed", "data.source", "data.name", "data.scale", "data.train_size", "data.val_size",
    "data.random_flip", "schedule", "model.name", "model.preset", "model.embed_dim", "model.num_groups",
    "model.fourier_scale", "model.rho_head", "model.time_input", "model.ch", "model.ch_mult",
    "model.num_res_blocks", "model.attn_resolutions", "model.dropout", "model.num_classes", "objective", "optim",
    "train.batch_size", "train.label_dropout",
)  # not model.conv_impl, model.dtype or train.grad_accum_steps: they change how the step is computed,
#    not the parameters or the update it stands for

#: What a key absent from an older run's config.json meant.
RESUME_DEFAULTS = {"model.name": "scorenet", "data.random_flip": False, "model.num_classes": 0, "train.label_dropout": 0.0}


def log(msg: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _resume_value(cfg: Dict[str, Any], dotted: str):
    """``cfg``'s value at ``dotted`` as JSON gives it back (tuples as lists), or its default."""
    value = lookup(cfg, dotted, None)
    if value is None:
        value = RESUME_DEFAULTS.get(dotted)
    return json.loads(json.dumps(value))


def check_resume_compatible(saved: Optional[Dict[str, Any]], current: Dict[str, Any], workdir: str) -> None:
    """Raises ConfigError (one line, the first key) if ``saved`` (the workdir's config.json)
    differs from ``current`` in a key of :data:`RESUME_MUST_MATCH`."""
    if saved is None:
        return
    diffs = [k for k in RESUME_MUST_MATCH if _resume_value(saved, k) != _resume_value(current, k)]
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with config.{k} = {_resume_value(saved, k)!r}, but this run has "
            f"{_resume_value(current, k)!r}; use a new --workdir (or the same config) — nothing was overwritten"
        )


def lock_workdir(workdir: str) -> Optional[WorkdirLock]:
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


def sync(name: str) -> None:
    """All processes wait here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _reason(line: str) -> str:
    """A restore error without its 'cannot restore checkpoint step N from DIR: ' prefix."""
    return line.split(": ", 1)[1] if line.startswith("cannot restore") and ": " in line else line


def restore(config, workdir: str, ckpt_dir: str, state, restore_step: Optional[int]):
    """(state, start step, Checkpointer, meta): the run's checkpoints opened, unfinished saves
    removed, and the newest checkpoint that restores (or ``restore_step``) loaded into ``state``
    (``meta``: its metadata, ``{}`` for a fresh run).

    Checkpoints that fail to restore, and with ``restore_step`` the newer ones, are moved to
    ``checkpoints_set_aside/`` (one line each says which and where); nothing is deleted."""
    is_main = jax.process_index() == 0
    if is_main:
        for path in remove_partial_checkpoints(ckpt_dir):
            log(f"removed {path}: an unfinished save of an interrupted run")
    sync("removed_partial_checkpoints")
    ckpt = Checkpointer(ckpt_dir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep)
    steps = ckpt.all_steps()
    if restore_step is not None and restore_step not in steps:
        ckpt.close()
        raise CheckpointError(f"--restore_step={restore_step}: {ckpt_dir} has no checkpoint of that step "
                              f"(it has: {', '.join(map(str, steps)) or 'none'})")
    if not steps:
        return state, 0, ckpt, {}
    damaged = {}
    from ddpm_jax.train_state import fit_to_saved  # noqa: PLC0415

    fresh = state
    state = lambda saved: fit_to_saved(fresh, saved)  # noqa: E731  # whatever options the checkpoint was trained with
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
            log(f"checkpoint step {s} {why}: moved to {dest}; resuming from step {start}")
    if moves:
        sync("set_aside_checkpoints")
        ckpt.reload()
    log(f"resumed from {ckpt_dir} at step {start} (epoch {meta.get('epoch')}, step-in-epoch {meta.get('step_in_epoch')})")
    return state, int(start), ckpt, meta

"""Orbax checkpoints of the training state, with the run's metadata beside them.

Layout of a workdir:

    workdir/config.json             the run's config (written once, compared on resume)
    workdir/checkpoints/<step>/     state (params, opt_state, ema_params, step, rng) + meta JSON

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact and resumes from the last complete one.
The data position is the step itself (batches are a function of (seed, step)); ``meta`` records
it as (epoch, step-in-epoch) for humans.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import sys
import threading
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from ddpm_jax import platform_profile
from ddpm_jax.files import OutputError, write_json

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatchError", "CheckpointWriteError", "async_save_is_safe",
           "write_config_json", "read_config_json", "remove_partial_checkpoints"]

#: Orbax's suffix for a checkpoint directory still being written.
PARTIAL_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored into this run (different model, or corrupt)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's arrays cannot be this model's: it belongs to another run, not a damaged one."""


class CheckpointWriteError(OutputError):
    """A checkpoint could not be written (full disk, permissions); the partial one is removed."""


def write_config_json(workdir: str, config_dict: Dict[str, Any]) -> str:
    """Writes ``workdir/config.json`` atomically (a reader sees the old file or the new one)."""
    return write_json(os.path.join(workdir, "config.json"), config_dict, indent=2, sort_keys=True, default=str)


def read_config_json(workdir: str) -> Optional[Dict[str, Any]]:
    """The run's saved config as a dict, None if there is none; CheckpointError (one line) if
    the file is not valid JSON."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from a copy or use a new --workdir") from None


def async_save_is_safe() -> bool:
    """False under the CPU profile with several local CPU devices (``ddpm_jax.platform_profile``), True otherwise.

    There, Orbax's background save running beside the training step deadlocks XLA:CPU: the step's
    gradient all-reduce waits for a device whose thread never joins, and XLA aborts the process
    after 40 s ("Termination timeout for all reduce ... of 40 seconds exceeded"). A synchronous
    save of this project's states takes well under a second, so there the saves are synchronous.
    """
    return platform_profile.async_checkpoints()


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps the last ``keep``.

    Args:
      directory: where checkpoints go (created if missing).
      every_steps: save interval; ``save(step, ..., force=True)`` saves regardless.
      keep: how many recent checkpoints to keep.
      async_save: write in the background while training goes on. Default (None):
        :func:`async_save_is_safe`.

    A save that fails (full disk, permissions) raises :class:`CheckpointWriteError` with one line
    and leaves no partial directory; :meth:`restore_newest` falls back past damaged checkpoints.
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: Optional[bool] = None):
        _quiet_orbax_failure_noise()
        self.directory = os.path.abspath(directory)
        self.async_save = async_save_is_safe() if async_save is None else bool(async_save)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps, create=True,
                                               enable_async_checkpointing=self.async_save)
        # The handlers named up front (not only learnt from the first save or restore), so that the
        # saved arrays' metadata can be read before a restore (see _check_saved_shapes).
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return sorted(self._manager.all_steps())

    def reload(self) -> None:
        """Re-reads the directory (after checkpoints were moved away by hand or by ``set_aside``)."""
        self._manager.reload()

    def save(self, step: int, state, meta: Dict[str, Any], *, force: bool = False) -> bool:
        """Starts a save (in the background if ``async_save``); returns whether one was started.

        Raises:
          CheckpointWriteError: the save (or an earlier background one) failed; the unfinished
            directory is removed, the checkpoints before it are intact.
        """
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with self._write_errors(step):
            return self._manager.save(int(step), args=args, force=force)

    def restore(self, target, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
        """Restores ``step`` (default: the latest) into the structure, shapes and shardings of
        ``target`` (a state or its ``jax.eval_shape``, or a function of :meth:`saved_fields` that
        returns one). Raises :class:`CheckpointMismatchError`
        when the arrays cannot be this model's, :class:`CheckpointError` when the checkpoint
        cannot be read (damaged); each with one line naming the problem."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        saved = self.saved_fields(step)
        if callable(target):  # a target that depends on what the checkpoint holds
            target = target(saved)
        target, rebuild = _fields_saved(target, saved)
        abstract = jax.tree_util.tree_map(_with_sharding, target)
        self._check_saved_shapes(abstract, step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax raises several types for a tree/shape mismatch or a bad file
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.directory}: {_first_line(e)}") from e
        _check_shapes(restored.state, abstract, step, self.directory)
        return rebuild(restored.state), dict(restored.meta or {})

    def restore_newest(self, target) -> Tuple[Any, Dict[str, Any], int, Dict[int, str]]:
        """Restores the newest checkpoint that can be read, trying older ones past those that fail.
        A checkpoint of another model (:class:`CheckpointMismatchError`) stops the search at once:
        that is a wrong workdir, not damage.

        Returns:
          ``(state, meta, step, failed)``: the restored state and its step, and ``{step: line}``
          for the newer checkpoints that could not be read (left in place for the caller).

        Raises:
          CheckpointError: no checkpoint could be restored; the message gives the newest one's reason.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failed: Dict[int, str] = {}
        for step in reversed(steps):
            try:
                state, meta = self.restore(target, step)
            except CheckpointMismatchError:
                raise
            except CheckpointError as e:
                failed[step] = str(e)
                continue
            return state, meta, step, failed
        raise CheckpointError(f"none of the {len(steps)} checkpoints in {self.directory} can be restored "
                              f"(newest: {failed[steps[-1]]}); nothing was changed")

    def saved_fields(self, step: int) -> Dict[str, Any]:
        """The top level of the saved state's tree at ``step``: field name -> its subtree of array
        metadata (each leaf with ``shape`` and ``dtype``); ``{}`` when the metadata cannot be read."""
        try:
            tree = self._manager.item_metadata(step)["state"].tree
        except Exception:  # unreadable metadata: restore reports it
            return {}
        return dict(tree) if isinstance(tree, dict) else {}

    def _check_saved_shapes(self, abstract, step: int) -> None:
        """Raises :class:`CheckpointMismatchError` before any array is read when the checkpoint's
        array shapes (from Orbax's metadata; compared as a sorted list, so tree naming does not
        matter) cannot be this model's. A restore that fails part-way leaves Orbax's pending reads
        behind; this check keeps the common case, a checkpoint of another model, from starting
        one. No readable metadata: left to ``restore``."""
        try:
            tree = self._manager.item_metadata(step)["state"].tree
            saved = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda a: hasattr(a, "shape"))]
        except Exception:  # unreadable metadata: restore reports it
            return
        want = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract)]
        unmatched = sorted((collections.Counter(saved) - collections.Counter(want)).elements())
        if unmatched or len(saved) != len(want):
            example = f" (e.g. one of shape {unmatched[0]})" if unmatched else ""
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds {len(saved)} arrays that do not match this "
                f"model's {len(want)}{example}: {_OTHER_MODEL}")

    def read_meta(self, step: Optional[int] = None) -> Dict[str, Any]:
        """The metadata JSON saved with ``step`` (default: the latest), without the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint step {step} metadata in {self.directory}: {_first_line(e)}") from e
        return dict(restored.meta or {})

    def wait(self) -> None:
        """Waits for a background save; raises :class:`CheckpointWriteError` if it failed."""
        with self._write_errors(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _write_errors(self, step: Optional[int]):
        """Turns a failed save into one :class:`CheckpointWriteError` line and removes the
        unfinished checkpoint directories (the workdir lock guarantees no other writer), so the
        directory holds only complete checkpoints."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:
            with contextlib.suppress(Exception):  # let the save's other writes end before removing them
                self._manager.wait_until_finished()
            if jax.process_index() == 0:
                remove_partial_checkpoints(self.directory)
            what = f"checkpoint step {step}" if step is not None else "a checkpoint"
            raise CheckpointWriteError(_os_errno(e), f"cannot write {what} in {self.directory}: {_os_reason(e)}; "
                                       "the partial checkpoint was removed and the earlier ones are intact") from e


def remove_partial_checkpoints(checkpoint_dir: str) -> list:
    """Removes Orbax's unfinished checkpoint directories (``<step>.orbax-checkpoint-tmp*``) in
    ``checkpoint_dir``. Only safe while holding the workdir's lock (no other writer). Returns
    the removed paths."""
    if not os.path.isdir(checkpoint_dir):
        return []
    removed = [os.path.join(checkpoint_dir, n) for n in os.listdir(checkpoint_dir) if PARTIAL_SUFFIX in n]
    for path in removed:
        # A failed save's last writes (TensorStore's threads) can still land while the tree is
        # removed, leaving it non-empty: try again for up to ~2 s.
        for _ in range(20):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                break
            time.sleep(0.1)
    return removed


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause of ``e`` (Orbax wraps TensorStore's precise error,
    e.g. ``... Data corruption detected``, in generic ones), cut to ``limit`` characters."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_errno(e: BaseException) -> Optional[int]:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = _OS_ERROR_CODE.search(str(e))
    return int(m.group(1)) if m else None


def _os_reason(e: BaseException) -> str:
    """'No space left on device' for an OS error (Python's, or TensorStore's with its
    ``os_error_code``); otherwise the error's first line."""
    code = _os_errno(e)
    return os.strerror(code) if code else _first_line(e)


_NOISE = "Event loop is closed"
_quiet_installed = False


def _quiet_orbax_failure_noise() -> None:
    """Keeps a failed Orbax save or restore to the one line the entry points print.

    When one TensorStore read or write fails, Orbax closes its asyncio event loop while the other
    reads/writes are still in flight; each of them then reports ``RuntimeError: Event loop is
    closed`` from a TensorStore thread, and Orbax logs every failed write at ERROR with its
    traceback — hundreds of tracebacks for one full disk. Those reports repeat the failure that
    :class:`Checkpointer` already raises as one line, so they are dropped: the hooks below filter
    exactly that RuntimeError, and ERROR records that come from Orbax's own modules. Anything
    else passes through unchanged. Installed once per process."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True

    def is_noise(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == _NOISE

    def raised_in_orbax(tb) -> bool:
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        return False

    prev_except, prev_unraisable, prev_thread = sys.excepthook, sys.unraisablehook, threading.excepthook
    sys.excepthook = lambda t, v, tb: None if is_noise(v) else prev_except(t, v, tb)
    # an Orbax coroutine whose read or write failed, finalised after Orbax gave up on it
    sys.unraisablehook = lambda u: (None if is_noise(u.exc_value) or raised_in_orbax(u.exc_traceback)
                                    else prev_unraisable(u))
    threading.excepthook = lambda a: None if is_noise(a.exc_value) else prev_thread(a)

    class _OrbaxErrors(logging.Filter):
        def filter(self, record):
            if record.levelno < logging.ERROR:
                return True
            from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
            mentions_orbax = record.name == "asyncio" and (  # a failed read's Future, finalised unretrieved
                "orbax" in record.getMessage() or bool(record.exc_info and raised_in_orbax(record.exc_info[2])))
            return not (from_orbax or mentions_orbax or is_noise(record.exc_info[1] if record.exc_info else None))

    for name in ("absl", "asyncio", ""):
        logging.getLogger(name).addFilter(_OrbaxErrors())


#: The end of the error for a checkpoint whose arrays cannot be this model's.
_OTHER_MODEL = "it was written by a different model; use a new --workdir"


def _fields_saved(target, saved: Dict[str, Any]):
    """``(what Orbax restores into, how to rebuild the target from it)``: a dataclass state with
    None fields that the checkpoint does not hold at all (it was written before those fields
    existed) is restored as a dict of the fields it holds, then put back into the dataclass."""
    if saved and dataclasses.is_dataclass(target):
        names = [f.name for f in dataclasses.fields(target)]
        absent = [n for n in names if getattr(target, n) is None and n not in saved]
        if absent:
            present = {n: getattr(target, n) for n in names if n not in absent}
            return present, lambda restored: target.replace(**restored)
    return target, lambda restored: restored


def _with_sharding(x) -> jax.ShapeDtypeStruct:
    """The leaf's shape, dtype and sharding; a leaf without a sharding (``jax.eval_shape`` output,
    NumPy) restores onto this process's first device, so a checkpoint written by a run on many
    devices or hosts loads on one (Orbax refuses a topology change unless it is told the target)."""
    s = ocp.utils.to_shape_dtype_struct(x)
    if getattr(s, "sharding", None) is None:
        s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return s


def _check_shapes(restored, abstract, step, directory):
    got = jax.tree_util.tree_leaves(restored)
    want = jax.tree_util.tree_leaves(abstract)
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {directory} holds an array of shape {tuple(g.shape)} where this "
                f"model has {tuple(w.shape)}: {_OTHER_MODEL}"
            )

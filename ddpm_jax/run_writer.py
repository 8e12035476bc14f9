"""A run directory written whole: ``config.json`` and one checkpoint (or one params file), or nothing.

    write_run("runs/mnist/posthoc_ema/sigma_rel_0.05", config_dict, state, meta)
    write_params_run("pretrained/mnist_unet", config_dict, ema_params, meta)

The directory is assembled under a temporary name beside the target and renamed onto it when
complete, so an interruption (Ctrl-C, SIGKILL, a full disk) leaves no half-written run that
``ddpm_jax.runs.load_run`` could mistake for a real one. :func:`write_run`'s layout is the
trainer's (``ddpm_jax.checkpointing``): ``config.json`` and ``checkpoints/<step>/`` with the state
and its metadata JSON. :func:`write_params_run`'s is ``config.json``, ``params.msgpack`` (one
params tree) and ``meta.json``: the form trained params ship in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from typing import Any, Callable, Dict

import numpy as np

__all__ = ["META_FILE", "PARAMS_FILE", "RunExistsError", "is_free", "write_params_run", "write_run"]

_HOST = socket.gethostname().replace("-", "_").replace(os.sep, "_") or "host"


class RunExistsError(ValueError):
    """The target is a non-empty directory (or a file) and overwriting was not asked for."""


def is_free(path: str) -> bool:
    """Whether ``path`` is absent or an empty directory."""
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def _remove_stale(parent: str, prefix: str) -> None:
    """Removes ``<prefix><pid>-*`` directories in ``parent`` whose process no longer runs."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            except OSError:
                pass


def write_run(path: str, config_dict: Dict[str, Any], state, meta: Dict[str, Any], *, overwrite: bool = False) -> str:
    """Writes ``path/config.json`` (``config_dict``) and ``path/checkpoints/<state.step>/``
    (``state``, a ``TrainState``, and ``meta``), assembled in a temporary sibling directory and
    renamed to ``path`` when complete. ``path`` must be absent or empty unless ``overwrite``; an
    overwritten run is replaced only once the new one is complete. Returns the absolute path.

    Raises:
      RunExistsError: ``path`` holds something and ``overwrite`` is False.
      OSError (``ddpm_jax.files.OutputError``, ``CheckpointWriteError``): the run cannot be
        written; nothing of it is left behind.
    """
    from ddpm_jax.checkpointing import Checkpointer

    def fill(tmp: str) -> None:
        checkpoint = config_dict.get("checkpoint", {})
        ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), every_steps=int(checkpoint.get("every_steps", 1)),
                            keep=int(checkpoint.get("keep", 1)), async_save=False)
        try:
            ckpt.save(int(state.step), state, meta, force=True)
        finally:
            ckpt.close()

    return _write_dir(path, config_dict, fill, _nbytes(state), overwrite)


def write_params_run(path: str, config_dict: Dict[str, Any], params, meta: Dict[str, Any], *,
                     overwrite: bool = False) -> str:
    """Writes a params run: ``path/config.json``, ``path/params.msgpack`` (``params`` as float32
    NumPy, ``flax.serialization.to_bytes``) and ``path/meta.json`` (``meta``, which must hold
    ``step``, ``steps_per_epoch`` and ``image_shape``), whole or not at all, as :func:`write_run`.
    :func:`ddpm_jax.runs.load_run` reads it as a run whose params and EMA params are ``params``:
    the form trained params ship in (no optimiser state, one small file). Returns the absolute path."""
    import flax.serialization
    import jax

    from ddpm_jax.files import write_json

    missing = sorted({"step", "steps_per_epoch", "image_shape"} - set(meta))
    if missing:
        raise ValueError(f"meta lacks {missing}")
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), jax.device_get(params))

    def fill(tmp: str) -> None:
        with open(os.path.join(tmp, PARAMS_FILE), "wb") as f:
            f.write(flax.serialization.to_bytes(params))
        write_json(os.path.join(tmp, META_FILE), meta)

    return _write_dir(path, config_dict, fill, _nbytes(params), overwrite)


#: The files of a params run (:func:`write_params_run`).
PARAMS_FILE, META_FILE = "params.msgpack", "meta.json"


def _nbytes(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def _write_dir(path: str, config_dict: Dict[str, Any], fill: Callable[[str], None], need: int, overwrite: bool) -> str:
    """Writes ``config.json`` and what ``fill(tmp)`` puts beside it into a temporary sibling of
    ``path``, then renames it onto ``path`` (replacing an old run only once the new one is whole)."""
    from ddpm_jax.checkpointing import write_config_json
    from ddpm_jax.files import check_writable

    path = os.path.abspath(os.path.expanduser(path))
    if not is_free(path) and not overwrite:
        raise RunExistsError(f"{path} is not empty: give another output directory or --overwrite")
    parent, base = os.path.split(path)
    check_writable(parent, "the output directory", need_bytes=need + 2**20)
    prefix = f".{base}.tmp-{_HOST}-"
    _remove_stale(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write_config_json(tmp, config_dict)
        fill(tmp)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-old-", dir=parent)
            os.replace(path, os.path.join(old, base))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(os.path.join(old, base), path)  # the overwritten run comes back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

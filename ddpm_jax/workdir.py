"""A training run's workdir: checked before use, held by one trainer at a time.

:func:`prepare_workdir` creates the directory and proves it writable. :class:`WorkdirLock`
takes an exclusive OS lock (``flock``) on ``<workdir>/train.lock`` for the life of a run: a
second trainer on the same workdir is refused with one line naming the holder. The lock belongs
to the open file, so the OS releases it when the process ends however it ends (SIGKILL
included): no stale lock survives a crash. Sampling and evaluation only read, and take no lock.

:func:`set_aside` moves a checkpoint out of Orbax's view without deleting it (a damaged one,
or one newer than ``--restore_step``), into ``<workdir>/checkpoints_set_aside/``.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from typing import Optional

from ddpm_jax.config import ConfigError
from ddpm_jax.files import OutputError, check_writable

__all__ = ["prepare_workdir", "WorkdirLock", "WorkdirBusyError", "LOCK_NAME", "SET_ASIDE_DIR", "set_aside"]

LOCK_NAME = "train.lock"
SET_ASIDE_DIR = "checkpoints_set_aside"


class WorkdirBusyError(ConfigError):
    """Another trainer holds the workdir's lock."""


def prepare_workdir(workdir: str) -> str:
    """Creates ``workdir`` if needed; raises ConfigError (one line) if it is a file or not writable."""
    if not workdir:
        raise ConfigError("--workdir is empty: give a directory for checkpoints and outputs")
    try:
        return check_writable(workdir, "--workdir")
    except OutputError as e:
        raise ConfigError(str(e)) from None


class WorkdirLock:
    """Exclusive lock on ``<workdir>/train.lock`` (``fcntl.flock``), released by :meth:`release`
    or by the OS when the process ends.

    The file records the holder (pid, host, start time, command) so that a refused trainer can
    name it: ``acquire()``, then ``release()``.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises :class:`WorkdirBusyError` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusyError(
                f"{os.path.dirname(self.path)} is in use by another trainer ({self.holder() or 'holder unknown'}); "
                "wait for it to finish, stop it, or use another --workdir") from None
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"cannot lock {self.path}: {e.strerror or e}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """'pid 123 on host h, started ...' from the lock file ('' if unreadable)."""
        try:
            with open(self.path) as f:
                info = json.loads(f.read() or "{}")
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def set_aside(workdir: str, checkpoint_dir: str, step: int, reason: str) -> str:
    """Moves ``checkpoint_dir/<step>`` to ``workdir/checkpoints_set_aside/<step>-<reason>``
    (a free name: ``-2``, ``-3`` ... appended if taken) and returns the new path. Nothing is deleted."""
    src = os.path.join(checkpoint_dir, str(step))
    dest_dir = os.path.join(workdir, SET_ASIDE_DIR)
    os.makedirs(dest_dir, exist_ok=True)
    dest, k = os.path.join(dest_dir, f"{step}-{reason}"), 1
    while os.path.exists(dest):
        k += 1
        dest = os.path.join(dest_dir, f"{step}-{reason}-{k}")
    shutil.move(src, dest)
    return dest

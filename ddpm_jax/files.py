"""Files that a later step reads are written whole or not at all.

Every output the entry points write (samples, reports, configs, figures) goes through
:func:`atomic_path`: the content is written to a temporary name in the same directory and renamed
over the target only when complete, so an interruption (Ctrl-C, SIGKILL, a full disk) leaves
either the old file or the new one, never a torn one, and no temporary file behind.
:func:`check_writable` probes an output directory before long work starts, and
:func:`os_error_line` turns an ``OSError`` into the one line the entry points print.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from typing import Any, Iterator

__all__ = ["atomic_path", "write_text", "write_json", "save_npz", "check_writable", "os_error_line",
           "OutputError", "free_bytes"]


class OutputError(OSError):
    """An output cannot be written (full disk, read-only or missing directory, permissions).
    Its message is one line that names the path."""


_HOST = socket.gethostname().replace("-", "_").replace(os.sep, "_") or "host"


def _remove_stale(directory: str, prefix: str, ext: str) -> None:
    """Removes ``<prefix><pid>-*<ext>`` files in ``directory`` whose process no longer runs."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(ext)):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # the writer is gone: its file can never be completed
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
        except OSError:  # alive, owned by another user
            pass


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; on a clean exit it replaces ``path`` (one
    ``os.replace``, atomic on POSIX filesystems), on any exception it is removed.

    The temporary name keeps the target's extension (``x.npz`` → ``.x.tmp-<host>-<pid>-<rand>.npz``)
    because some writers (``np.savez``, matplotlib) choose the format from it. A temporary file
    that a killed process (SIGKILL, power loss) left for the same target on this host is removed.
    """
    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    prefix = f".{stem}.tmp-{_HOST}-"
    _remove_stale(directory, prefix, ext)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=ext, dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets what open() would give it
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError) and e.filename in (None, tmp):
            # name the file the user asked for (a writer's error may name none, or the temporary)
            raise OutputError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> str:
    """Writes ``text`` to ``path`` atomically (flushed and fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_json(path: str, obj: Any, **kw) -> str:
    """``json.dump(obj)`` to ``path`` atomically; ``kw`` go to ``json.dumps`` (default indent 2)."""
    kw.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **kw) + "\n")


def save_npz(path: str, *, compressed: bool = True, **arrays) -> str:
    """``np.savez_compressed`` (or ``np.savez``) to ``path`` atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
    return path


def free_bytes(directory: str) -> int:
    """Bytes available to this user on the filesystem holding ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_writable(directory: str, what: str, *, need_bytes: int = 0) -> str:
    """Creates ``directory`` if needed and proves a file can be created in it (and, with
    ``need_bytes``, that the filesystem has that much room). Returns the absolute path.

    Raises:
      OutputError: one line naming ``what`` (e.g. ``--out``), the path and the reason.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputError(errno.ENOTDIR, f"{what} {directory} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test"):
            pass
    except OSError as e:
        raise OutputError(e.errno, f"{what} {directory} is not writable: {e.strerror or e}") from None
    if need_bytes:
        free = free_bytes(directory)
        if free < need_bytes:
            raise OutputError(errno.ENOSPC, f"{what} {directory} has {free / 2**20:.1f} MiB free, "
                                            f"but this needs at least {need_bytes / 2**20:.1f} MiB")
    return directory


def os_error_line(e: OSError) -> str:
    """One line for an ``OSError``: its reason and the path it concerns, e.g.
    ``No space left on device: /runs/mnist/config.json``."""
    if isinstance(e, OutputError):  # its message already names the path
        return e.strerror or str(e)
    if not getattr(e, "strerror", None):
        return str(e)
    name = e.filename if e.filename is not None else ""
    if getattr(e, "filename2", None):
        name = f"{name} -> {e.filename2}"
    return f"{e.strerror}: {name}" if name else e.strerror

"""Where a results file comes from: the command, the code, the machine, the wall time.

Every report an entry point writes (``evaluate``, ``score_checkpoints``, the studies, the
benchmarks) carries ``record(...)`` under the key ``"provenance"``::

    {"command": "python -m experiments.evaluate --workdir runs/mnist --num 10000",
     "git": {"commit": "0e377df…", "dirty": false},
     "machine": {"cpu": "Intel(R) Xeon(R) …", "cores": 2, "platform": "cpu", "devices": 1,
                 "device_kind": "cpu"},
     "versions": {"python": "3.11.7", "jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8"},
     "wall_s": 812.4, "finished_utc": "2026-12-07T08:01:02Z"}

Paths are never stored absolute: :func:`relative` writes a path relative to the repository (or
to a given base such as the workdir), so a committed file names no directory of the machine
that wrote it.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, Optional, Sequence

__all__ = ["record", "command_line", "git_state", "machine", "versions", "relative", "relative_paths",
           "process_seconds", "summary_line", "REPO", "REQUIRED_FIELDS"]

#: The checkout this package runs from (an editable install) — the base of relative paths.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The keys every ``provenance`` block has.
REQUIRED_FIELDS = ("command", "git", "machine", "versions", "wall_s")


_IMPORTED = time.time()


def process_seconds() -> float:
    """Seconds since this process started (Linux: from ``/proc``; elsewhere: since this module
    was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def relative(path: str, base: Optional[str] = None) -> str:
    """``path`` relative to ``base`` (default: the repository), e.g. ``runs/mnist`` or
    ``../data/mnist``; a relative ``path`` is first taken from the current directory."""
    if not isinstance(path, str) or not path:
        return path
    return os.path.relpath(os.path.abspath(path), base or REPO)


def relative_paths(obj: Any, base: Optional[str] = None) -> Any:
    """``obj`` (dicts, lists, strings) with every absolute path in a string made relative."""
    if isinstance(obj, dict):
        return {k: relative_paths(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(relative_paths(v, base) for v in obj)
    if isinstance(obj, str) and os.path.isabs(obj):
        return relative(obj, base)
    return obj


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as a user types it: ``python -m <module> <args>`` for ``python -m`` runs,
    else ``python <script> <args>``; absolute paths among the arguments made relative to the
    repository (``--flag=/abs/path`` too)."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if argv and spec is not None and spec.name and argv[0].endswith(".py"):
        head = ["python", "-m", spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name]
    elif argv:
        head = ["python", relative(argv[0]) if os.path.isabs(argv[0]) else argv[0]]
    else:
        head = ["python"]

    def rel(arg: str) -> str:
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            return f"{flag}={relative(value) if os.path.isabs(value) else value}"
        return relative(arg) if os.path.isabs(arg) else arg

    return " ".join(head + [rel(a) for a in argv[1:]])


@functools.lru_cache(maxsize=None)
def git_state(repo: str = REPO) -> Dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of ``repo`` (None where git cannot tell:
    not a checkout, git missing). Dirty: tracked files differ from the commit."""
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if not status.returncode else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_info() -> Dict[str, Any]:
    """The CPU's model name, family and widest vector extension, from ``/proc/cpuinfo`` (Linux)."""
    info: Dict[str, Any] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if key == "model name" and "cpu" not in info:
                    info["cpu"] = value
                elif key == "cpu family" and "cpu_family" not in info:
                    info["cpu_family"] = int(value) if value.isdigit() else value
                elif key == "flags" and "simd" not in info:
                    flags = set(value.split())
                    info["simd"] = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
                if len(info) == 3:
                    break
    except OSError:
        pass
    info.setdefault("cpu", platform.processor() or platform.machine() or "unknown")
    return info


def machine() -> Dict[str, Any]:
    """The CPU (model, family, widest vector extension, cores this process may use) and JAX's
    devices (platform, count, kind)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out: Dict[str, Any] = {**_cpu_info(), "cores": cores}
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            devices = jax.devices()
            out.update(platform=devices[0].platform, devices=len(devices), device_kind=devices[0].device_kind)
        except Exception:  # noqa: BLE001  (no backend: the CPU facts still stand)
            pass
    return out


def versions() -> Dict[str, Optional[str]]:
    """Python and the versions of the numerical packages that are loaded."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    if out.get("jaxlib") is None and sys.modules.get("jaxlib") is not None:
        try:
            from jaxlib import version as jaxlib_version  # noqa: PLC0415
            out["jaxlib"] = jaxlib_version.__version__
        except ImportError:
            pass
    return out


def summary_line() -> str:
    """One line for a printed table: the machine, the versions and the commit."""
    m, v, g = machine(), versions(), git_state()
    dev = f", {m['devices']} x {m['device_kind']}" if "devices" in m else ""
    commit = (g["commit"] or "?")[:10] + (" (dirty)" if g["dirty"] else "")
    cpu = m["cpu"] + "".join(f", {k} {m[k]}" for k in ("cpu_family", "simd") if m.get(k) is not None)
    return f"({cpu}, {m['cores']} cores{dev}; jax {v['jax']}; commit {commit})"


def record(wall_s: Optional[float] = None, argv: Optional[Sequence[str]] = None, **extra) -> Dict[str, Any]:
    """The ``provenance`` block of a results file: the command line, the git commit and whether
    the tree was dirty, the machine, the package versions, the wall time in seconds (``wall_s``;
    default: since the process started) and the time it was written; ``extra`` keys are added
    (absolute paths in them made relative to the repository)."""
    if wall_s is None:
        wall_s = process_seconds()
    out = {
        "command": command_line(argv),
        "git": git_state(),
        "machine": machine(),
        "versions": versions(),
        "wall_s": round(float(wall_s), 3),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    out.update(relative_paths(extra))
    return out

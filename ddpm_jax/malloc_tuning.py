"""glibc malloc settings for the entry points, so XLA:CPU's per-step buffers stop page-faulting.

XLA:CPU allocates a program's temporary buffers with malloc for each execution and frees them
after it: 87 MiB per device for the medium U-Net's training step at batch 50. glibc serves every
request above its mmap threshold (never more than 32 MiB) from freshly mapped pages and unmaps them
again at ``free``, so each training step faults its whole temporary memory in anew, one 4 KiB page
at a time: ~44,700 minor page faults per step for medium on 2 devices, about a third of the step's
time on this project's CPU VMs (``benchmarks.run`` reports ``train_page_faults_per_step``).

:data:`TUNABLES` asks glibc (2.35 or later; older versions ignore what they do not know) to

- advise transparent huge pages for the memory it maps (``glibc.malloc.hugetlb=1``, effective
  where the kernel's THP mode is ``madvise`` or ``always``): the same memory then faults in 2 MiB
  pages, a few hundred faults per step instead of tens of thousands (docs/performance.md);
- keep requests up to 32 MiB on its heap and not give that heap back (the mmap and trim
  thresholds the reference's README sets for PyTorch, which suffers the same way).

glibc reads ``GLIBC_TUNABLES`` once, when a process starts, so :func:`reexec_if_untuned` runs the
current command again with it set. The entry points (``experiments.*``, ``benchmarks.*``) call it
first thing; a ``GLIBC_TUNABLES`` already in the environment, even empty, is left as it is (so
``GLIBC_TUNABLES= python -m experiments.train ...`` runs untuned). Nothing else changes: the same
computation, the same numbers.
"""

from __future__ import annotations

import os
import sys

__all__ = ["TUNABLES", "ENV", "reexec_if_untuned", "glibc_version"]

ENV = "GLIBC_TUNABLES"
TUNABLES = ("glibc.malloc.hugetlb=1"
            ":glibc.malloc.mmap_threshold=33554432"
            ":glibc.malloc.trim_threshold=17179869184")


def glibc_version():
    """(major, minor) of the C library this process runs on, or None if it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr (not Unix)
        return None


def reexec_if_untuned() -> None:
    """Replaces this process by the same command (``sys.orig_argv``) with ``GLIBC_TUNABLES`` set
    to :data:`TUNABLES`, when the variable is unset and the process runs on glibc under Linux;
    otherwise returns and does nothing.

    Call it before anything that must not run twice (it runs again from the start in the new
    process); what was printed so far is flushed first. If the exec fails, the process goes on
    untuned.
    """
    if ENV in os.environ or not sys.platform.startswith("linux") or glibc_version() is None:
        return
    os.environ[ENV] = TUNABLES  # inherited by the new process, which therefore does not re-exec
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:
        pass

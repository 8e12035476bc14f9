"""One JAX device per CPU core, so the data-parallel step runs on every core of a CPU-only machine.

On the CPU, JAX gives a process a single device by default, and one XLA program on it keeps the
other cores only partly busy: the U-Net's convolutions are small (8–256 channels on 28×28), too
small for intra-op threading to pay. Splitting the global batch over one virtual device per core
(``jax_num_cpu_devices``) runs the per-device programs side by side — the same data-parallel
step that spreads a batch over GPUs (``ddpm_jax.train_step.Parallel``), with the same numbers up to
float rounding of the gradient all-reduce. Measured here: docs/performance.md.

The count must be set before JAX starts its backends (before the first computation), so the
entry points (``experiments.train``, ``sample``, ``evaluate``, the studies, ``benchmarks.run``)
call :func:`configure` first thing. It does nothing on a machine where JAX uses a GPU or TPU other
than giving the (unused) CPU backend more devices.
"""

from __future__ import annotations

import numbers
import operator
import os
from typing import Any, Iterable, Optional

__all__ = ["available_cores", "choose", "configure", "XLA_FLAG", "shared_thread_pool", "DispatchWindow"]

#: The XLA flag that also sets the CPU device count; when XLA_FLAGS has it, it wins.
XLA_FLAG = "--xla_force_host_platform_device_count"
#: How long XLA:CPU lets a device wait in a collective for the others before it aborts the process.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
#: Set with several devices (XLA's default is 40 s): see :func:`configure`.
COLLECTIVE_TIMEOUT_S = 600


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under ``taskset`` or a
    container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def choose(requested: int, batch_sizes: Iterable[int] = (), cores: Optional[int] = None) -> int:
    """The device count: ``requested`` if > 0, else (auto) the largest ``n ≤ cores`` dividing
    every batch size (so each device gets whole examples; sizes that are not positive integers are
    skipped — the config's validation reports them).

    Raises ValueError if ``requested`` is negative or not an integer."""
    if int(requested) != requested or requested < 0:
        raise ValueError(f"cpu_devices must be 0 (one per core) or a positive integer, got {requested}")
    if requested:
        return int(requested)
    sizes = [operator.index(b) for b in batch_sizes if isinstance(b, numbers.Integral) and b > 0]
    cores = available_cores() if cores is None else int(cores)
    return next(n for n in range(max(1, cores), 0, -1) if all(b % n == 0 for b in sizes))


def configure(requested: int = 0, batch_sizes: Iterable[int] = ()) -> Optional[int]:
    """Sets ``jax_num_cpu_devices`` to :func:`choose`'s count, before JAX's backends start.

    Returns the count set, or None where it is left alone: XLA_FLAGS already has
    ``--xla_force_host_platform_device_count`` (the user's or a test's choice), or JAX's backends
    are already running (then a warning is logged). Raises ValueError for a bad ``requested``.
    """
    n = choose(requested, batch_sizes)
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_FLAG in flags:
        return None
    if n > 1 and COLLECTIVE_TIMEOUT_FLAG not in flags:
        # The devices' programs meet in each step's gradient all-reduce. XLA:CPU aborts the whole
        # process when one device has waited there for another 20 s (its "stuck" warning) + 40 s:
        # twice the README's training run died so, after 14,543 and 21,537 steps, the rest of the
        # process alive. The raised timeout spares a run whose device is only stalled (a page
        # fault, a descheduled vCPU). The likelier cause is a deadlock in XLA:CPU's device thread
        # pool when steps are queued ahead (docs/performance.md), which still aborts, 10 minutes
        # later: the training loop avoids it with a DispatchWindow; a larger pool (NPROC) would
        # too but slows every step through intra-op threads, so it is not set here.
        os.environ["XLA_FLAGS"] = (flags + f" {COLLECTIVE_TIMEOUT_FLAG}={COLLECTIVE_TIMEOUT_S}").strip()
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # a computation already ran: the backends are fixed for this process
        from absl import logging

        logging.warning("cpu_devices: JAX's backends are already initialised; keeping %d CPU device(s)",
                        len(jax.devices("cpu")))
        return None
    return n


def shared_thread_pool() -> bool:
    """True on a CPU backend with several local devices, whose programs share XLA:CPU's one pool of
    max(NPROC or the core count, devices) threads (see :class:`DispatchWindow`)."""
    import jax

    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


class DispatchWindow:
    """Keeps at most two dispatched collective programs (e.g. training steps) unfinished.

    JAX dispatches asynchronously, so a loop can queue many steps ahead of the devices. On a CPU
    backend with several devices every step meets in a gradient all-reduce, and the devices'
    programs share XLA:CPU's pool of as many threads as devices: when the threads are all held by
    programs blocked in an all-reduce while another device's part of it waits for a thread, XLA
    deadlocks and aborts the process. Waiting, after each dispatch, for the call before it (what
    :meth:`add` does) avoids that; the host stays one step ahead of the devices, at a small cost
    in throughput (docs/performance.md).

    ``add(x)``: ``x`` is any array of the step just dispatched; returns once the step before it
    has finished. ``wait()``: returns once the last step added has finished. A window with
    ``enabled=False`` never waits.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)
        self._last: Any = None  # the step dispatched before, not yet waited for

    def add(self, x: Any) -> None:
        if not self.enabled:
            return
        self.wait()
        self._last = x

    def wait(self) -> None:
        if self._last is not None:
            self._last.block_until_ready()
            self._last = None

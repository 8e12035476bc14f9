"""Ctrl-C and SIGTERM as a request to stop a training loop after the current step.

    with StopSignals() as stop:
        for step in ...:
            ...                                   # one step
            if stop.requested(step):              # 'SIGINT' / 'SIGTERM' / None
                break                             # save a checkpoint, then leave

Shared by the trainer (``ddpm_jax.trainer``) and the distillation loop (``ddpm_jax.distill_loop``).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, Optional

import jax

__all__ = ["StopSignals"]


class StopSignals:
    """Ctrl-C and SIGTERM end the run after the current step, with a checkpoint.

    One process: SIGINT/SIGTERM set a flag the loop reads after each step (so the state is never
    caught half-updated); a second SIGINT raises KeyboardInterrupt at once. Several processes
    (``jax.distributed``): SIGTERM is left to JAX's pre-emption service, which tells every
    process, and :meth:`requested` is true on all of them after the same step
    (``multihost_utils.reached_preemption_sync_point``), so they save one checkpoint together;
    SIGINT is turned into a SIGTERM to this process, so Ctrl-C on one process stops them all alike.
    """

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.flag: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.flag is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = signal.Signals(signum).name
        if self.multi:  # JAX's notifier turns it into a stop step that every process agrees on
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self):
        for sig in (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass
        return self

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)

    def requested(self, step: int) -> Optional[str]:
        """The signal's name once the run should stop after ``step``, else None."""
        if not self.multi:
            return self.flag
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            return self.flag or "SIGTERM"
        return None

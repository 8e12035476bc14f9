"""Metric writers: one JSON object per line in ``metrics.jsonl`` and TensorBoard event files.

Only one process should write (the trainer passes ``enabled = process_index == 0``). Rows are
appended one whole line per ``write`` call; a crash mid-write can leave a torn last line, which
:func:`read_metrics` skips and :meth:`MetricWriter.resume_at` removes. A resumed run first drops
the rows after the step it resumes from (they belong to the lost part of the interrupted run and
would otherwise appear twice).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Tuple

from ddpm_jax.files import write_text

__all__ = ["MetricWriter", "read_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """``write(step, {'train/loss': 1.2, ...})`` appends ``{"step": step, "train/loss": 1.2, ...}``
    to ``workdir/metrics.jsonl`` and logs each scalar to TensorBoard under ``workdir/tb``."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard output is optional; metrics.jsonl is not
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
                _tolerate_write_errors(self._tb)

    def resume_at(self, step: int) -> int:
        """Keeps the rows with ``step`` <= the given one (and drops a torn last line), rewriting
        the file atomically; returns how many rows were dropped. Call once before writing."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        rows, lines, torn = _parse(self.path)
        keep = [line for row, line in zip(rows, lines) if row.get("step", 0) <= step]
        dropped = len(rows) - len(keep) + torn
        if dropped:
            write_text(self.path, "".join(line + "\n" for line in keep))
        return dropped

    def write(self, step: int, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tolerate_write_errors(tb) -> None:
    """TensorBoard's event file is a copy of metrics.jsonl: an OS error writing it (a full disk)
    stops the copy without a word, from the background thread, ``close`` or the exit hook alike.
    metrics.jsonl, written in the main thread, raises the error that ends the run."""
    events = getattr(getattr(getattr(tb, "file_writer", None), "event_writer", None), "_ev_writer", None)
    if events is None:  # another tensorboardX layout: leave it as it is
        return
    state = {"failed": False}

    def guarded(method):
        def call(*args, **kwargs):
            if state["failed"]:
                return None
            try:
                return method(*args, **kwargs)
            except OSError:
                state["failed"] = True
                return None
        return call

    for name in ("write_event", "flush", "close"):
        if hasattr(events, name):
            setattr(events, name, guarded(getattr(events, name)))


def _parse(path: str) -> Tuple[List[dict], List[str], int]:
    """(rows, their lines, number of unreadable lines skipped) of a metrics file."""
    rows, lines, bad = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
                lines.append(line)
            else:
                bad += 1
    return rows, lines, bad


def read_metrics(workdir: str):
    """All rows of ``workdir/metrics.jsonl`` as a list of dicts (empty if none yet). Lines that
    are not a JSON object (a torn last line after a crash) are skipped."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    return _parse(path)[0]

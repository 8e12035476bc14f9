"""Metric writers: one JSON object per line in ``metrics.jsonl`` and TensorBoard event files.

Only one process should write (the trainer passes ``enabled = process_index == 0``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict

__all__ = ["MetricWriter", "read_metrics"]


class MetricWriter:
    """``write(step, {'train/loss': 1.2, ...})`` appends ``{"step": step, "train/loss": 1.2, ...}``
    to ``workdir/metrics.jsonl`` and logs each scalar to TensorBoard under ``workdir/tb``."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard output is optional; metrics.jsonl is not
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))

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


def read_metrics(workdir: str):
    """All rows of ``workdir/metrics.jsonl`` as a list of dicts (empty if none yet)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

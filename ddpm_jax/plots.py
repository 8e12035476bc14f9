"""PNG figures: sample grids, loss curves, line plots and snapshot tables (matplotlib, Agg backend: no
display needed). Each is written atomically (``ddpm_jax.files``): an interrupted write keeps the old figure."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ddpm_jax.files import atomic_path

__all__ = ["image_grid", "save_image_grid", "save_loss_curve", "save_line_plot", "save_snapshot_table"]


def image_grid(images: np.ndarray, ncol: int = 0, pad: int = 2) -> np.ndarray:
    """Tiles ``images`` (N, H, W, C) with values in [0, 1] into one (H', W', C) array."""
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_image_grid(images: np.ndarray, path: str, *, ncol: int = 0, title: str = "") -> str:
    """Writes a grid of ``images`` (N, H, W, C) in [0, 1] to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.clip(image_grid(np.asarray(images, np.float32), ncol), 0.0, 1.0)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)), dpi=120)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save(fig, path)
    return path


def save_loss_curve(rows: List[Dict[str, float]], path: str, keys: Sequence[str] = ("train/loss", "val/loss", "val/loss_ema")) -> str:
    """Plots the given metrics (rows as in metrics.jsonl) against the step; log-scale y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, marker="o" if key.startswith("val") else None, markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if any(isinstance(r.get(k), (int, float)) and r[k] > 0 for r in rows for k in keys):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return path


def save_line_plot(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], path: str, *, xlabel: str, ylabel: str,
                   title: str = "", logx: bool = False, logy: bool = False, hlines: Optional[Dict[str, float]] = None) -> str:
    """One line per ``label -> (x, y)``, plus up to three gray horizontal reference lines ``hlines``
    (label -> y), named in the legend with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    for (label, y), style in zip((hlines or {}).items(), ("--", ":", "-.")):
        ax.axhline(y, linestyle=style, color="gray", linewidth=1, label=f"{label}: {y:.3g}")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def save_snapshot_table(rows: Dict[str, np.ndarray], col_titles: Sequence[str], path: str, *, title: str = "") -> str:
    """A table of image rows: ``rows[label]`` is ``(K, N, H, W, C)`` — K snapshot columns
    (titled ``col_titles``), each a strip of N images in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(col_titles)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.6 * k + 1.2, 1.3 * len(rows) + 0.4), dpi=120, squeeze=False)
    for r, (label, snaps) in enumerate(rows.items()):
        for c in range(k):
            ax = axes[r][c]
            g = np.clip(image_grid(np.asarray(snaps[c], np.float32)), 0.0, 1.0)
            ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig, path: str) -> None:
    """Saves and closes ``fig``: written to a temporary name, renamed over ``path`` when complete."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)

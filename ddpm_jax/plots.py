"""PNG figures: sample grids and loss curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["image_grid", "save_image_grid", "save_loss_curve"]


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
    fig.savefig(path)
    plt.close(fig)
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
    fig.savefig(path)
    plt.close(fig)
    return path

"""Figures a person checks images by (slices with labels, grids), saved atomically as PNG."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medfound.io.atomic import atomic_file  # noqa: E402


def display(slice2d: np.ndarray) -> np.ndarray:
    """An (i, j) slice as a picture: rows = j from top (anterior/superior up after canonical RAS)."""
    return np.asarray(slice2d).T[::-1]


def label_colours(n: int) -> np.ndarray:
    cmap = plt.get_cmap("tab20", max(n, 1))
    return np.array([cmap(i % 20)[:3] for i in range(n)])


def overlay(ax, image2d: np.ndarray, label2d: np.ndarray | None = None, alpha: float = 0.4,
            title: str | None = None, vmin: float | None = None, vmax: float | None = None) -> None:
    """Draw ``image2d`` in grey with ``label2d`` (integer labels) as coloured fill and contours."""
    img = display(image2d).astype(np.float32)
    lo, hi = (np.percentile(img, [0.5, 99.5]) if vmin is None else (vmin, vmax))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    if label2d is not None and np.any(label2d):
        lab = display(label2d).astype(np.int64)
        values = [v for v in np.unique(lab) if v]
        colours = label_colours(max(values) + 1)
        rgba = np.zeros((*lab.shape, 4), np.float32)
        for v in values:
            rgba[lab == v, :3] = colours[v]
            rgba[lab == v, 3] = alpha
            ax.contour(lab == v, levels=[0.5], colors=[colours[v]], linewidths=0.6)
        ax.imshow(rgba, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def best_slice(label: np.ndarray, axis: int = 2) -> int:
    """The slice along ``axis`` with the most labeled voxels (the middle one if none)."""
    if label.ndim == 2:
        return 0
    counts = np.count_nonzero(label, axis=tuple(d for d in range(3) if d != axis))
    return int(np.argmax(counts)) if counts.max() > 0 else label.shape[axis] // 2


def curve_panels(panels: list[tuple[str, list[tuple[str, list, list, list, list]]]], path: str | os.PathLike,
                 xlabel: str, ylabel: str) -> Path:
    """One panel per ``(title, series)``, each series ``(label, x, mean, ci_low, ci_high)`` drawn as
    its mean curve over a band for its confidence interval; x on a log2 axis, y from 0 to 1."""
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, x, mean, low, high in series:
            ax.plot(x, mean, marker="o", label=label)
            ax.fill_between(x, low, high, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)

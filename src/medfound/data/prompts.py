"""Prompts simulated from ground-truth masks, as SAM / MedSAM training does.

Coordinates are in pixels of the (i, j) slice array: x = i (first axis), y = j (second axis);
boxes are (x0, y0, x1, y1) inclusive corners. Points are (x, y) with label 1 (inside) or 0 (outside).
"""

from __future__ import annotations

import numpy as np


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) of a non-empty 2D mask."""
    xs, ys = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, max_shift: int = 5) -> np.ndarray:
    """The mask's box with each side moved by up to ``max_shift`` pixels (as MedSAM trains)."""
    box = mask_box(mask) + rng.integers(-max_shift, max_shift + 1, size=4)
    hi = np.array([mask.shape[0], mask.shape[1]] * 2, dtype=np.float32) - 1
    box = np.clip(box, 0, hi)
    return np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])], np.float32)


def sample_points(mask: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_pos`` points inside and ``n_neg`` outside (near the object when possible)."""
    pts, labels = [], []
    inside = np.argwhere(mask)
    if n_pos and len(inside):
        pick = inside[rng.choice(len(inside), size=n_pos, replace=len(inside) < n_pos)]
        pts += [p for p in pick]
        labels += [1] * n_pos
    if n_neg:
        x0, y0, x1, y1 = mask_box(mask).astype(int) if mask.any() else (0, 0, mask.shape[0] - 1, mask.shape[1] - 1)
        pad = 10
        region = np.zeros_like(mask, dtype=bool)
        region[max(0, x0 - pad):x1 + pad + 1, max(0, y0 - pad):y1 + pad + 1] = True
        outside = np.argwhere(region & ~mask)
        if not len(outside):
            outside = np.argwhere(~mask)
        if len(outside):
            pick = outside[rng.choice(len(outside), size=n_neg, replace=len(outside) < n_neg)]
            pts += [p for p in pick]
            labels += [0] * n_neg
    return np.array(pts, dtype=np.float32).reshape(-1, 2), np.array(labels, dtype=np.int64)


def correction_point(pred: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int] | None:
    """Next click of an interactive session: in the larger error region (missed -> positive,
    spurious -> negative), at its most interior pixel, as in SAM's iterative training."""
    from scipy import ndimage

    fn, fp = truth & ~pred, pred & ~truth
    err, label = (fn, 1) if fn.sum() >= fp.sum() else (fp, 0)
    if not err.any():
        return None
    dist = ndimage.distance_transform_edt(np.pad(err, 1))[1:-1, 1:-1]
    best = np.argwhere(dist == dist.max())
    return best[rng.integers(len(best))].astype(np.float32), label

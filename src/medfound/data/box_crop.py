"""The square neighbourhood of a box prompt that a zooming SAM sees instead of the whole slice.

One definition serves inference (``infer.sam_segment``) and fine-tuning (``train.sam_finetune``), so
a model is trained on exactly the crops it will be shown: ``zoom`` times the box's larger physical
side, at least a quarter of the slice's larger extent (a tiny box still shows its surroundings),
at most the whole extent, centred on the box; zero outside the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxWindow:
    """A crop of ``shape`` pixels whose first pixel is ``start`` in the slice (may lie outside it)."""

    start: np.ndarray  # (2,) int, slice pixels
    shape: tuple[int, int]

    def overlap(self, slice_shape: tuple[int, int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(the overlap in slice pixels, the same pixels in crop pixels); None when they do not meet."""
        lo = np.maximum(self.start, 0)
        hi = np.minimum(self.start + np.array(self.shape), slice_shape)
        if np.any(hi <= lo):
            return None
        return (tuple(slice(a, b) for a, b in zip(lo, hi)),
                tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, self.start)))

    def to_crop(self, coords) -> np.ndarray:
        """Slice pixel coordinates (x, y pairs: a point, a box's corners, several points) in crop pixels."""
        c = np.asarray(coords, np.float64)
        return (c.reshape(-1, 2) - self.start).reshape(c.shape)

    def cut(self, slice2d: np.ndarray) -> np.ndarray:
        """The crop of ``slice2d`` (zero where the window leaves the slice)."""
        crop = np.zeros(self.shape, slice2d.dtype)
        where = self.overlap(slice2d.shape)
        if where is not None:
            crop[where[1]] = slice2d[where[0]]
        return crop


def box_window(box, slice_shape: tuple[int, int], spacing: tuple[float, float], zoom: float) -> BoxWindow:
    """The window around ``box`` (x0, y0, x1, y1 in the slice's array indices), square in mm."""
    sp = np.asarray(spacing, np.float64)
    b = np.asarray(box, np.float64).reshape(2, 2)
    lo, hi = b.min(0), b.max(0)
    extent = np.asarray(slice_shape) * sp
    side = max(float(((hi - lo + 1) * sp).max()) * zoom, 0.25 * float(extent.max()))
    side = min(side, float(extent.max()))
    n = np.maximum(1, np.round(side / sp)).astype(int)
    start = np.round((lo + hi) / 2 - (n - 1) / 2).astype(int)
    return BoxWindow(start=start, shape=(int(n[0]), int(n[1])))

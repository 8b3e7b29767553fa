"""What the completion refiner sees of one slice to complete, in a study with some slices labelled.

Same-study completion interpolates a structure's outline between the labelled slices
(``data.shape_interpolation.shape_prior``); the image between them is what that interpolation cannot use.
The refiner looks at a square window around the structure on the slice to complete and on the two
labelled slices that bracket it, with their masks and the interpolated outline, and corrects the
outline where the image says the structure moved. This module cuts those windows, the same way for
training episodes and for a user's study.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medfound.data.shape_interpolation import mean_gap

#: channels of one input: the slice to complete, the labelled slice below it and its mask, the one
#: above and its mask, the interpolated outline (probability), the fraction of the gap from the slice
#: below (0 beyond the ends), and the distance beyond the outermost labelled slice in mean gaps.
CHANNELS = ("image", "image_below", "mask_below", "image_above", "mask_above", "prior", "t", "beyond")


@dataclass(frozen=True)
class Window:
    """A square in-plane window (array indices along the two in-plane axes) around a structure."""

    r0: int
    r1: int
    c0: int
    c1: int

    def cut(self, plane: np.ndarray) -> np.ndarray:
        """The window of a 2D slice (or of the last two axes of a stack)."""
        return plane[..., self.r0:self.r1, self.c0:self.c1]


def structure_window(masks: np.ndarray, margin: float = 0.3, min_margin: int = 6) -> Window | None:
    """The window around the union of ``masks`` (k, H, W) bool: its bounding square widened by
    ``margin`` of its side (at least ``min_margin`` px) on each side, clipped to the slice; ``None``
    when every mask is empty."""
    union = masks.any(0)
    if not union.any():
        return None
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    half = side / 2 + max(margin * side, min_margin)
    rc, cc = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    h, w = union.shape
    r0, c0 = max(int(np.floor(rc - half)), 0), max(int(np.floor(cc - half)), 0)
    return Window(r0, min(int(np.ceil(rc + half)), h), c0, min(int(np.ceil(cc + half)), w))


def intensity_scale(stack: np.ndarray) -> tuple[float, float]:
    """(low, high): the 1st and 99th percentiles of a study's windows, which map to 0 and 1."""
    lo, hi = np.percentile(stack, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def bracket(z: int, slices: np.ndarray) -> tuple[int, int, float, float]:
    """The labelled slices below and above slice ``z`` (the outermost one twice beyond the ends),
    the fraction of the gap from the one below, and how far beyond the ends in mean gaps."""
    below, above = slices[slices < z], slices[slices > z]
    gap = mean_gap(slices)
    if len(below) and len(above):
        a, b = int(below[-1]), int(above[0])
        return a, b, (z - a) / (b - a), 0.0
    end = int(below[-1]) if len(below) else int(above[0])
    return end, end, 0.0, abs(z - end) / gap


def refiner_inputs(images: np.ndarray, masks: dict[int, np.ndarray], prior: np.ndarray, slices: np.ndarray,
                   targets: list[int], window: Window, scale: tuple[float, float], size: int) -> torch.Tensor:
    """(len(targets), 8, size, size) float32: the :data:`CHANNELS` of each slice in ``targets``.

    ``images`` (n, H, W) and ``prior`` (n, H, W) are the study's slices along the completion axis,
    ``masks`` the labelled slices' masks of the structure (slice index -> (H, W) bool), ``slices``
    the sorted labelled slice indices. Windows are resized to ``size`` (bilinear), so a structure of
    any size fills the same field."""
    lo, hi = scale
    rows = []
    for z in targets:
        a, b, t, beyond = bracket(z, slices)
        planes = [images[z], images[a], masks[a], images[b], masks[b], prior[z]]
        cut = np.stack([window.cut(np.asarray(p, np.float32)) for p in planes])
        for i in (0, 1, 3):
            cut[i] = np.clip((cut[i] - lo) / (hi - lo), -0.5, 1.5)
        const = np.broadcast_to(np.array([t, beyond], np.float32)[:, None, None], (2,) + cut.shape[1:])
        rows.append(np.concatenate([cut, const]))
    x = torch.from_numpy(np.stack(rows))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


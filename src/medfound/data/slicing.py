"""3D volumes -> 2D slices at a fixed square size, resampled by physical size (and back).

A slice of 0.5 x 2 mm pixels must not look squashed to the network: each slice is resized so that
its longer physical side fills ``size`` pixels with square pixels, then padded to ``size x size``.
:class:`SquareGeometry` remembers how, so that a prediction maps back onto the original pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medfound.io.image import MedImage


@dataclass(frozen=True)
class SquareGeometry:
    """Where an original slice of ``shape`` lies inside the ``size x size`` square."""

    shape: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    size: int


def square_geometry(shape: tuple[int, int], spacing: tuple[float, float], size: int) -> SquareGeometry:
    extent = (shape[0] * spacing[0], shape[1] * spacing[1])
    scale = size / max(extent)
    resized = tuple(max(1, min(size, int(round(e * scale)))) for e in extent)
    offset = tuple((size - r) // 2 for r in resized)
    return SquareGeometry(shape=tuple(shape), resized=resized, offset=offset, size=size)


def _resize(a: torch.Tensor, shape: tuple[int, int], nearest: bool) -> torch.Tensor:
    # a: (N, C, H, W)
    if tuple(a.shape[-2:]) == tuple(shape):
        return a
    if nearest:
        return F.interpolate(a, size=shape, mode="nearest-exact")
    shrink = shape[0] < a.shape[-2] or shape[1] < a.shape[-1]
    return F.interpolate(a, size=shape, mode="bilinear", align_corners=False, antialias=shrink)


def to_square(slice2d: np.ndarray, spacing: tuple[float, float], size: int, nearest: bool = False,
              pad_value: float = 0.0) -> tuple[np.ndarray, SquareGeometry]:
    """Resample one 2D slice to ``size x size`` keeping its physical aspect ratio."""
    geom = square_geometry(slice2d.shape, spacing, size)
    t = torch.from_numpy(np.ascontiguousarray(slice2d, dtype=np.float32))[None, None]
    t = _resize(t, geom.resized, nearest)[0, 0]
    out = torch.full((size, size), float(pad_value), dtype=torch.float32)
    (oi, oj), (ri, rj) = geom.offset, geom.resized
    out[oi:oi + ri, oj:oj + rj] = t
    return out.numpy(), geom


def from_square(square: np.ndarray | torch.Tensor, geom: SquareGeometry, nearest: bool = False) -> np.ndarray:
    """Map a ``(..., size, size)`` array (a mask, or per-class scores) back to the slice's pixels."""
    t = torch.as_tensor(square, dtype=torch.float32)
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, geom.size, geom.size)
    (oi, oj), (ri, rj) = geom.offset, geom.resized
    t = _resize(t[:, :, oi:oi + ri, oj:oj + rj], geom.shape, nearest)
    return t.reshape(*lead, *geom.shape).numpy()


def iter_slices(image: MedImage, axis: int = 2) -> Iterator[tuple[int, np.ndarray, tuple[float, float]]]:
    """Yield ``(index, slice, in-plane spacing)`` along ``axis``; a 2D image is its one slice."""
    if image.ndim == 2:
        yield 0, image.array, tuple(image.spacing[:2])
        return
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    spacing = tuple(s for d, s in enumerate(image.spacing) if d != axis)
    for k in range(image.shape[axis]):
        yield k, np.take(image.array, k, axis=axis), spacing

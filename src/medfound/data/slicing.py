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
    pixel_mm: float  # side of one square pixel in mm (the slice's longer physical side / size)


def square_geometry(shape: tuple[int, int], spacing: tuple[float, float], size: int) -> SquareGeometry:
    extent = (shape[0] * spacing[0], shape[1] * spacing[1])
    scale = size / max(extent)
    resized = tuple(max(1, min(size, int(round(e * scale)))) for e in extent)
    offset = tuple((size - r) // 2 for r in resized)
    return SquareGeometry(shape=tuple(shape), resized=resized, offset=offset, size=size, pixel_mm=1.0 / scale)


def square_coords(index: np.ndarray, geom: SquareGeometry) -> np.ndarray:
    """Pixel coordinates (..., 2) of the original slice -> coordinates in the square."""
    scale = np.array(geom.resized, np.float32) / np.array(geom.shape, np.float32)
    return (np.asarray(index, np.float32) + 0.5) * scale - 0.5 + np.array(geom.offset, np.float32)


def slice_coords(point: np.ndarray, geom: SquareGeometry) -> np.ndarray:
    """The inverse of :func:`square_coords`: square coordinates (..., 2) -> original slice pixels."""
    scale = np.array(geom.shape, np.float32) / np.array(geom.resized, np.float32)
    return (np.asarray(point, np.float32) - np.array(geom.offset, np.float32) + 0.5) * scale - 0.5


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
    return t.reshape(*lead, *geom.shape).cpu().numpy()


def iter_slices(image: MedImage, axis: int = 2) -> Iterator[tuple[int, np.ndarray, tuple[float, float]]]:
    """Yield ``(index, slice, in-plane spacing)`` along ``axis``; a 2D image is its one slice."""
    if image.ndim == 2:
        yield 0, image.array, tuple(image.spacing[:2])
        return
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    spacing = plane_spacing(image, axis)
    for k in range(image.shape[axis]):
        yield k, take_slice(image.array, axis, k), spacing


def plane_spacing(image: MedImage, axis: int) -> tuple[float, float]:
    """In-plane pixel spacing of ``image``'s slices along ``axis`` (a 2D image: its own)."""
    if image.ndim == 2:
        return float(image.spacing[0]), float(image.spacing[1])
    return tuple(float(s) for d, s in enumerate(image.spacing) if d != axis)


def take_slice(array: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Slice ``k`` of ``array`` along ``axis`` (a 2D ``array`` is its one slice)."""
    return array if array.ndim == 2 else np.take(array, k, axis=axis)


def put_slice(volume: np.ndarray, axis: int, k: int, values: np.ndarray) -> None:
    """``volume``'s slice ``k`` along ``axis`` := ``values`` (a 2D ``volume`` is its one slice)."""
    if volume.ndim == 2:
        volume[:] = values
        return
    idx = [slice(None)] * 3
    idx[axis] = k
    volume[tuple(idx)] = values


def _window_grid(centres: np.ndarray, spacing: tuple[float, float], shape: tuple[int, int], side_mm: float,
                 size: int) -> torch.Tensor:
    """``grid_sample`` grid (B, size, size, 2) of square windows ``side_mm`` wide, centred at ``centres``
    (B, 2) (pixel index coordinates of slices of ``shape``)."""
    offs = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) * (side_mm / size)  # mm from the centre
    c = torch.as_tensor(centres, dtype=torch.float64)
    rows = c[:, :1] + offs[None] / spacing[0]  # (B, size) index coordinates along the slice's first dim
    cols = c[:, 1:] + offs[None] / spacing[1]
    gy = 2 * rows / max(shape[0] - 1, 1) - 1
    gx = 2 * cols / max(shape[1] - 1, 1) - 1
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], -1)
    return grid.float()


def crop_windows(slices: np.ndarray, spacing: tuple[float, float], centres: np.ndarray, side_mm: float, size: int,
                 nearest: bool = False) -> np.ndarray:
    """(B, H, W) slices -> (B, size, size) square windows of ``side_mm`` x ``side_mm`` around ``centres``
    (B, 2) with square pixels; zero outside the slice. The structure-centred view of the in-context
    refinement pass: a fixed physical pixel size, whatever each scan's field of view. Slices are
    smoothed first where the window's pixels are coarser than the slice's (no aliasing)."""
    from scipy import ndimage

    px = side_mm / size
    sigma = [max(0.0, (px / s - 1) / 2) for s in spacing]
    arr = np.asarray(slices, dtype=np.float32)
    if not nearest and max(sigma) > 0.1:
        arr = np.stack([ndimage.gaussian_filter(a, sigma) for a in arr])
    grid = _window_grid(centres, spacing, arr.shape[1:], side_mm, size)
    out = F.grid_sample(torch.from_numpy(arr)[:, None], grid, mode="nearest" if nearest else "bilinear",
                        padding_mode="zeros", align_corners=True)
    return out[:, 0].numpy()


def paste_windows(windows: np.ndarray | torch.Tensor, spacing: tuple[float, float], shape: tuple[int, int],
                  centres: np.ndarray, side_mm: float) -> np.ndarray:
    """The inverse of :func:`crop_windows`: (B, size, size) window results -> (B, H, W) on the slices'
    pixels, zero outside each window."""
    w = torch.as_tensor(windows, dtype=torch.float32)
    size = w.shape[-1]
    px = side_mm / size
    c = torch.as_tensor(centres, dtype=torch.float64)
    u = (torch.arange(shape[0], dtype=torch.float64)[None] - c[:, :1]) * spacing[0] / px + size / 2 - 0.5
    v = (torch.arange(shape[1], dtype=torch.float64)[None] - c[:, 1:]) * spacing[1] / px + size / 2 - 0.5
    gy, gx = 2 * u / (size - 1) - 1, 2 * v / (size - 1) - 1
    grid = torch.stack([gx[:, None, :].expand(-1, shape[0], -1), gy[:, :, None].expand(-1, -1, shape[1])], -1)
    return F.grid_sample(w[:, None], grid.float(), mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0].numpy()

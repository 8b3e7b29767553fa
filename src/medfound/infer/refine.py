"""The in-context refinement pass: each structure again, on a window around it, at 2-3x the resolution.

The first pass sees whole slices at the model's working size (128 px for a 22 cm field of view: 1.7 mm
pixels), so a pallidum is a dozen pixels across and one pixel of boundary costs a tenth of its Dice.
The second pass takes the box that holds the first pass's prediction (over all slices) and the
support masks, in the first pass's square frame, twice as wide, and cuts that window out of the
*original* slices of the query and of every support at 2-3x the first pass's pixel density (3x for
small structures, 2x for large ones, at most 256 px). Query and supports share the window in frame
coordinates, so the correspondence that the first pass relies on (the same structure near the same
place in the frame) holds in the second. The model is convolutional with local attention, so it runs
on any window size that is a multiple of 8. Measured and chosen on non-held-out validation
structures (see the packaged model's ``config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from medfound.data.slicing import (SquareGeometry, crop_windows, paste_windows, plane_spacing, put_slice,
                                   slice_coords, square_coords, square_geometry, take_slice)
from medfound.infer.incontext import PreparedSlices, SupportEncodings, SupportPool, largest_component, native_supports
from medfound.models.incontext import InContextSegmenter


@dataclass(frozen=True)
class Window:
    """A square window in the first pass's square frame (centre and side in its pixels), sampled at
    ``size`` x ``size`` pixels."""

    centre: np.ndarray
    side: float
    size: int


def plan_window(query_plane: np.ndarray, geom: SquareGeometry, support_masks: np.ndarray, context: float = 2.0,
                zoom: tuple[float, float] = (2.0, 3.0), max_size: int = 256) -> Window | None:
    """The window around the query's first-pass prediction (``query_plane``: its in-plane footprint on
    the query's slice grid) and the support masks (square frame), ``context`` times the box's longer
    side, sampled at ``zoom`` times the frame's pixel density (more for small boxes, within the range)."""
    if not query_plane.any():
        return None
    idx = np.argwhere(query_plane)
    sidx = np.argwhere(support_masks.max(0) > 0.5)
    lo, hi = square_coords(idx.min(0), geom), square_coords(idx.max(0), geom)
    if len(sidx):
        lo, hi = np.minimum(lo, sidx.min(0)), np.maximum(hi, sidx.max(0))
    side = float(context * (hi - lo + 1).max())
    z = float(np.clip(geom.size / side, *zoom))
    size = int(np.clip(np.ceil(side * z / 8) * 8, 64, max_size))
    return Window((lo + hi) / 2.0, side, size)


def crop_support(pool: SupportPool, window: Window, frame_size: int) -> SupportPool:
    """``pool`` with every support image and mask replaced by ``window`` cut from its original slice."""
    images, masks = [], []
    for img, mask, sp in native_supports(pool):
        geom = square_geometry(img.shape, sp, frame_size)
        centre, side_mm = slice_coords(window.centre, geom)[None], window.side * geom.pixel_mm
        images.append(crop_windows(img[None], sp, centre, side_mm, window.size)[0])
        masks.append(crop_windows(mask[None].astype(np.float32), sp, centre, side_mm, window.size)[0] > 0.5)
    return replace(pool, images=np.stack(images).astype(np.float32), masks=np.stack(masks).astype(np.float32))


def refine_label(model: InContextSegmenter, prep: PreparedSlices, members: list[SupportPool], prob: np.ndarray,
                 slices: np.ndarray, batch_size: int = 16, context: float = 2.0,
                 zoom: tuple[float, float] = (2.0, 3.0), flip: bool = False) -> np.ndarray:
    """One label's refined probability map (the grid of ``prob``, the first pass's map) on the query
    ``slices`` the first pass segmented; ``prob`` itself when the first pass found nothing. ``flip``:
    mirrored test-time augmentation, as in the first pass."""
    if any(not p.label_maps for p in members):
        return prob  # supports without their original slices (built by hand): nothing to cut windows from
    three_d = prep.view.ndim == 3
    found = largest_component(prob > 0.5) if three_d else prob > 0.5
    geom = prep.geoms[0]
    window = plan_window(found.any(prep.axis) if three_d else found, geom,
                         np.concatenate([p.masks for p in members]), context, zoom)
    if window is None:
        return prob
    device = next(model.parameters()).device
    enc = SupportEncodings(model, {0: [crop_support(p, window, geom.size) for p in members]}, device, flip)
    sp = plane_spacing(prep.view, prep.axis)
    centre, side_mm = slice_coords(window.centre, geom), window.side * geom.pixel_mm
    out = np.zeros_like(prob)
    todo = np.flatnonzero(slices)
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            ks = todo[start:start + batch_size]
            native = np.stack([take_slice(prep.view.array, prep.axis, k) for k in ks])
            centres = np.repeat(centre[None], len(ks), 0)
            x = torch.from_numpy(crop_windows(native, sp, centres, side_mm, window.size))[:, None].to(device)
            qpos = torch.from_numpy(prep.positions[ks]).to(device) if three_d else None
            p = enc.probability(0, x, qpos)
            back = paste_windows(p[:, 0].float().cpu(), sp, native.shape[1:], centres, side_mm)
            for k, b in zip(ks, back):
                put_slice(out, prep.axis, k, b)
    return out

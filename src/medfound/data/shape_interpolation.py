"""A structure's outline between labelled slices of one study, from the labelled outlines alone.

Shape-based interpolation: each labelled slice's outline as a signed distance map, blended by
height between the two labelled slices around a slice (the shape morphs from one outline to the
next; an empty labelled slice closes the structure), shrinking to nothing beyond the outermost
labelled slice. What same-study completion starts from, and what its refiner corrects.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medfound.data.slicing import take_slice


def signed_distance(mask: np.ndarray, spacing: tuple[float, float], empty: float) -> np.ndarray:
    """mm from the outline, negative inside; ``empty`` everywhere for an empty slice."""
    if not mask.any():
        return np.full(mask.shape, empty, np.float32)
    if mask.all():
        return np.full(mask.shape, -empty, np.float32)
    return (ndimage.distance_transform_edt(~mask, sampling=spacing)
            - ndimage.distance_transform_edt(mask, sampling=spacing)).astype(np.float32)


def shape_prior(labels: np.ndarray, slices: np.ndarray, value: int, axis: int, spacing: tuple[float, float],
                softness_mm: float = 1.0, taper: float = 1.0) -> np.ndarray:
    """Probability of label ``value`` on every slice (canonical grid, float32) from the labelled
    ``slices`` alone: between two labelled slices their signed distances blended by height (the shape
    morphs from one outline to the next; an empty labelled slice closes the structure); beyond the
    outermost labelled slice the outline shrinks and vanishes ``taper`` mean gaps further out.
    ``softness_mm``: the width of the logistic step across the interpolated outline."""
    n = labels.shape[axis]
    masks = {int(k): take_slice(labels, axis, int(k)) == value for k in slices}
    held = [k for k in masks if masks[k].any()]
    if not held:
        return np.zeros(labels.shape, np.float32)
    # an empty slice counts as "the outline is this far away": about the structure's own size
    depth = max(float(ndimage.distance_transform_edt(masks[k], sampling=spacing).max()) for k in held)
    sdf = {k: signed_distance(m, spacing, empty=depth) for k, m in masks.items()}
    ks = np.asarray(sorted(masks))
    gap = mean_gap(ks)
    out = np.zeros(labels.shape, np.float32)
    view = np.moveaxis(out, axis, 0)
    for z in range(n):
        lo, hi = ks[ks <= z], ks[ks >= z]
        if len(lo) and len(hi):
            a, b = int(lo[-1]), int(hi[0])
            t = 0.0 if a == b else (z - a) / (b - a)
            d = (1 - t) * sdf[a] + t * sdf[b]
        else:
            end = int(lo[-1]) if len(lo) else int(hi[0])
            if not masks[end].any():
                continue
            reach = max(taper * gap, 1.0)  # beyond the ends: shrink to nothing over `reach` slices
            d = sdf[end] + depth * abs(z - end) / reach
        view[z] = 1.0 / (1.0 + np.exp(np.clip(d / max(softness_mm, 1e-3), -30, 30)))
    return out


def mean_gap(slices: np.ndarray, single: float = 4.0) -> float:
    """The mean distance (in slices) between sorted labelled slices; ``single`` for one slice."""
    return float(np.diff(slices).mean()) if len(slices) > 1 else single


def prior_reach(prior: np.ndarray, axis: int) -> np.ndarray:
    """(n,) bool: the slices along ``axis`` where the shape prior holds the label anywhere."""
    return np.moveaxis(prior, axis, 0).reshape(prior.shape[axis], -1).max(1) > 0.01

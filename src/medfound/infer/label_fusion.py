"""Training-free baselines for example-set segmentation.

:func:`label_fusion`: for every query slice, the support slice that looks most alike (normalised
cross-correlation of the square slices) lends it its mask. :func:`registered_label_fusion`: the
support slices already registered onto the query (placed at the query height they show and resampled
onto its grid), every query slice within their range takes the mask of the one nearest in height —
slice-wise atlas propagation, the bar an in-context model must clear on registered brains (DESIGN.md):
no training, no parameters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _standardise(x: torch.Tensor) -> torch.Tensor:
    # (n, S, S) -> (n, D) zero-mean, unit-norm rows at 64 px (the comparison needs no more detail)
    x = F.interpolate(x[:, None].float(), size=(64, 64), mode="area").flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-6)


def nearest_support(query: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Index of the most correlated support slice for each query slice: (n,) from (n, S, S), (m, S, S)."""
    q, s = _standardise(torch.from_numpy(query)), _standardise(torch.from_numpy(support))
    return (q @ s.t()).argmax(1).numpy()


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two square slices (as :func:`nearest_support` compares them)."""
    x = _standardise(torch.from_numpy(np.stack([a, b]).astype(np.float32)))
    return float(x[0] @ x[1])


def label_fusion(query: np.ndarray, support: np.ndarray, support_masks: np.ndarray) -> np.ndarray:
    """(n, S, S) masks for the query slices: each the mask of its nearest support slice."""
    return support_masks[nearest_support(query, support)].astype(np.float32)


def registered_label_fusion(query_positions: np.ndarray, support_positions: np.ndarray, support_masks: np.ndarray,
                            inside: np.ndarray | None = None) -> np.ndarray:
    """(n, S, S) masks for query slices at ``query_positions`` (n,): each the mask of the support slice
    nearest in (registered) position; empty where ``inside`` (n,) bool is False — the slices the supports
    do not speak for (``None``: every slice, as for 2D images)."""
    nearest = np.abs(np.asarray(query_positions)[:, None] - np.asarray(support_positions)[None]).argmin(1)
    out = support_masks[nearest].astype(np.float32)
    if inside is not None:
        out[~np.asarray(inside, bool)] = 0
    return out

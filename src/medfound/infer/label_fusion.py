"""Training-free baseline for example-set segmentation: for every query slice, the support slice that
looks most alike (normalised cross-correlation of the square slices) lends it its mask.

It is the bar an in-context model must clear (DESIGN.md): no training, no parameters, and on
registered brains it is hard to beat.
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


def label_fusion(query: np.ndarray, support: np.ndarray, support_masks: np.ndarray) -> np.ndarray:
    """(n, S, S) masks for the query slices: each the mask of its nearest support slice."""
    return support_masks[nearest_support(query, support)].astype(np.float32)

"""Pretraining augmentation on one normalised slice: random resized crop, flips, intensity jitter.

Written with torch ops on a single (1, H, W) tensor inside data-loader workers, driven by an
explicit numpy Generator so that a stream replayed with the same seed augments identically.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def random_resized_crop(x: torch.Tensor, size: int, rng: np.random.Generator, scale=(0.35, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random area fraction ``scale`` with aspect ``ratio`` and resize to ``size x size``."""
    _, H, W = x.shape
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = int(round(math.sqrt(area / aspect))), int(round(math.sqrt(area * aspect)))
        if 0 < h <= H and 0 < w <= W:
            i, j = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            break
    else:
        h, w, i, j = H, W, 0, 0
    crop = x[:, i:i + h, j:j + w][None]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=h > size or w > size)[0]


def intensity_jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Gamma, contrast and brightness changes, kept in [0, 1]."""
    x = x.clamp(0, 1) ** float(math.exp(rng.uniform(-0.3, 0.3)))
    x = (x - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)
    return x.clamp(0, 1)


def pretrain_augment(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    x = random_resized_crop(x, size, rng)
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        x = x.flip(-2)
    return intensity_jitter(x, rng)

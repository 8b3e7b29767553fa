"""Same-study episodes for training the completion refiner, drawn from labelled sample volumes.

An episode is what a user of ``segment --partial-labels`` gives: one structure of one volume with a
few slices labelled, spread evenly over its extent (2 to 16 of them, the spread shifted at random),
along a random axis. Its samples are slices the interpolated outline reaches that were not labelled,
each with the refiner's inputs (``completion_inputs.refiner_inputs``) and the true mask in the same
window. DESIGN.md's held-out structures (and any ``exclude_labels``) are never episodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medfound.data.completion_inputs import (
    Window,
    intensity_scale,
    refiner_inputs,
    structure_window,
)
from medfound.data.heldout import is_heldout
from medfound.data.shape_interpolation import prior_reach, shape_prior
from medfound.errors import InputError

#: how many slices an episode gives, drawn uniformly among those the structure is long enough for
LABELLED_COUNTS = (2, 3, 4, 6, 8, 12, 16)


@dataclass
class CompletionBank:
    """Refiner inputs (N, 8, S, S) and true masks (N, S, S), both float16, with where they came from."""

    inputs: torch.Tensor
    targets: torch.Tensor
    datasets: list[str]
    structures: int
    episodes: int
    sources: dict = field(default_factory=dict)  # dataset name -> samples

    def summary(self) -> dict:
        return {"datasets": self.datasets, "samples": int(self.inputs.shape[0]), "episodes": self.episodes,
                "structures": self.structures, "tasks": self.structures, "window": int(self.inputs.shape[-1]), "per_dataset": self.sources}


def spread_slices(extent: tuple[int, int], n: int, phase: float) -> np.ndarray:
    """``n`` slice indices spread evenly over ``extent`` (first, last), the spread started at
    ``phase`` (0..1) of a gap: 0.5 centres every slice in its share of the extent."""
    lo, hi = extent
    ks = np.round(lo + (np.arange(n) + phase) * (hi - lo + 1) / n - 0.5).astype(int)
    return np.unique(np.clip(ks, lo, hi))


def structure_episode(images: np.ndarray, truth: np.ndarray, given: np.ndarray, spacing: tuple[float, float],
                      size: int, rng: np.random.Generator, samples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Up to ``samples`` (inputs, targets) of one episode: ``images`` (n, H, W) and ``truth`` (n, H, W)
    bool along the completion axis, ``given`` the labelled slice indices."""
    window = structure_window(truth[given])
    if window is None:
        return None
    sub = window.cut(truth)
    sparse = np.zeros(sub.shape, np.int32)
    sparse[given] = sub[given]
    prior = shape_prior(sparse, given, 1, 0, spacing)
    reach = np.flatnonzero(prior_reach(prior, 0))
    todo = np.setdiff1d(reach, given)
    if not len(todo):
        return None
    targets = sorted(rng.choice(todo, size=min(samples, len(todo)), replace=False).tolist())
    crops = window.cut(images)
    masks = {int(k): sub[k].astype(np.float32) for k in given}
    whole = Window(0, sub.shape[1], 0, sub.shape[2])  # prior and masks are already cut to the window
    x = refiner_inputs(crops, masks, prior, given, targets, whole, intensity_scale(crops[reach]), size)
    y = F.interpolate(torch.from_numpy(sub[targets].astype(np.float32))[:, None], size=(size, size),
                      mode="bilinear", align_corners=False)[:, 0]
    return x.half(), y.half()


def build_completion_bank(datasets: list[str | os.PathLike], size: int = 96, episodes_per_structure: int = 6,
                          samples_per_episode: int = 6, axes: tuple[int, ...] = (0, 1, 2),
                          exclude_labels: tuple[str, ...] = (), seed: int = 0, min_slices: int = 6,
                          progress: bool = True) -> CompletionBank:
    """Episodes from every non-held-out structure of every labelled case of ``datasets``."""
    from medfound.data.nnunet import NnUNetDataset
    from medfound.data.orientation import to_canonical
    from medfound.progress import Progress

    rng = np.random.default_rng(seed)
    exclude = {e.lower() for e in exclude_labels}
    jobs = [(ds, case) for ds in (NnUNetDataset.open(d) for d in datasets) for case in ds.cases()]
    if not jobs:
        raise InputError(None, "no labelled cases in the --dataset folders")
    xs, ys, sources = [], [], {}
    n_struct = n_ep = 0
    with Progress("completion episodes", len(jobs), enabled=progress) as bar:
        for ds, case in jobs:
            image, label = ds.read_case(case)
            if label is None or image.ndim != 3:
                bar.advance(1, case)
                continue
            view = to_canonical(image)[0]
            img = view.array.astype(np.float32)
            lab = to_canonical(label)[0].array.astype(np.int32)
            names = {v: n for n, v in ds.labels.items() if v != 0 and not is_heldout(n) and n.lower() not in exclude}
            for v in sorted(set(np.unique(lab).tolist()) & set(names)):
                truth_all = lab == v
                n_struct += 1
                for _ in range(episodes_per_structure):
                    axis = int(rng.choice(axes))
                    truth = np.moveaxis(truth_all, axis, 0)
                    z = np.flatnonzero(truth.any((1, 2)))
                    counts = [c for c in LABELLED_COUNTS if len(z) >= 2 * c]
                    if z[-1] - z[0] + 1 < min_slices or not counts:
                        continue
                    given = spread_slices((int(z[0]), int(z[-1])), int(rng.choice(counts)), float(rng.uniform()))
                    spacing = tuple(float(s) for d, s in enumerate(view.spacing) if d != axis)
                    got = structure_episode(np.moveaxis(img, axis, 0), truth, given, spacing, size, rng,
                                            samples_per_episode)
                    if got is not None:
                        xs.append(got[0])
                        ys.append(got[1])
                        n_ep += 1
                        sources[ds.name] = sources.get(ds.name, 0) + len(got[0])
            bar.advance(1, case)
    if not xs:
        raise InputError(None, "no structure in the --dataset folders gives a completion episode "
                         "(all held out or excluded, or shorter than 6 slices)")
    return CompletionBank(torch.cat(xs), torch.cat(ys), [str(ds.root.name) for ds, _ in jobs], n_struct, n_ep, sources)

"""Dice of SAM by prompt type (box, 1, 3 and 5 positive points) on held-back cases, for the base
model and the LoRA-adapted one with identical prompts (same seed), as MedSAM's evaluation does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from medfound.data.labeled import case_slices, label_lut, training_classes
from medfound.data.nnunet import NnUNetDataset
from medfound.data.prompts import jittered_box, sample_points
from medfound.io.atomic import write_csv
from medfound.models.sam import decode, to_sam_input

PROMPTS = ("box", "1 point", "3 points", "5 points")


@torch.no_grad()
def dice_by_prompt(sam, ds: NnUNetDataset, cases: list[str], image_size: int, seed: int = 0,
                   max_slices_per_case: int = 12) -> dict[str, list[float]]:
    classes = training_classes(ds)
    lut = label_lut(ds, classes)
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {p: [] for p in PROMPTS}
    for case in cases:
        cs = case_slices(ds, case, image_size, lut, keep_empty=0.0, rng=np.random.default_rng(0))
        pick = np.linspace(0, len(cs.images) - 1, min(max_slices_per_case, len(cs.images))).round().astype(int)
        for i in np.unique(pick):
            x = torch.from_numpy(cs.images[i])[None, None]
            emb = sam.image_encoder(to_sam_input(x.transpose(-1, -2)))
            for c in range(1, len(classes) + 1):
                truth = cs.labels[i] == c
                if truth.sum() < 4:
                    continue
                for prompt in PROMPTS:
                    if prompt == "box":
                        boxes, points = torch.from_numpy(jittered_box(truth, rng, 0))[None], None
                    else:
                        pts, lab = sample_points(truth, int(prompt[0]), 0, rng)
                        boxes, points = None, (torch.from_numpy(pts)[None], torch.from_numpy(lab)[None])
                    pred = (decode(sam, emb, boxes, points, image_size)[0, 0].T > 0).numpy()
                    out[prompt].append(float(2 * (pred & truth).sum() / (pred.sum() + truth.sum())))
    return out


def compare(models: dict[str, object], ds: NnUNetDataset, cases: list[str], image_size: int,
            out_csv: str | os.PathLike, seed: int = 0) -> list[dict]:
    rows = []
    for name, sam in models.items():
        scores = dice_by_prompt(sam, ds, cases, image_size, seed)
        for prompt, values in scores.items():
            rows.append({"model": name, "prompt": prompt, "dice_mean": float(np.mean(values)) if values else float("nan"),
                         "dice_std": float(np.std(values)) if values else float("nan"), "n": len(values)})
    write_csv(Path(out_csv), rows, "{:.4f}")
    return rows

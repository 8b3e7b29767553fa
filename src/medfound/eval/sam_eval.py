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
from medfound.errors import InputError
from medfound.eval.metrics import summarise
from medfound.io.atomic import write_csv
from medfound.models.sam import decode, sam_view, to_sam_input

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
            emb = sam.image_encoder(to_sam_input(sam_view(x)))
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
                    pred = (sam_view(decode(sam, emb, boxes, points, image_size))[0, 0] > 0).numpy()
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


def _interior_point(mask: np.ndarray) -> np.ndarray:
    """The most interior pixel of a mask: where a user clicks "inside"."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.argwhere(dist == dist.max())[0].astype(np.float32)


def _box_ellipse(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """The ellipse inscribed in a box: what a box alone tells, the floor a promptable model must beat."""
    x0, y0, x1, y1 = box
    i, j = np.ogrid[:shape[0], :shape[1]]
    ci, cj, ri, rj = (x0 + x1) / 2, (y0 + y1) / 2, max(0.5, (x1 - x0 + 1) / 2), max(0.5, (y1 - y0 + 1) / 2)
    return ((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 <= 1


def _piece_boxes(truth: np.ndarray, rng: np.random.Generator, min_pixels: int,
                 max_shift: int) -> list[np.ndarray] | None:
    """One jittered box per connected piece of at least ``min_pixels`` (how a user boxes both kidneys);
    None where the structure is in one piece (its box is then the whole structure's) or no piece is
    that large."""
    from scipy import ndimage

    pieces, n = ndimage.label(truth)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
    big = [i + 1 for i in np.flatnonzero(sizes >= min_pixels)]
    return [jittered_box(pieces == i, rng, max_shift) for i in big] if n > 1 and big else None


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, int(a.sum()) + int(b.sum())))


@torch.no_grad()
def structure_prompt_dice(sam, config: dict, ds: NnUNetDataset, cases: list[str], labels: dict[int, str],
                          seed: int = 0, max_slices: int = 12, min_pixels: int = 20, propagate: bool = True,
                          per_piece: bool = False, axis: int = 2, box_shift: int = 2) -> list[dict]:
    """Per (case, structure, prompt) Dice through the same session a user drives (full-resolution
    slices across ``axis`` of the RAS-oriented volume: 2 axial, 1 coronal, 0 sagittal; box zoom as the
    model's config says). Prompts: a box drawn around the structure (each side off by up to
    ``box_shift`` px, in or out), one click at its most interior pixel, the box plus one corrective
    click, and the box on the largest slice propagated through the volume (3D Dice). The inscribed
    ellipse of the box is the baseline row. ``per_piece`` adds one box per connected piece of the
    structure on the slice (at least ``min_pixels``), each answered alone and the masks united, with
    the union of their inscribed ellipses as its baseline: how a user prompts a structure in several
    pieces, such as both kidneys. Where the structure is in one piece it is the box prompt itself; the
    pieces' boxes come from a generator of their own, so the other prompts' stay put.

    Every slice's prompts come from a generator seeded by (seed, case, structure, slice): the box, and so
    the ellipse, is the same for every model, while the corrective click (drawn from each model's own
    error) cannot shift the boxes that follow, so models are compared on identical boxes."""
    from medfound.data.orientation import to_canonical
    from medfound.data.prompts import correction_point
    from medfound.infer.sam_segment import SamSession

    rows = []
    for ci, case in enumerate(cases):
        image, label = ds.read_case(case)
        if image.ndim == 3:
            image, _ = to_canonical(image)
            label, _ = to_canonical(label)
        if image.ndim == 2 and axis != 2:
            raise InputError(ds.image_path(case), "a 2D image has one slice plane: --axis 2")
        session = SamSession.for_model(sam, config, image, axis=axis)
        lab = np.moveaxis(label.array, axis, -1) if label.ndim == 3 else label.array[..., None]  # slices last
        for value, name in labels.items():
            truth3 = lab == value
            area = truth3.sum((0, 1))
            present = np.flatnonzero(area >= min_pixels)
            if not len(present):
                continue
            scores: dict[str, list[float]] = {"box (inscribed ellipse)": [], "box": [], "1 point": [], "box + 1 click": []}
            if per_piece:
                scores |= {"box per piece (inscribed ellipses)": [], "box per piece": []}
            for k in np.unique(present[np.linspace(0, len(present) - 1, min(max_slices, len(present))).round().astype(int)]):
                truth = truth3[..., k]
                rng = np.random.default_rng([seed, ci, int(value), int(k), 0])
                box = jittered_box(truth, rng, box_shift)
                scores["box (inscribed ellipse)"].append(_dice(_box_ellipse(truth.shape, box), truth))
                m = session.segment(int(k), box=tuple(box))
                scores["box"].append(_dice(m, truth))
                p = _interior_point(truth)
                scores["1 point"].append(_dice(session.segment(int(k), points=[tuple(p)], labels=[1]), truth))
                click = correction_point(m, truth, rng)
                if click is not None:
                    m = session.segment(int(k), box=tuple(box), points=[tuple(click[0])], labels=[click[1]])
                scores["box + 1 click"].append(_dice(m, truth))
                if per_piece:
                    boxes = _piece_boxes(truth, np.random.default_rng([seed, ci, int(value), int(k), 2]), min_pixels,
                                          box_shift)
                    if boxes is None:
                        scores["box per piece (inscribed ellipses)"].append(scores["box (inscribed ellipse)"][-1])
                        scores["box per piece"].append(scores["box"][-1])
                    else:
                        ellipses = np.logical_or.reduce([_box_ellipse(truth.shape, b) for b in boxes])
                        scores["box per piece (inscribed ellipses)"].append(_dice(ellipses, truth))
                        united = np.logical_or.reduce([session.segment(int(k), box=tuple(b)) for b in boxes])
                        scores["box per piece"].append(_dice(united, truth))
            for prompt, v in scores.items():
                rows.append({"case": case, "structure": name, "prompt": prompt, "dice": float(np.mean(v)), "slices": len(v)})
            if label.ndim == 3 and propagate:
                k = int(np.argmax(area))
                box = jittered_box(truth3[..., k], np.random.default_rng([seed, ci, int(value), k, 1]), box_shift)
                vol = np.moveaxis(session.propagate(k, tuple(box)), axis, -1)
                rows.append({"case": case, "structure": name, "prompt": "box on one slice, propagated (3D)",
                             "dice": _dice(vol, truth3), "slices": int(vol.any((0, 1)).sum())})
    return rows


def summarise_prompts(rows: list[dict]) -> list[dict]:
    """Mean, SD and 95 % bootstrap CI (``eval.metrics.summarise``) over structures per prompt."""
    out = []
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        v = [r["dice"] for r in rows if r["prompt"] == prompt]
        s = summarise(v)
        out.append({"prompt": prompt, "dice_mean": s["mean"], "dice_std": float(np.std(v)),
                    "ci95_low": s["ci_low"], "ci95_high": s["ci_high"], "n": s["n"]})
    return out

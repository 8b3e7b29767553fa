"""Example sets given as prompts against the same example sets given as masks
(``medfound experiment support-prompts``).

Every slice of a support volume (along the stored array's axis 2) where a structure covers at least
``min_voxels`` voxels gets a box: the true mask's bounding box with each side moved by up to
``jitter`` pixels, as a user would draw it. A SAM turns the boxes into masks, and in-context
segmentation runs on the test volumes twice, with the same settings and the same slices available:
once from the true masks, once from the SAM's. Reported: 3D Dice per test case and structure for
both, their paired difference, and how well the SAM's masks matched the true ones on the support slices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medfound.data.nnunet import NnUNetDataset
from medfound.eval.metrics import label_metrics, summarise
from medfound.eval.support_size import match_structures
from medfound.infer.incontext import segment_path
from medfound.infer.support_prompts import prompted_support_set
from medfound.io import read_image
from medfound.io.atomic import write_csv, write_text
from medfound.io.json_file import read_json


def boxes_from_masks(ds: NnUNetDataset, values: dict[int, str], jitter: int = 2, min_voxels: int = 10,
                     seed: int = 0) -> dict:
    """The prompts file a user would have written: one jittered box per labelled axial slice."""
    rng = np.random.default_rng(seed)
    prompts: dict = {}
    for case in ds.cases():
        _, label = ds.read_case(case)
        lab = label.array
        for v, name in values.items():
            entries = []
            for k in range(lab.shape[2]):
                m = lab[:, :, k] == v
                if m.sum() < min_voxels:
                    continue
                xs, ys = np.nonzero(m)
                box = np.array([xs.min(), ys.min(), xs.max(), ys.max()]) + rng.integers(-jitter, jitter + 1, 4)
                box = np.clip(box, 0, [m.shape[0] - 1, m.shape[1] - 1] * 2)
                entries.append({"slice": int(k), "box": [int(b) for b in box]})
            if entries:
                prompts.setdefault(case, {})[name] = entries
    return prompts


def support_prompts_experiment(support: str | os.PathLike, test: str | os.PathLike, out: str | os.PathLike,
                               labels: list[str] | None = None, sam_model: str | None = None,
                               model_run: str | os.PathLike | None = None, support_size: int = 16,
                               jitter: int = 2, seed: int = 0, progress: bool = True) -> dict:
    out = Path(out)
    sds, tds = NnUNetDataset.open(support), NnUNetDataset.open(test)
    pairs = match_structures(sds, tds, labels)
    values = {v: n for v, n, _, _ in pairs}
    out.mkdir(parents=True, exist_ok=True)
    prompts = boxes_from_masks(sds, values, jitter, seed=seed)
    write_text(out / "prompts.json", json.dumps(prompts, indent=1))
    names = list(values.values())
    segment_path(sds.root, tds.root / "imagesTr", out / "mask_defined", model_run, names, support_size,
                 progress=progress)
    with prompted_support_set(sds.root, out / "prompts.json", sam_model) as drawn:
        dds = NnUNetDataset.open(drawn)
        sam_rows = _sam_masks_against_truth(sds, dds, prompts)
        segment_path(drawn, tds.root / "imagesTr", out / "prompt_defined", model_run, names, support_size,
                     progress=progress)
    methods = ("mask_defined", "prompt_defined")
    # each run's label values, by name, from the labels.json written beside its masks
    value = {m: {n: int(v) for v, n in read_json(out / m / "labels.json").items()} for m in methods}
    rows = []
    for case in tds.cases():
        _, truth = tds.read_case(case)
        preds = {m: read_image(out / m / f"{case}.nii.gz").array for m in methods}
        for sv, sname, tv, tname in pairs:
            row = {"test_case": case, "structure": sname}
            for m, pred in preds.items():
                row[f"{m}_dice"] = label_metrics(pred == value[m][sname], truth.array == tv, truth.spacing)["dice"]
            rows.append(row)
    write_csv(out / "results.csv", rows)
    write_csv(out / "sam_masks.csv", sam_rows)
    summary = {m: summarise([r[f"{m}_dice"] for r in rows]) for m in methods}
    summary["prompt_minus_mask"] = summarise([r["prompt_defined_dice"] - r["mask_defined_dice"] for r in rows])
    summary["sam_mask_dice_on_support_slices"] = summarise([r["dice"] for r in sam_rows])
    meta = {"support": str(sds.root), "test": str(tds.root), "structures": names, "support_size": support_size,
            "jitter_px": jitter, "sam_model": sam_model or "shipped small SAM",
            "prompted_slices": sum(len(e) for labels_ in prompts.values() for e in labels_.values())}
    write_text(out / "summary.json", json.dumps(meta | {"summary": summary}, indent=2))
    return meta | {"summary": summary}


def _sam_masks_against_truth(sds: NnUNetDataset, drawn: NnUNetDataset, prompts: dict) -> list[dict]:
    """2D Dice of each SAM-drawn support slice against the true mask of that slice."""
    rows = []
    for case, labels in prompts.items():
        _, truth = sds.read_case(case)
        _, mine = drawn.read_case(case)
        for name, entries in labels.items():
            tv, dv = sds.labels[name], drawn.labels[name]
            for e in entries:
                t = truth.array[:, :, e["slice"]] == tv
                d = mine.array[:, :, e["slice"]] == dv
                rows.append({"case": case, "structure": name, "slice": e["slice"],
                             "dice": float(2 * (t & d).sum() / max(1, t.sum() + d.sum()))})
    return rows

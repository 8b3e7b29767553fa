"""``medfound experiment query-box``: targets that move between patients, leave-one-out.

Each case of a dataset is the query once, the other cases its example set (the examples' target:
every slice holding the label). Three answers are scored by 3D Dice, and by 2D Dice on the boxed
slice: the in-context model on the whole study (examples only), the in-context model told where by a
box on one query slice (``segment --query-box``), and a SAM given the same box and propagated through
the slices (``sam segment --box --slice``). The box is the truth's box on the query's largest slice,
each side moved by up to ``jitter`` pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from medfound.data.nnunet import NnUNetDataset, write_dataset
from medfound.data.orientation import file_axis
from medfound.data.prompts import jittered_box
from medfound.data.slicing import take_slice
from medfound.errors import InputError
from medfound.eval.metrics import summarise
from medfound.infer.incontext import inference_settings, segment_image, support_pools
from medfound.infer.query_prompt import segment_with_query_box
from medfound.io.atomic import write_csv, write_text

METHODS = ("incontext", "incontext-box", "sam-box")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def query_box_experiment(dataset: str | os.PathLike, out: str | os.PathLike, label: str | None = None,
                         support_size: int = 16, jitter: int = 2, seeds: int = 1, methods: tuple[str, ...] = METHODS,
                         model_run: str | os.PathLike | None = None, sam_model: str | None = None,
                         extent: str = "both", progress: bool = False) -> dict:
    """Leave-one-out over the dataset's cases; ``results.csv`` (one row per query case, seed and
    method) and ``summary.json`` (mean 3D and 2D Dice with CIs per method)."""
    from medfound.infer.sam_segment import SamSession
    from medfound.models.incontext_weights import load_incontext
    from medfound.models.sam import load_sam_model
    from medfound.progress import Progress

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(None, f"unknown method {unknown[0] if unknown else ''!r} (use {', '.join(METHODS)})")
    ds = NnUNetDataset.open(dataset)
    cases = ds.cases()
    if len(cases) < 2:
        raise InputError(ds.root, "leave-one-out needs at least two cases")
    names = {v: n for n, v in ds.labels.items() if v != 0}
    value = next((v for v, n in names.items() if label is None or n.lower() == label.lower() or str(v) == label), None)
    if value is None:
        raise InputError(ds.root / "dataset.json", f"no label {label!r} in this dataset")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = load_incontext(model_run)
    model.eval()
    size, settings = int(cfg["model"]["size"]), inference_settings(cfg)
    sam = load_sam_model(sam_model) if "sam-box" in methods else None
    rows = []
    with Progress("query-box", len(cases) * seeds, enabled=progress) as bar, \
            tempfile.TemporaryDirectory(prefix=".medfound-loo-", dir=out) as tmp:
        for query in cases:
            others = [(c, img, np.where(lab.array == value, value, 0)) for c in cases if c != query
                      for img, lab in [ds.read_case(c)]]
            examples = write_dataset(Path(tmp) / f"examples_{query}", others, {"background": 0, names[value]: value},
                                     ds.channel_names, extra={"case_modalities": {c: ds.case_modality(c) for c, _, _ in others}})
            pool = support_pools(examples.root, {value: names[value]}, size)[value].evenly(support_size)
            image, label_map = ds.read_case(query)
            truth = np.asarray(label_map.array) == value
            modality = ds.case_modality(query) if image.modality == "OT" else None
            three_d = truth.ndim == 3
            along = file_axis(image, 2)  # axial slices, numbered as the file counts them
            k = int(truth.sum(tuple(d for d in range(3) if d != along)).argmax()) if three_d else 0
            plane = take_slice(truth, along, k) if three_d else truth
            session = SamSession.for_model(*sam, image, axis=along) if sam is not None else None
            for seed in range(seeds):
                box = jittered_box(plane, np.random.default_rng([seed, k]), jitter).tolist()
                for method in methods:
                    t0 = time.perf_counter()
                    if method == "incontext":
                        pred = segment_image(model, image, {value: pool}, size, support_size=len(pool), modality=modality,
                                             register=False, **{**settings, "prior_weight": 0.0}) == value
                    elif method == "incontext-box":
                        pred = segment_with_query_box(model, image, pool, k, box, modality=modality,
                                                      flip=settings["flip"], extent=extent) > 0
                    else:
                        pred = session.propagate(k, tuple(box)) if three_d else session.segment(0, box=box)
                    pred = np.asarray(pred, bool)
                    rows.append({"dataset": ds.root.name, "query": query, "modality": ds.case_modality(query),
                                 "seed": seed, "slice": k, "box": " ".join(f"{x:g}" for x in box), "method": method,
                                 "dice_3d": _dice(pred, truth),
                                 "dice_slice": _dice(take_slice(pred, along, k) if three_d else pred, plane),
                                 "seconds": time.perf_counter() - t0})
                bar.advance(1, query)
            shutil.rmtree(examples.root, ignore_errors=True)
    summary = []
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        s3, s2 = summarise([r["dice_3d"] for r in sel]), summarise([r["dice_slice"] for r in sel])
        summary.append({"method": m, "runs": len(sel), "dice_3d": s3["mean"], "ci_low": s3["ci_low"], "ci_high": s3["ci_high"],
                        "dice_slice": s2["mean"], "seconds_mean": float(np.mean([r["seconds"] for r in sel]))})
    meta = {"dataset": ds.root.name, "label": names[value], "support_size": support_size, "jitter": jitter,
            "seeds": seeds, "extent": extent, "model": str(model_run) if model_run else "shipped", "sam_model": sam_model or "shipped small SAM"}
    write_csv(out / "results.csv", rows)
    write_text(out / "summary.json", json.dumps(meta | {"by_method": summary}, indent=2))
    return meta | {"by_method": summary}

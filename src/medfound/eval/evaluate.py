"""``medfound evaluate``: a folder of predictions against a folder of truths -> metrics.csv + summary.

Files pair up by case name (``CASE.nii.gz`` as nnU-Net names them; any supported format). Each pair
must share a grid; distances use the truth file's spacing in mm.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from medfound.errors import InputError
from medfound.eval.metrics import CaseLabelMetrics, case_metrics, summarise
from medfound.io import read_image
from medfound.io.atomic import write_text
from medfound.io.formats import case_name, sniff_format

METRICS = ("dice", "iou", "hd95", "nsd")


def _files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    out = {case_name(f): f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")
           and sniff_format(f) is not None}
    if not out:
        raise InputError(folder, "folder holds no label files")
    return out


def dataset_labels(truth_dir: Path) -> dict[int, str] | None:
    js = truth_dir.parent / "dataset.json"
    if js.is_file():
        try:
            labels = json.loads(js.read_text())["labels"]
            return {int(v if not isinstance(v, list) else v[0]): n for n, v in labels.items() if n != "background"}
        except (KeyError, ValueError, json.JSONDecodeError):
            return None
    return None


def pred_label_names(pred_dir: Path) -> dict[int, str] | None:
    """Names of the predicted labels from the ``labels.json`` medfound writes beside its masks."""
    js = pred_dir / "labels.json"
    if not js.is_file():
        return None
    try:
        return {int(v): str(n) for v, n in json.loads(js.read_text()).items() if int(v) != 0}
    except (ValueError, TypeError, AttributeError):
        raise InputError(js, "labels.json must map label values to names") from None


def evaluate_folders(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike, out_csv: str | os.PathLike,
                     tolerance_mm: float = 1.0, labels: list[int] | None = None, cases: list[str] | None = None,
                     common_only: bool = False) -> dict:
    """Write ``out_csv`` (one row per case and label) and ``<out>_summary.json``; return the summary.

    Cases: ``cases`` if given, else every truth case (``common_only``: the cases present on both sides).
    Labels are matched by name when both sides name them (the predictions' ``labels.json``, the truth's
    ``dataset.json``), else by value."""
    pred_dir, truth_dir, out_csv = Path(pred_dir), Path(truth_dir), Path(out_csv)
    preds, truths = _files(pred_dir), _files(truth_dir)
    if cases:
        unknown = [c for c in cases if c not in truths]
        if unknown:
            raise InputError(truth_dir, f"no truth for case(s) {', '.join(unknown[:5])}")
        truths = {c: truths[c] for c in cases}
    elif common_only:
        truths = {c: p for c, p in truths.items() if c in preds}
        if not truths:
            raise InputError(pred_dir, "no case is present in both folders")
    missing = sorted(set(truths) - set(preds))
    if missing:
        raise InputError(pred_dir, f"no prediction for case(s) {', '.join(missing[:5])} "
                                   "(--common-cases evaluates only the cases present in both)")
    names = dataset_labels(truth_dir) or {}
    lut, matched = None, None
    pnames = pred_label_names(pred_dir)
    if pnames and names:
        by_name = {n.lower(): v for v, n in names.items()}
        matched = {pn: names[by_name[pn.lower()]] for pn in pnames.values() if pn.lower() in by_name}
        if not matched:
            raise InputError(pred_dir / "labels.json", "no predicted label name matches the truth's dataset.json")
        lut = np.zeros(max(pnames) + 1, dtype=np.int64)
        for pv, pn in pnames.items():
            lut[pv] = by_name.get(pn.lower(), 0)
    pairs = []
    for case, tpath in truths.items():
        truth, pred = read_image(tpath), read_image(preds[case])
        if lut is not None:
            p = np.asarray(pred.array).astype(np.int64)
            pred = pred.with_array(np.where(p < len(lut), lut[np.clip(p, 0, len(lut) - 1)], 0))
        if pred.shape != truth.shape:
            raise InputError(preds[case], f"shape {pred.shape} does not match the truth's {truth.shape}")
        if not np.allclose(pred.affine, truth.affine, atol=1e-3, rtol=1e-5):
            raise InputError(preds[case], "geometry (spacing/origin/direction) does not match the truth's")
        pairs.append((case, pred, truth))
    if labels is None:
        labels = sorted(names) if names else sorted({int(v) for _, p, t in pairs for v in np.unique(t.array)} - {0})
    rows: list[CaseLabelMetrics] = []
    for case, pred, truth in pairs:
        rows += case_metrics(case, np.asarray(pred.array).astype(np.int64), np.asarray(truth.array).astype(np.int64),
                             truth.spacing, labels, tolerance_mm)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "label", *METRICS])
    for r in rows:
        w.writerow([r.case, r.label, *(f"{getattr(r, m):.6g}" for m in METRICS)])
    write_text(out_csv, buf.getvalue())
    summary = {"cases": len(pairs), "case_names": [c for c, _, _ in pairs], "labels": {}, "tolerance_mm": tolerance_mm,
               "labels_matched_by": "name" if matched else "value",
               "empty_mask_convention": "both empty: dice=iou=nsd=1, hd95=0; one empty: dice=iou=nsd=0, hd95 undefined (null in JSON, nan in the CSV)"}
    for v in labels:
        sel = [r for r in rows if r.label == v]
        summary["labels"][str(v)] = {"name": names.get(v, str(v)),
                                     **{m: summarise([getattr(r, m) for r in sel]) for m in METRICS}}
    summary["mean"] = {m: summarise([getattr(r, m) for r in rows]) for m in METRICS}
    write_text(out_csv.with_name(out_csv.stem + "_summary.json"),
               json.dumps(json_safe(summary), indent=2, allow_nan=False))
    return summary


def json_safe(value):
    """``value`` with every NaN or infinite float as ``None``, so the JSON is valid for strict parsers."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_summary(summary: dict) -> str:
    lines = [f"{'label':24s} " + " ".join(f"{m:>22s}" for m in METRICS)]
    for v, s in summary["labels"].items():
        cells = [f"{s[m]['mean']:.3f} [{s[m]['ci_low']:.3f},{s[m]['ci_high']:.3f}]" for m in METRICS]
        lines.append(f"{(v + ' ' + s['name'])[:24]:24s} " + " ".join(f"{c:>22s}" for c in cells))
    lines.append("mean (95% CI) per label over cases; median and undefined counts in the summary JSON")
    return "\n".join(lines)

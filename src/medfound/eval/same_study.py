"""``medfound experiment same-study``: a volume with a few labelled slices, the rest to segment.

The protocol a user's own study poses: for each structure of a labelled sample volume, 2, 4, 8 or
16 slices spread evenly over the structure's extent are given (each seed shifts where the spread
starts), every other slice is segmented, and Dice is taken over the slices that were not given
(a count is skipped for structures spanning fewer than twice as many slices). The
baselines are what a user already has: the nearest labelled slice copied, and morphological contour
interpolation (ITK's, behind 3D Slicer's "Fill between slices"). Held-out structures (DESIGN.md)
and trained ones are reported apart; settings are chosen on the trained (non-held-out) ones.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from medfound.data.completion_episodes import spread_slices
from medfound.data.heldout import is_heldout
from medfound.data.nnunet import NnUNetDataset
from medfound.data.orientation import to_canonical
from medfound.data.slicing import plane_spacing
from medfound.errors import InputError
from medfound.eval.metrics import summarise
from medfound.infer.completion import (
    COMPLETION_DEFAULTS,
    PartialLabels,
    contour_interpolation,
    labelled_index,
    mix_in_model,
    model_probability,
    nearest_slice_copy,
    prior_reach,
    refine_prior,
    shape_prior,
)
from medfound.infer.incontext import prepare_slices
from medfound.io.atomic import write_csv, write_text

METHODS = ("completion", "nearest-slice", "contour-interpolation", "interpolation", "incontext")
BASELINES = ("nearest-slice", "contour-interpolation")


def dice_outside(pred: np.ndarray, truth: np.ndarray, given: np.ndarray, axis: int) -> float:
    """Dice over the slices that were not given (1 when both are empty there)."""
    keep = np.ones(truth.shape[axis], bool)
    keep[given] = False
    p, t = np.compress(keep, pred, axis), np.compress(keep, truth, axis)
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2 * (p & t).sum() / total)


def pick_structures(ds: NnUNetDataset, labels: np.ndarray, groups: tuple[str, ...], wanted: list[str] | None,
                    per_group: int | None, axis: int, min_slices: int = 6) -> list[tuple[int, str, str]]:
    """(value, name, group) of the structures to test: those named (``wanted``), else up to
    ``per_group`` of each group spread over the label list; structures spanning fewer than
    ``min_slices`` slices are skipped (nothing to complete)."""
    present = set(np.unique(labels).tolist())
    names = {v: n for n, v in ds.labels.items() if v != 0 and v in present}
    if wanted:
        by_name = {n.lower(): v for v, n in names.items()}
        missing = [w for w in wanted if w.lower() not in by_name]
        if missing:
            raise InputError(ds.root / "dataset.json", f"no label {missing[0]!r} in this dataset")
        chosen = [(by_name[w.lower()], names[by_name[w.lower()]]) for w in wanted]
    else:
        chosen = list(names.items())
    other = tuple(d for d in range(3) if d != axis)
    span = {v: np.flatnonzero((labels == v).any(axis=other)) for v, _ in chosen}
    out = []
    for group in groups:
        sel = [(v, n) for v, n in chosen if ("held-out" if is_heldout(n) else "trained") == group
               and len(span[v]) and span[v][-1] - span[v][0] + 1 >= min_slices]
        if per_group and not wanted and len(sel) > per_group:
            sel = [sel[i] for i in np.unique(np.linspace(0, len(sel) - 1, per_group).round().astype(int))]
        out += [(v, n, group) for v, n in sel]
    return out


def same_study_experiment(datasets: list[str | os.PathLike], out: str | os.PathLike,
                          labelled: list[int] = (2, 4, 8, 16), seeds: int = 3,
                          groups: tuple[str, ...] = ("held-out", "trained"), wanted: list[str] | None = None,
                          per_group: int | None = 12, methods: tuple[str, ...] = METHODS[:3],
                          model_run: str | os.PathLike | None = None, model_share: float | None = None,
                          axis: int = 2, taper: float | None = None, progress: bool = False,
                          refiner_run: str | os.PathLike | None = None,
                          refine: bool = COMPLETION_DEFAULTS["refine"]) -> dict:
    """Run the protocol on the first case of every dataset; write ``results.csv`` (one row per
    dataset, structure, labelled slices, seed and method), ``summary.csv``, ``summary.json`` (with
    the paired differences of completion against each baseline) and ``same_study.png``.
    ``completion`` is ``segment --partial-labels`` (the interpolated outlines refined by ``refiner_run``,
    the shipped refiner by default, unless ``refine`` is off); ``interpolation`` the outlines alone."""
    from medfound.progress import Progress

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(None, f"unknown method {unknown[0] if unknown else ''!r} (use {', '.join(METHODS)})")
    if not labelled or min(labelled) < 1 or seeds < 1:
        raise InputError(None, "--labelled takes positive slice counts and --seeds must be positive")
    share = COMPLETION_DEFAULTS["model_share"] if model_share is None else model_share
    taper = COMPLETION_DEFAULTS["taper"] if taper is None else taper
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    needs_model = "incontext" in methods or ("completion" in methods and share > 0)
    model = size = None
    if needs_model:
        from medfound.models.incontext_weights import load_incontext

        model, cfg = load_incontext(model_run)
        model.eval()
        size = int(cfg["model"]["size"])
    refiner = None
    if refine and "completion" in methods:
        from medfound.models.completion_refiner import load_refiner

        refiner = load_refiner(refiner_run)[0]
    plan = []
    for d in datasets:
        ds = NnUNetDataset.open(d)
        case = ds.cases()[0]
        image, label = ds.read_case(case)
        if label is None:
            raise InputError(ds.image_path(case), "the protocol needs the volume's labels (labelsTr)")
        if image.ndim != 3:
            raise InputError(ds.image_path(case), "the same-study protocol needs a 3D volume")
        labels = to_canonical(label)[0].array.astype(np.int32)
        plan.append((ds, case, image, labels, pick_structures(ds, labels, groups, wanted, per_group, axis)))
    total = sum(len(p[4]) for p in plan) * len(labelled) * seeds  # an upper bound: short structures skip counts
    rows = []
    with Progress("same-study", total, enabled=progress) as bar:
        for ds, case, image, labels, structures in plan:
            view = to_canonical(image)[0]
            spacing = plane_spacing(view, axis)
            modality = ds.case_modality(case) if image.modality == "OT" else None
            prep = prepare_slices(image, size, axis, modality) if needs_model else None
            other = tuple(d for d in range(3) if d != axis)
            for value, name, group in structures:
                truth = labels == value
                z = np.flatnonzero(truth.any(axis=other))
                for n in labelled:
                    if len(z) < 2 * n:  # fewer slices to complete than given: nothing left to measure
                        continue
                    for seed in range(seeds):
                        phase = 0.5 if seed == 0 else float(np.random.default_rng([seed, value, n]).uniform())
                        given = spread_slices((int(z[0]), int(z[-1])), n, phase)
                        sparse = np.zeros(labels.shape, np.int32)
                        partial = PartialLabels(sparse, given, axis)
                        sparse[labelled_index(partial)] = truth[labelled_index(partial)]
                        prior = None
                        for method in methods:
                            t0 = time.perf_counter()
                            if method == "nearest-slice":
                                pred = nearest_slice_copy(partial, 1)
                            elif method == "contour-interpolation":
                                pred = contour_interpolation(partial, 1)
                            else:
                                if prior is None:
                                    prior = shape_prior(sparse, given, 1, axis, spacing, taper=taper)
                                if method == "incontext":
                                    prob = model_probability(model, prep, partial, 1, size, prior_reach(prior, axis))
                                    pred = (prob if prob is not None else np.zeros_like(prior)) > 0.5
                                elif method == "interpolation":
                                    pred = prior > 0.5
                                else:
                                    prob = prior if refiner is None else refine_prior(refiner, view.array, prior,
                                                                                      sparse == 1, given, axis)
                                    pred = mix_in_model(prob, model, prep, partial, 1, size, share) > 0.5
                            rows.append({"dataset": ds.root.name, "case": case, "structure": name, "group": group,
                                         "labelled": n, "given": len(given), "seed": seed, "method": method,
                                         "dice": dice_outside(pred, truth, given, axis),
                                         "seconds": time.perf_counter() - t0})
                        bar.advance(1, name)
    summary = summarise_rows(rows, methods, labelled, groups)
    meta = {"datasets": [str(Path(d).name) for d in datasets], "labelled": list(labelled), "seeds": seeds,
            "methods": list(methods), "model_share": share, "taper": taper, "axis": axis,
            "refiner": (str(refiner_run) if refiner_run else "shipped") if refiner is not None else None,
            "model": str(model_run) if model_run else ("shipped" if needs_model else None)}
    write_csv(out / "results.csv", rows)
    write_csv(out / "summary.csv", summary["by_count"])
    write_text(out / "summary.json", json.dumps(meta | summary, indent=2))
    plot_same_study(summary["by_count"], out / "same_study.png")
    return meta | summary


def summarise_rows(rows: list[dict], methods, labelled, groups) -> dict:
    """Mean Dice with a bootstrap CI per (group, method, labelled slices), and per (group, labelled
    slices) completion minus each baseline, paired by structure and seed (rows as written to
    ``results.csv`` or as read back from it)."""
    by_count, paired = [], []
    for g in groups:
        for m in methods:
            for n in labelled:
                sel = [float(r["dice"]) for r in rows if r["group"] == g and r["method"] == m and int(r["labelled"]) == n]
                if sel:
                    s = summarise(sel)
                    by_count.append({"group": g, "method": m, "labelled": n, "runs": len(sel), "dice_mean": s["mean"],
                                     "ci_low": s["ci_low"], "ci_high": s["ci_high"]})
        if "completion" not in methods:
            continue
        for base in [b for b in methods if b != "completion"]:
            for n in labelled:
                diffs = paired_differences(rows, g, base, n)
                if diffs:
                    s = summarise(diffs)
                    paired.append({"group": g, "baseline": base, "labelled": n, "pairs": len(diffs),
                                   "difference": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                                   "wins": int(sum(x > 0 for x in diffs))})
    return {"by_count": by_count, "paired": paired}


def paired_differences(rows: list[dict], group: str, baseline: str, labelled: int) -> list[float]:
    """Completion minus ``baseline`` on every (dataset, structure, seed) both were run on (rows as
    written to ``results.csv`` or as read back from it)."""
    def dice_of(method: str) -> dict:
        return {(r["dataset"], r["structure"], str(r["seed"])): float(r["dice"]) for r in rows
                if r["group"] == group and r["method"] == method and int(r["labelled"]) == labelled}

    ours, theirs = dice_of("completion"), dice_of(baseline)
    return [ours[k] - theirs[k] for k in ours if k in theirs]


def plot_same_study(by_count: list[dict], path: Path) -> Path:
    """Dice against labelled slices, one panel per group of structures."""
    from medfound.io.figures import curve_panels

    panels = []
    for g in dict.fromkeys(r["group"] for r in by_count):
        series = []
        for m in dict.fromkeys(r["method"] for r in by_count):
            sel = [r for r in by_count if r["group"] == g and r["method"] == m]
            series.append((m, [r["labelled"] for r in sel], [r["dice_mean"] for r in sel],
                           [r["ci_low"] for r in sel], [r["ci_high"] for r in sel]))
        panels.append((f"{g} structures", series))
    return curve_panels(panels, path, "labelled slices", "Dice on the other slices (95 % CI)")

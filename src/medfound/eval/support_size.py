"""``medfound experiment support-size``: Dice vs support-set size on held-out structures, in-context
against the things a user would do instead — fine-tune a small network on the same support slices
(the retraining path, with its wall time) and training-free label fusion: the most similar support's
mask, or (``registered-label-fusion``) the mask of the support registered nearest in height, resampled
onto the query's grid.

Support slices come from the support dataset, queries are *whole test volumes* (every slice, so a method
that paints the structure where it is absent pays for it), 3D Dice and HD95 through MONAI. Each
(structure, size, seed) draws one random support subset shared by all methods (a paired comparison).
By default the structures are the DESIGN.md held-out ones present in both datasets, matched by name
(``Thalamus_L`` = ``Left_Thalamus_Proper``). Results are written after every run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from medfound.data.heldout import is_heldout
from medfound.data.nnunet import NnUNetDataset
from medfound.data.orientation import to_canonical
from medfound.errors import InputError
from medfound.eval.metrics import label_metrics, summarise
from medfound.infer.incontext import (SupportEncodings, extent_gate, in_query_frame, inference_settings,
                                      largest_component, prepare_slices, register_supports, segment_prepared,
                                      support_pools, to_volume)
from medfound.infer.label_fusion import label_fusion, registered_label_fusion
from medfound.io.atomic import write_csv, write_text

METHODS = ("incontext", "label-fusion", "registered-label-fusion", "finetune")
_SIDE = {"l": "L", "left": "L", "lh": "L", "r": "R", "right": "R", "rh": "R"}
_DROP = {"proper", "area"}


def structure_key(name: str) -> tuple[str, str]:
    """('L'|'R'|'', base name) so that atlases' spellings of one structure compare equal."""
    tokens = [t for t in re.split(r"[_\-\s.]+", name.lower()) if t]
    side = ""
    rest = []
    for t in tokens:
        if t in _SIDE and not side:
            side = _SIDE[t]
        elif t not in _DROP:
            rest.append(t)
    return side, "_".join(rest)


def match_structures(support: NnUNetDataset, test: NnUNetDataset, names: list[str] | None = None) -> list[tuple[int, str, int, str]]:
    """[(support value, support name, test value, test name)] of the structures to evaluate."""
    test_by_key = {structure_key(n): (v, n) for n, v in test.labels.items() if v != 0}
    out = []
    for n, v in sorted(support.labels.items(), key=lambda kv: kv[1]):
        if v == 0:
            continue
        if names:
            if n.lower() not in {x.lower() for x in names}:
                continue
        elif not is_heldout(n):
            continue
        hit = test_by_key.get(structure_key(n))
        if hit:
            out.append((v, n, hit[0], hit[1]))
    if not out:
        raise InputError(test.root, "no structure of the support set matches a test label by name"
                         + (f" (asked for {', '.join(names)})" if names else " among the held-out structures"))
    return out


def _dice_hd(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    m = label_metrics(pred, truth, spacing)
    return m["dice"], m["hd95"]


def support_size_experiment(support: str | os.PathLike, test: str | os.PathLike, sizes: list[int], out: str | os.PathLike,
                            seeds: int = 3, model_run: str | os.PathLike | None = None,
                            methods: tuple[str, ...] = METHODS, finetune_steps: int = 150,
                            finetune_sizes: list[int] | None = None, structures: list[str] | None = None,
                            axis: int = 2, progress: bool = True, also_largest: bool = False,
                            register: bool = True, extent_margin: float | str | None = "model",
                            refine: bool | str = "model", flip: bool | str = "model",
                            prior_weight: float | str = "model", through_plane_sigma: float | str = "model") -> dict:
    """Run the grid; writes ``results.csv``, ``summary.json``, ``summary.csv`` and ``support_size.png``.
    ``also_largest``: score the in-context prediction a second time with only its largest connected
    piece kept (method ``incontext+largest``; no extra inference). ``register``: support slices placed at
    the query height they show (affine registration, :func:`register_supports`); ``extent_margin``:
    the model's stored value unless given (``None``: no gate); ``refine``, ``flip``, ``prior_weight``,
    ``through_plane_sigma``: the model's setting unless given."""
    from rich.progress import Progress

    from medfound.models.incontext_weights import load_incontext
    from medfound.train.support_finetune import fit_on_support, predict_slices

    if not sizes or min(sizes) < 1 or max(sizes) > 64:
        raise InputError(None, "--sizes must be between 1 and 64")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(None, f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    out = Path(out)
    sds, tds = NnUNetDataset.open(support), NnUNetDataset.open(test)
    pairs = match_structures(sds, tds, structures)
    model, cfg = load_incontext(model_run)
    size = int(cfg["model"]["size"])
    def given(value):  # "model": the model's stored setting
        return None if value == "model" else value

    settings = inference_settings(cfg, refine=given(refine), flip=given(flip), prior_weight=given(prior_weight),
                                  through_plane_sigma=given(through_plane_sigma))
    margin = settings["extent_margin"] if extent_margin == "model" else extent_margin  # None: no gate
    refine, flip, prior_weight = bool(settings["refine"]), bool(settings["flip"]), float(settings["prior_weight"])
    smooth = float(settings["through_plane_sigma"])
    pools = support_pools(support, {v: n for v, n, _, _ in pairs}, size, axis)
    tests = []
    for case in tds.cases():
        image, label = tds.read_case(case)
        if label is None:
            raise InputError(tds.image_path(case), "test case has no label")
        prep = prepare_slices(image, size, axis, tds.case_modality(case) if image.modality == "OT" else None)
        truth = to_canonical(label)[0].array if prep.ornt is not None else label.array
        transforms = register_supports(pools, prep) if register else {}
        tests.append((case, prep, truth, transforms))
    ft_sizes = set(finetune_sizes or sizes)
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    meta = {"support": str(support), "test": str(test), "sizes": sizes, "seeds": seeds, "methods": list(methods),
            "model": str(model_run) if model_run else "packaged default", "finetune_steps": finetune_steps,
            "register": register, "extent_margin": margin, "refine": refine,
            "flip": flip, "prior_weight": prior_weight, "through_plane_sigma": smooth,
            "structures": [{"support": n, "test": tn} for _, n, _, tn in pairs],
            "queries": "every slice of each test volume (axis %d); 3D Dice and HD95 (MONAI)" % axis}
    total = len(pairs) * len(sizes) * seeds * len(tests)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("support-size", total=total)
        for (sv, sname, tv, tname) in pairs:
            for n in sizes:
                for seed in range(seeds):
                    rng = np.random.default_rng([seed, sv, n])
                    sub = pools[sv].random(n, rng)
                    ft = None
                    if "finetune" in methods and n in ft_sizes:
                        ft = fit_on_support(sub.images, sub.masks, steps=finetune_steps, seed=seed)
                    for case, prep, truth, transforms in tests:
                        enc = None
                        placed = in_query_frame(sub, prep, transforms)  # no transforms: unchanged
                        if "incontext" in methods:
                            enc = SupportEncodings(model, {sv: [placed]}, torch.device("cpu"), flip)
                        t_truth = truth == tv
                        spacing = prep.view.spacing
                        base = {"structure": sname, "test_structure": tname, "test_case": case, "size": n,
                                "support_slices": len(sub), "seed": seed}
                        results = {}
                        if enc is not None:
                            t0 = time.perf_counter()
                            pr = segment_prepared(model, prep, enc, 32, extent_margin=margin, refine=refine,
                                                  prior_weight=prior_weight, through_plane_sigma=smooth)[sv] > 0.5
                            results["incontext"] = (pr, time.perf_counter() - t0)
                            if also_largest:
                                t0 = time.perf_counter()
                                results["incontext+largest"] = (largest_component(pr), results["incontext"][1] + time.perf_counter() - t0)
                        if "label-fusion" in methods:
                            t0 = time.perf_counter()
                            pr = to_volume(prep, label_fusion(prep.squares, sub.images, sub.masks)) > 0.5
                            results["label-fusion"] = (pr, time.perf_counter() - t0)
                        if "registered-label-fusion" in methods:
                            t0 = time.perf_counter()
                            inside = extent_gate(placed.positions, prep, margin)  # the slices in-context segments
                            pr = to_volume(prep, registered_label_fusion(prep.positions, placed.positions, placed.masks,
                                                                          inside)) > 0.5
                            results["registered-label-fusion"] = (pr, time.perf_counter() - t0)
                        if ft is not None:
                            t0 = time.perf_counter()
                            pr = to_volume(prep, predict_slices(ft[0], prep.squares)) > 0.5
                            results["finetune"] = (pr, ft[1] + time.perf_counter() - t0)
                        for method, (pr, secs) in results.items():
                            dice, hd = _dice_hd(pr, t_truth, spacing)
                            rows.append(base | {"method": method, "dice": dice, "hd95_mm": hd, "seconds": round(secs, 2)})
                        write_csv(out / "results.csv", rows)
                        bar.advance(task)
    summary = _summarise(rows, list(dict.fromkeys(r["method"] for r in rows)), sizes)
    write_csv(out / "summary.csv", summary["by_size"])
    write_text(out / "summary.json", json.dumps(meta | summary, indent=2))
    plot_support_size(summary["by_size"], out / "support_size.png",
                      title=f"{Path(support).name} -> {Path(test).name}")
    return meta | summary


def _summarise(rows: list[dict], methods, sizes) -> dict:
    by_size = []
    for m in methods:
        for n in sizes:
            sel = [r for r in rows if r["method"] == m and r["size"] == n]
            if not sel:
                continue
            s = summarise([r["dice"] for r in sel])
            by_size.append({"method": m, "size": n, "runs": len(sel), "dice_mean": s["mean"], "ci_low": s["ci_low"],
                            "ci_high": s["ci_high"], "seconds_mean": float(np.mean([r["seconds"] for r in sel]))})
    # where in-context wins and loses: per structure and size, against each baseline (mean over seeds)
    verdicts = []
    for base in METHODS[1:]:
        for st in sorted({r["structure"] for r in rows}):
            for n in sizes:
                a = [r["dice"] for r in rows if r["method"] == "incontext" and r["structure"] == st and r["size"] == n]
                b = [r["dice"] for r in rows if r["method"] == base and r["structure"] == st and r["size"] == n]
                if a and b:
                    verdicts.append({"structure": st, "size": n, "baseline": base, "incontext": float(np.mean(a)),
                                     "baseline_dice": float(np.mean(b)),
                                     "winner": "incontext" if np.mean(a) > np.mean(b) else base})
    return {"by_size": by_size, "wins": verdicts}


def plot_support_size(by_size: list[dict], path: Path, title: str = "", ylabel: str = "3D Dice (95 % CI)") -> Path:
    import matplotlib.pyplot as plt

    from medfound.io.figures import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in dict.fromkeys(r["method"] for r in by_size):
        sel = [r for r in by_size if r["method"] == m]
        x = [r["size"] for r in sel]
        ax.plot(x, [r["dice_mean"] for r in sel], marker="o", label=m)
        ax.fill_between(x, [r["ci_low"] for r in sel], [r["ci_high"] for r in sel], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("support slices")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)

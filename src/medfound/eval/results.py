"""``make results``: the pages of ``docs/results/`` rebuilt from the CSVs the experiments wrote.

Each page is a template (``docs/results/templates/NAME.md``: the question, the command that regenerates
its data, a short reading) in which ``{{table:KEY}}`` and ``{{plot:KEY}}`` are replaced by a table and a
plot made here from ``docs/results/data/``. Nothing is rerun, so text and data cannot drift: a test
checks that the committed pages equal what this module produces.

    python -m medfound.eval.results [docs/results]
"""

from __future__ import annotations

import csv
import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medfound.eval.metrics import summarise

SIZES = (1, 2, 4, 8, 16, 32)
#: the 12 held-out structures DESIGN.md names, as AAL spells them (the parahippocampal gyri are the other two)
D12 = ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala")
GROUPS = ("thalamus", "caudate", "putamen", "pallidum", "hippocampus", "amygdala", "parahippocampal")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _group(name: str) -> str | None:
    low = name.lower()
    if "parahippocamp" in low:
        return "parahippocampal"
    return next((g for g in GROUPS if g in low), None)


def _in_d12(name: str) -> bool:
    return _group(name) in {s.lower() for s in D12}


class Data:
    """Readers over ``docs/results/data``."""

    def __init__(self, root: Path):
        self.root = root

    def summary(self, name: str) -> dict[tuple[str, int], dict]:
        return {(r["method"], int(r["size"])): r for r in _rows(self.root / "incontext" / f"{name}_summary.csv")}

    def results(self, name: str) -> list[dict]:
        return _rows(self.root / "incontext" / f"{name}_results.csv")

    @functools.cached_property
    def val_groups(self) -> dict[str, str]:
        """Validation structure -> its group (``val10``, ``small5``), as the smoothing sweep records them."""
        return {r["structure"]: r["group"] for r in _rows(self.root / "incontext" / "validation_through_plane_results.csv")}


def _summary_if(d: Data, name: str) -> dict[tuple[str, int], dict]:
    """``d.summary(name)``, or nothing where that experiment has not been run."""
    return d.summary(name) if (d.root / "incontext" / f"{name}_summary.csv").is_file() else {}


def _cell(summary: dict, method: str, size: int, ci: bool = False) -> str:
    r = summary.get((method, size))
    if r is None:
        return "—"
    mean = float(r["dice_mean"])
    return f"{mean:.3f} [{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]" if ci else f"{mean:.3f}"


def _mean_over(rows: list[dict], method: str, size: int, keep: Callable[[str], bool]) -> dict:
    v = [float(r["dice"]) for r in rows if r["method"] == method and int(r["size"]) == size and keep(r["structure"])]
    return summarise(v)


def _ci(s: dict, signed: bool = False) -> str:
    """``mean [low, high]`` of a :func:`summarise` result (``signed``: differences, with their sign)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    return "—" if not s.get("n") else f"{f.format(s['mean'])} [{f.format(s['ci_low'])}, {f.format(s['ci_high'])}]"


# ---- tables ---------------------------------------------------------------------------------------------

def aal_curve(d: Data) -> str:
    shipped, base = d.summary("heldout_aal_shipped"), d.summary("heldout_aal_no_smoothing")
    rows = [["**in-context, shipped settings**", *(f"**{_cell(shipped, 'incontext', s)}**" if (('incontext', s) in shipped)
                                                  else "—" for s in SIZES)],
            ["in-context, no smoothing across slices", *(_cell(base, "incontext", s) for s in SIZES)],
            ["in-context, no smoothing, largest piece kept", *(_cell(base, "incontext+largest", s) for s in SIZES)],
            ["registered label fusion (no model)", *(_cell(base, "registered-label-fusion", s) for s in SIZES)],
            ["label fusion (nearest support by image similarity)", *(_cell(base, "label-fusion", s) for s in SIZES)]]
    return _table(["supports", *map(str, SIZES)], rows)


def aal_structures(d: Data) -> str:
    shipped, base = d.results("heldout_aal_shipped"), d.results("heldout_aal_no_smoothing")
    rows = []
    for g in GROUPS:
        keep = lambda n, g=g: _group(n) == g  # noqa: E731
        rows.append([g, *(_f(_mean_over(shipped, "incontext", s, keep).get("mean")) for s in (8, 16)),
                     *(_f(_mean_over(base, "registered-label-fusion", s, keep).get("mean")) for s in (8, 16)),
                     _f(_mean_over(base, "label-fusion", 16, keep).get("mean"))])
    rows.append(["**mean of the 12 DESIGN.md structures**",
                 *(f"**{_ci(_mean_over(shipped, 'incontext', s, _in_d12))}**" for s in (8, 16)),
                 *(_ci(_mean_over(base, "registered-label-fusion", s, _in_d12)) for s in (8, 16)),
                 _f(_mean_over(base, "label-fusion", 16, _in_d12).get("mean"))])
    return _table(["structure (left + right)", "in-context, 8", "in-context, 16", "registered LF, 8", "registered LF, 16",
                   "label fusion, 16"], rows)


def nm_summary(d: Data) -> str:
    shipped, base = d.summary("heldout_neuromorphometrics_shipped"), d.summary("heldout_neuromorphometrics_no_smoothing")
    rows = [["**in-context, shipped settings**", *(f"**{_cell(shipped, 'incontext', s, ci=True)}**" for s in (8, 16))],
            ["in-context, no smoothing across slices", *(_cell(base, "incontext", s, ci=True) for s in (8, 16))],
            ["registered label fusion (no model)", *(_cell(base, "registered-label-fusion", s, ci=True) for s in (8, 16))],
            ["label fusion (image similarity)", *(_cell(base, "label-fusion", s, ci=True) for s in (8, 16))]]
    unet = _summary_if(d, "heldout_neuromorphometrics_vs_finetuning")
    if unet:
        rows.append(["U-Net trained on the example slices (200 steps, 2 seeds)", *(_cell(unet, "finetune", s, ci=True) for s in (8, 16))])
    return _table(["method", "8 supports", "16 supports"], rows)


def nm_structures(d: Data) -> str:
    shipped, base = d.results("heldout_neuromorphometrics_shipped"), d.results("heldout_neuromorphometrics_no_smoothing")
    rows = []
    for g in GROUPS:
        keep = lambda n, g=g: _group(n) == g  # noqa: E731
        a, b = _mean_over(shipped, "incontext", 16, keep), _mean_over(base, "registered-label-fusion", 16, keep)
        if a.get("n"):
            rows.append([g, _f(a["mean"]), _f(b.get("mean"))])
    return _table(["structure (left + right)", "in-context, 16", "registered LF, 16"], rows)


def finetune_summary(d: Data) -> str:
    s = d.summary("heldout_vs_finetuning")
    names = {"incontext": "in-context", "finetune": "U-Net fine-tuned on the supports", "label-fusion": "label fusion"}
    rows = []
    for m, label in names.items():
        cells = []
        for n in (8, 16):
            r = s.get((m, n))
            cells.append("—" if r is None else f"{_cell(s, m, n, ci=True)} ({float(r['seconds_mean']):.1f} s)")
        rows.append([label, *cells])
    res = d.results("heldout_vs_finetuning")
    wins = sum(1 for (st, n) in {(r["structure"], r["size"]) for r in res}
               if np.mean([float(r["dice"]) for r in res if r["structure"] == st and r["size"] == n and r["method"] == "incontext"])
               > np.mean([float(r["dice"]) for r in res if r["structure"] == st and r["size"] == n and r["method"] == "finetune"]))
    cells = len({(r["structure"], r["size"]) for r in res})
    return _table(["method (Dice [95 % CI], s per volume)", "8 supports", "16 supports"], rows) + \
        f"\n\nIn-context beats the fine-tuned U-Net on {wins} of {cells} structure × size cells."


SAM_DATASETS = (("MNI152 AAL", "MNI152_AAL"), ("MNI152 AAL, coronal slices", "MNI152_AAL_coronal"),
                ("MNI152 AAL, sagittal slices", "MNI152_AAL_sagittal"),
                ("MNI152 AAL, box sides off by up to 5 px", "MNI152_AAL_box_shift_5"),
                ("MNI152 Neuromorphometrics", "MNI152_Neuromorphometrics"),
                ("Colin27 AAL", "Colin27_AAL"), ("lesions", "Lesions"),
                ("phantoms of 5 modalities (synthetic)", "Phantoms"),
                ("validation: non-held-out AAL, never trained on by the LiteMedSAMs (the small SAM was)", "validation"),
                ("validation, coronal slices", "validation_coronal"),
                ("validation, box sides off by up to 5 px", "validation_box_shift_5"))
SAM_MODELS = (("small SAM (default)", "smallsam"), ("`litemedsam` (zero-shot)", "litemedsam"),
              ("`litemedsam-adapted` (decoder trained on box crops)", "litemedsam_decoder"),
              ("`litemedsam-lora` (LoRA on stages 2-3 + decoder, on box crops)", "litemedsam_lora"))


def sam_prompts(d: Data) -> str:
    """Dice by prompt for every (dataset, model) whose ``sam evaluate`` CSV is in ``data/sam/MODEL_DATASET.csv``."""
    runs = []  # one row per (dataset, model): prompts side by side read across
    for dlabel, dname in SAM_DATASETS:
        for mlabel, mname in SAM_MODELS:
            path = d.root / "sam" / f"{mname}_{dname}.csv"
            if path.is_file():
                rows = {r["prompt"]: r for r in _rows(path)}
                runs.append((f"{dlabel} ({next(iter(rows.values()))['n']})", mlabel, rows))
    prompts = list(dict.fromkeys(p for *_, t in runs for p in t))
    body = [[data, model, *(_f(float(t[p]["dice_mean"])) if p in t else "—" for p in prompts)] for data, model, t in runs]
    return _table(["structures (n)", "model", *prompts], body)


WEIGHT_VARIANTS = (("whole-slice training", "heldout_aal_whole_slice_weights"),
                   ("+ zoom episodes", "heldout_aal_zoom_weights"),
                   ("+ cross-subject episodes (0.5)", "heldout_aal_cross_subject_0.5_weights"),
                   ("+ cross-subject episodes (0.8), registration unseeded", "heldout_aal_unseeded_registration"),
                   ("cross-subject 0.8 weights, shipped settings without smoothing", "heldout_aal_no_smoothing"),
                   ("cross-subject 0.8 weights, shipped settings", "heldout_aal_shipped"))
INFERENCE_VARIANTS = (("relative heights, fixed gate margin 0.05 (whole-slice weights)", "heldout_aal_relative_position"),
                      ("registered heights, first pass only (whole-slice weights)", "heldout_aal_first_pass_only"))


def tried_heldout(d: Data) -> str:
    rows = []
    for label, name in (*INFERENCE_VARIANTS, *WEIGHT_VARIANTS):
        s = d.summary(name)
        rows.append([label, *(_cell(s, "incontext", n) for n in SIZES)])
    return _table(["held-out AAL, in-context", *map(str, SIZES)], rows)


NM_VARIANTS = (("registered heights, first pass only (whole-slice weights)", "heldout_neuromorphometrics_first_pass_only"),
               ("+ zoom episodes", "heldout_neuromorphometrics_zoom_weights"),
               ("+ cross-subject episodes (0.5)", "heldout_neuromorphometrics_cross_subject_0.5_weights"),
               ("+ cross-subject episodes (0.8), registration unseeded", "heldout_neuromorphometrics_unseeded_registration"),
               ("cross-subject 0.8 weights, shipped settings without smoothing", "heldout_neuromorphometrics_no_smoothing"),
               ("cross-subject 0.8 weights, shipped settings", "heldout_neuromorphometrics_shipped"))


def tried_heldout_nm(d: Data) -> str:
    rows = [[label, *(_cell(d.summary(name), "incontext", n) for n in (8, 16))] for label, name in NM_VARIANTS]
    return _table(["held-out Neuromorphometrics, in-context", "8", "16"], rows)


def _by_group(rows: list[dict], key: str, groups: dict[str, str]) -> dict[tuple[str, int], tuple[float, float]]:
    """(setting, size) -> (mean Dice over the val10 structures, over the small5 ones)."""
    acc: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in rows:
        if r.get("method", "incontext") != "incontext":
            continue
        g = groups.get(r["structure"])
        if g:
            acc.setdefault((r[key], int(r["size"])), {}).setdefault(g, []).append(float(r["dice"]))
    return {k: (float(np.mean(v.get("val10", [np.nan]))), float(np.mean(v.get("small5", [np.nan])))) for k, v in acc.items()}


def tried_validation_training(d: Data) -> str:
    out = []
    for name in ("validation_cross_subject_training", "validation_training_and_inference_variants"):
        g = _by_group(d.results(name), "model", d.val_groups)
        models = list(dict.fromkeys(k[0] for k in g))
        sizes = sorted({k[1] for k in g})
        rows = [[m, *(f"{_f(g[(m, s)][0])} / {_f(g[(m, s)][1])}" if (m, s) in g else "—" for s in sizes)] for m in models]
        out.append(_table(["weights and inference (val10 / small5)", *(f"{s} supports" for s in sizes)], rows))
    return "\n\n".join(out)


def _sweep(d: Data, name: str, knob: str, header: str) -> str:
    """Mean validation Dice per (support size, structure group) for each value of one inference knob."""
    rows = _rows(d.root / "incontext" / f"{name}_results.csv")
    values = sorted({float(r[knob]) for r in rows})
    body = []
    for size in sorted({int(r["size"]) for r in rows}):
        for grp in ("val10", "small5"):
            cells = []
            for x in values:
                v = [float(r["dice"]) for r in rows if int(r["size"]) == size and float(r[knob]) == x
                     and d.val_groups.get(r["structure"]) == grp]
                cells.append(_f(float(np.mean(v))) if v else "—")
            body.append([f"{size} supports, {grp}", *cells])
    return _table([header, *(f"{x:g}" for x in values)], body)


def tried_validation_smoothing(d: Data) -> str:
    return _sweep(d, "validation_through_plane", "through_plane_sigma", "through-plane sigma")


def tried_validation_prior(d: Data) -> str:
    return _sweep(d, "validation_prior_weight", "prior_weight", "prior weight")


def tried_validation_refine(d: Data) -> str:
    rows = _rows(d.root / "incontext" / "validation_refine_results.csv")
    return _table(["setting (16 supports, 1 seed)", "val10", "small5", "s for 15 structures"],
                  [[r["setting"], r["val10_dice"], r["small5_dice"], r["seconds_for_15_structures"] or "—"] for r in rows])


def tried_validation_registration(d: Data) -> str:
    g = _by_group(d.results("validation_registration"), "setting", d.val_groups)
    return _table(["registration and extent gate (16 supports, val10)", "Dice"],
                  [[k[0], _f(v[0])] for k, v in g.items()])


def tried_validation_encoder(d: Data) -> str:
    g = _by_group(d.results("validation_encoder_comparison"), "encoder", d.val_groups)
    return _table(["encoder (10 CPU-minutes of training each; 16 supports, val10)", "Dice"], [[k[0], _f(v[0])] for k, v in g.items()])


def _label_efficiency_rows(d: Data, name: str) -> list[dict]:
    """``name`` (results.csv or summary.csv) of every label-efficiency run: ``label_efficiency/`` and
    runs of further arms on the same splits (``label_efficiency_*/``), their rows in that order."""
    folders = [d.root / "label_efficiency", *sorted(d.root.glob("label_efficiency_*/"))]
    return [r for f in folders if (f / name).is_file() for r in _rows(f / name)]


def label_efficiency(d: Data) -> str:
    rows = _label_efficiency_rows(d, "summary.csv")
    if not rows:
        return "_(no data yet: run the command above)_"
    fr = sorted({float(r["fraction"]) for r in rows})
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by = {(r["arm"], float(r["fraction"])): r for r in rows}
    body = [[a, *(f"{float(by[(a, f)]['test_dice_mean']):.3f} [{float(by[(a, f)]['ci_low']):.3f}, "
                  f"{float(by[(a, f)]['ci_high']):.3f}] ({by[(a, f)]['seeds']} seeds)" if (a, f) in by else "—" for f in fr)]
            for a in arms]
    cases = {f: next(r["labeled_cases"] for r in rows if float(r["fraction"]) == f) for f in fr}
    return _table(["arm", *(f"{f:g} of the labels ({cases[f]} case(s))" for f in fr)], body)


def label_efficiency_paired(d: Data) -> str:
    """Each arm minus the scratch arm, seed by seed (the arms of one seed share its case split)."""
    rows = _label_efficiency_rows(d, "results.csv")
    if not rows:
        return "_(no data yet: run the command above)_"
    base = next((a for a in dict.fromkeys(r["arm"] for r in rows) if a.startswith("scratch")), None)
    if base is None:
        return "_(no scratch arm in this run)_"
    dice = {(r["arm"], float(r["fraction"]), int(r["seed"])): float(r["test_dice"]) for r in rows}
    body = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm == base:
            continue
        for frac in sorted({k[1] for k in dice}):
            diffs = [dice[(arm, frac, s)] - dice[(base, frac, s)] for (a, f, s) in dice
                     if a == arm and f == frac and (base, frac, s) in dice]
            if not diffs:
                continue
            wins = sum(x > 0 for x in diffs)
            body.append([arm, f"{frac:g}", _ci(summarise(diffs), signed=True), f"{wins} of {len(diffs)}"])
    return _table(["arm", "label fraction", f"Dice minus {base} (paired by seed, 95 % CI)", "seeds it wins"], body)


#: (who drew the masks, file stem after ``heldout_{atlas}_`` in data/incontext, path) of the
#: prompt-defined example sets measured
PROMPT_SETS = (("the shipped small SAM", "support_prompts", "2: build"),
               ("LiteMedSAM, decoder adapted", "support_prompts_litemedsam_adapted", "1 + 2"),
               ("LiteMedSAM, LoRA in the encoder + decoder", "support_prompts_litemedsam_lora", "1 + 2"))
#: (name, file-stem part) of the held-out label sets the in-context rows are scored on (supports: Colin27 AAL)
HELDOUT_LABELS = (("AAL", "aal"), ("Neuromorphometrics", "neuromorphometrics"))


def _prompt_set(d: Data, atlas: str, stem: str, supports: int, part: str = "results") -> Path:
    """One CSV (``part``: results or sam_masks) of a prompt-defined example set of ``supports`` slices
    scored on the held-out ``atlas`` labels (16 supports: no size in the name)."""
    stem = f"heldout_{atlas}_{stem}"
    return d.root / "incontext" / (f"{stem}_{part}.csv" if supports == 16 else f"{stem}_{supports}supports_{part}.csv")


def support_prompts(d: Data) -> str:
    """Example sets given as boxes (a SAM draws the masks) against the same sets' true masks."""
    body = []
    for labels, atlas in HELDOUT_LABELS:
        for supports in (16, 8):
            first = True
            for who, stem, _ in PROMPT_SETS:
                path = _prompt_set(d, atlas, stem, supports)
                if not path.is_file():
                    continue
                rows = _rows(path)
                sam = _rows(_prompt_set(d, atlas, stem, supports, "sam_masks"))
                mask = [float(r["mask_defined_dice"]) for r in rows]
                prompt = [float(r["prompt_defined_dice"]) for r in rows]
                if first:
                    body.append([labels, "true masks", supports, _ci(summarise(mask)), "—", "1"])
                    first = False
                body.append([labels, f"boxes, masks drawn by {who}", supports, _ci(summarise(prompt)),
                             _ci(summarise([b - a for a, b in zip(mask, prompt)]), signed=True),
                             _ci(summarise([float(r["dice"]) for r in sam]))])
    if not body:
        return "_(no data yet: run the command above)_"
    return _table(["held-out labels", "example set", "supports per structure", "3D Dice on MNI152 (95 % CI)",
                   "minus true masks (paired by structure)", "the drawn masks' 2D Dice on the prompted slices"], body)


SAME_STUDY_METHODS = (("completion", "**`segment --partial-labels`** (shipped settings)"),
                      ("interpolation", "its interpolated outlines alone (`--refiner none`)"),
                      ("nearest-slice", "nearest labelled slice copied"),
                      ("contour-interpolation", "morphological contour interpolation (ITK, Slicer's)"),
                      ("incontext", "in-context model alone, labelled slices as examples"))


def _same_study_rows(d: Data) -> list[dict]:
    path = d.root / "same_study" / "results.csv"
    return _rows(path) if path.is_file() else []


def same_study(d: Data) -> str:
    """Dice on the slices not given, per group of structures, method and labelled-slice count."""
    rows = _same_study_rows(d)
    if not rows:
        return "_(no data yet: run the command above)_"
    counts = sorted({int(r["labelled"]) for r in rows})
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        sel = [r for r in rows if r["group"] == group]
        structures = len({(r["dataset"], r["structure"]) for r in sel})
        body = []
        for method, name in SAME_STUDY_METHODS:
            cells = [_ci(summarise([float(r["dice"]) for r in sel if r["method"] == method and int(r["labelled"]) == n]))
                     for n in counts]
            if any(c != "—" for c in cells):
                body.append([name, *cells])
        out.append(f"**{group.capitalize()} structures** ({structures} structures over "
                   f"{len({r['dataset'] for r in sel})} volumes, {len({r['seed'] for r in sel})} placements each):\n\n"
                   + _table(["method", *(f"{n} labelled" for n in counts)], body))
    return "\n\n".join(out)


def same_study_paired(d: Data) -> str:
    """Completion minus each baseline, paired by structure and placement."""
    rows = _same_study_rows(d)
    if not rows:
        return "_(no data yet: run the command above)_"
    from medfound.eval.same_study import paired_differences

    counts = sorted({int(r["labelled"]) for r in rows})
    body = []
    for group in dict.fromkeys(r["group"] for r in rows):
        for base, name in SAME_STUDY_METHODS[1:]:
            cells = []
            for n in counts:
                diffs = paired_differences(rows, group, base, n)
                cells.append(f"{_ci(summarise(diffs), signed=True)}, wins {sum(x > 0 for x in diffs)}/{len(diffs)}" if diffs else "—")
            if any(c != "—" for c in cells):
                body.append([group, name, *cells])
    return _table(["structures", "completion minus", *(f"{n} labelled" for n in counts)], body)


def _same_study_plot(d: Data, path: Path) -> None:
    from medfound.eval.same_study import plot_same_study, summarise_rows

    rows = _same_study_rows(d)
    summary = summarise_rows(rows, [m for m, _ in SAME_STUDY_METHODS], sorted({int(r["labelled"]) for r in rows}),
                             list(dict.fromkeys(r["group"] for r in rows)))
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_same_study(summary["by_count"], path)


#: (row label, results file in data/same_study, method) of the settings sweep on trained structures
SAME_STUDY_VALIDATION = (("nearest labelled slice copied", "validation_shipped", "nearest-slice"),
                         ("contour interpolation", "validation_shipped", "contour-interpolation"),
                         ("**outlines interpolated, tapering over one gap (shipped)**", "validation_shipped", "completion"),
                         ("outlines interpolated, tapering over half a gap (`--taper 0.5`)", "validation_taper05", "completion"),
                         ("in-context model alone (`--methods incontext`)", "validation_model0", "incontext"),
                         ("outlines interpolated, same 12 structures", "validation_model0", "completion"),
                         ("a quarter of the in-context model mixed in (`--model-share 0.25`)", "validation_model025", "completion"))
#: the same for the refiner, on AAL's non-held-out structures of both AAL volumes (no AAL dataset trained it)
SAME_STUDY_REFINER_VALIDATION = (("nearest labelled slice copied", "validation_refiner", "nearest-slice"),
                                 ("outlines interpolated (`--refiner none`)", "validation_refiner", "interpolation"),
                                 ("**outlines refined by the shipped refiner**", "validation_refiner", "completion"),
                                 ("outlines refined by a refiner trained on twice the episodes for twice the steps",
                                  "validation_refiner_long", "completion"))


def same_study_validation(d: Data, variants=SAME_STUDY_VALIDATION) -> str:
    """The settings sweep of same-study completion on trained structures (one centred placement)."""
    body, counts = [], (2, 4, 8, 16)
    for name, stem, method in variants:
        path = d.root / "same_study" / f"{stem}.csv"
        if not path.is_file():
            continue
        rows = [r for r in _rows(path) if r["method"] == method]
        structures = len({(r["dataset"], r["structure"]) for r in rows})
        cells = [_f(summarise([float(r["dice"]) for r in rows if int(r["labelled"]) == n]).get("mean")) for n in counts]
        body.append([name, structures, *cells])
    if not body:
        return "_(no data yet: run the commands above)_"
    return _table(["variant", "structures", *(f"{n} labelled" for n in counts)], body)


#: (direction, results file in data/cross_subject_2d)
DIRECTIONS_2D = (("Colin27 examples -> MNI152 queries", "colin27_to_mni152"),
                 ("MNI152 examples -> Colin27 queries", "mni152_to_colin27"))
METHODS_2D = (("incontext-deformable", "**in-context, examples registered deformably onto the query (`segment`'s default)**"),
              ("incontext-registered", "in-context, examples registered by a 2D affine (`--register-2d affine`)"),
              ("incontext", "in-context, examples in their own frame (`--no-register`)"),
              ("deformable-label-fusion", "deformable label fusion (examples registered deformably, most similar one's mask)"),
              ("registered-label-fusion", "registered label fusion (examples registered by an affine, most similar one's mask)"),
              ("label-fusion", "label fusion (most similar example's mask)"),
              ("mean-mask", "mean of the example masks"))


def _rows_2d(d: Data, stem: str) -> list[dict]:
    path = d.root / "cross_subject_2d" / f"{stem}_results.csv"
    return _rows(path) if path.is_file() else []


def cross_subject_2d(d: Data, directions=DIRECTIONS_2D, what: str = "held-out structures") -> str:
    """2D Dice by example-set size, per direction and method."""
    out = []
    for title, stem in directions:
        rows = _rows_2d(d, stem)
        if not rows:
            continue
        sizes = sorted({int(r["size"]) for r in rows})
        body = [[name, *(_ci(summarise([float(r["dice"]) for r in rows if r["method"] == m and int(r["size"]) == n]))
                         for n in sizes)] for m, name in METHODS_2D if any(r["method"] == m for r in rows)]
        queries = len({(r["structure"], r["seed"], r["slice"]) for r in rows})
        out.append(f"**{title}** ({len({r['structure'] for r in rows})} {what}, {queries} queries):\n\n"
                   + _table(["method", *(f"{n} examples" for n in sizes)], body))
    return "\n\n".join(out) or "_(no data yet: run the commands above)_"


def _cross_subject_2d_plot(d: Data, path: Path) -> None:
    from medfound.io.figures import curve_panels

    panels = []
    for title, stem in DIRECTIONS_2D:
        rows = _rows_2d(d, stem)
        sizes = sorted({int(r["size"]) for r in rows})
        series = []
        for m, name in METHODS_2D:
            stats = [summarise([float(r["dice"]) for r in rows if r["method"] == m and int(r["size"]) == n]) for n in sizes]
            if stats and stats[0]["n"]:
                series.append((name.replace("**", ""), sizes, [s["mean"] for s in stats], [s["ci_low"] for s in stats],
                               [s["ci_high"] for s in stats]))
        panels.append((title, series))
    path.parent.mkdir(parents=True, exist_ok=True)
    curve_panels(panels, path, "example slices per structure", "2D Dice (mean, 95 % CI)")


QUERY_BOX_METHODS = (("incontext", "in-context, examples only (`segment --support`)"),
                     ("incontext-box", "**in-context told where (`segment --query-box`)**"),
                     ("sam-box", "shipped small SAM, the same box, propagated (`sam segment --box`)"))


def _query_box_table(rows: list[dict], label_of: Callable[[dict], str]) -> str:
    body = []
    for key in dict.fromkeys(label_of(r) for r in rows):
        sel = [r for r in rows if label_of(r) == key]
        body.append([key, _ci(summarise([float(r["dice_3d"]) for r in sel])),
                     _f(summarise([float(r["dice_slice"]) for r in sel])["mean"]), len(sel),
                     f"{np.mean([float(r['seconds']) for r in sel]):.1f}"])
    return _table(["method", "3D Dice (95 % CI)", "Dice on the boxed slice", "runs", "s per case"], body)


def query_box(d: Data) -> str:
    """Lesions across patients, leave-one-out: examples only, with a query box, a SAM with the box."""
    path = d.root / "query_box" / "lesions_results.csv"
    if not path.is_file():
        return "_(no data yet: run the command above)_"
    names = dict(QUERY_BOX_METHODS)
    rows = sorted(_rows(path), key=lambda r: [m for m, _ in QUERY_BOX_METHODS].index(r["method"]))
    per_case = _table(["case", *(names[m].replace("**", "") for m, _ in QUERY_BOX_METHODS)],
                      [[c, *(_f(float(next(r["dice_3d"] for r in rows if r["query"] == c and r["method"] == m)))
                             for m, _ in QUERY_BOX_METHODS)] for c in dict.fromkeys(r["query"] for r in rows)])
    return _query_box_table(rows, lambda r: names[r["method"]]) + "\n\nPer case (3D Dice):\n\n" + per_case


def query_box_validation(d: Data) -> str:
    """How far the box's answer reaches through the slices, chosen on the phantoms' lesions."""
    rows = []
    for stem, name in (("validation_phantoms_extent_reach", "`--extent reach`: as far as the box is wide"),
                       ("validation_phantoms_extent_propagate", "`--extent propagate`: until the answer shrinks below a fifth"),
                       ("validation_phantoms_extent_both", "**`--extent both`: whichever comes first (shipped)**"),
                       ("validation_phantoms_baselines", None)):
        path = d.root / "query_box" / f"{stem}.csv"
        if path.is_file():
            rows += [dict(r, variant=name or dict(QUERY_BOX_METHODS)[r["method"]]) for r in _rows(path)]
    return _query_box_table(rows, lambda r: r["variant"]) if rows else "_(no data yet: run the commands above)_"


# ---- the head-to-head page (docs/paths.md) ----------------------------------------------------------------

#: (row label, path, model file stem in data/sam)
PATH_SAM_ROWS = (("box's inscribed ellipse (floor)", "—", "ellipse"),
                 ("LiteMedSAM zero-shot", "1: adapt", "litemedsam"),
                 ("LiteMedSAM, mask decoder adapted on box crops (`litemedsam-adapted`)", "1: adapt", "litemedsam_decoder"),
                 ("LiteMedSAM, LoRA on TinyViT stages 2-3 + decoder, trained on box crops (`litemedsam-lora`)", "1: adapt",
                  "litemedsam_lora"),
                 ("small SAM trained on the sample atlases (shipped default)", "2: build", "smallsam"))
PATH_SAM_COLUMNS = (("MNI152 AAL", "MNI152_AAL", "box"), ("MNI152 AAL", "MNI152_AAL", "1 point"),
                    ("MNI152 Neuromorphometrics", "MNI152_Neuromorphometrics", "box"),
                    ("Colin27 AAL", "Colin27_AAL", "box"), ("lesions", "Lesions", "box"))


def _sam_cell(d: Data, model: str, dataset: str, prompt: str) -> str:
    """One cell of the prompt table; the ellipse (a box's answer only) is read from the small SAM's CSV."""
    ellipse = model == "ellipse"
    if ellipse and prompt != "box":
        return "—"
    path = d.root / "sam" / f"{'smallsam' if ellipse else model}_{dataset}.csv"
    if not path.is_file():
        return "not measured"
    r = {r["prompt"]: r for r in _rows(path)}.get("box (inscribed ellipse)" if ellipse else prompt)
    return f"{float(r['dice_mean']):.3f} [{float(r['ci95_low']):.3f}, {float(r['ci95_high']):.3f}]" if r else "—"


def paths_prompts(d: Data) -> str:
    header = ["model", "path", *(f"{ds}: {'click' if pr == '1 point' else pr}" for ds, _, pr in PATH_SAM_COLUMNS)]
    body = [[label, path, *(_sam_cell(d, stem, ds, pr) for _, ds, pr in PATH_SAM_COLUMNS)]
            for label, path, stem in PATH_SAM_ROWS]
    return _table(header, body)


def paths_few_labels(d: Data) -> str:
    rows = _label_efficiency_rows(d, "summary.csv")
    if not rows:
        return "_(no data yet: run the command on the label-efficiency page)_"
    kind = {"scratch-full": ("ViT-UNETR from scratch (floor)", "—"),
            "scratch-unet-full": ("U-Net on a ResNet-18 from scratch, encoder at 0.3 × the decoder's rate", "—"),
            "scratch-unet-full-encoder-lr-1": ("U-Net on a ResNet-18 from scratch, one rate (CNN floor)", "—"),
            "mae-full": ("MAE-pretrained ViT-UNETR", "2: build"),
            "litemedsam-linear": ("LiteMedSAM's TinyViT, frozen, U-Net decoder", "1: adapt"),
            "litemedsam-lora": ("LiteMedSAM's TinyViT, LoRA on stages 2-3, U-Net decoder", "1: adapt"),
            "litemedsam-lora-stages-1-2-3": ("LiteMedSAM's TinyViT, LoRA on stages 1-3, U-Net decoder", "1: adapt"),
            "litemedsam-full": ("LiteMedSAM's TinyViT, fine-tuned fully, U-Net decoder", "1: adapt")}
    fewest = min(float(r["fraction"]) for r in rows)
    body = []
    for r in rows:
        if float(r["fraction"]) != fewest:
            continue
        label, p = kind.get(r["arm"], (r["arm"], "?"))
        body.append([f"{label} (`{r['arm']}`)", p, f"{float(r['test_dice_mean']):.3f} [{float(r['ci_low']):.3f}, "
                     f"{float(r['ci_high']):.3f}]", r["seeds"]])
    body.sort(key=lambda row: {"—": 0, "2: build": 1}.get(row[1], 2))  # floors, then build, then adapt
    return _table(["encoder", "path", "test Dice, one labeled brain (95 % CI)", "seeds"], body)


#: held-out set -> its name in tables and the GMISeg model's support-size run on it (the conv model's
#: is ``heldout_SET_shipped``)
GMISEG_HELDOUT = {"aal": ("MNI152 AAL", "heldout_aal_gmiseg"),
                  "neuromorphometrics": ("MNI152 Neuromorphometrics", "heldout_neuromorphometrics_gmiseg")}


def _incontext_dice(d: Data, name: str) -> dict[tuple[str, int, str], float]:
    """(structure, support size, seed) -> in-context Dice of one support-size run: the key that draws
    the support subset, so two models' runs pair on identical example sets."""
    return {(r["structure"], int(r["size"]), r["seed"]): float(r["dice"]) for r in d.results(name)
            if r["method"] == "incontext"}


def tried_gmiseg(d: Data) -> str:
    """The GMISeg model against the shipped conv model on identical support subsets: the validation
    structures (val10 / small5), then the held-out sets as a paired difference."""
    if not (d.root / "incontext" / "validation_gmiseg_results.csv").is_file():
        return "_(no data yet: run the commands above)_"
    g = _by_group(d.results("validation_gmiseg"), "model", d.val_groups)
    models, sizes = list(dict.fromkeys(k[0] for k in g)), sorted({k[1] for k in g})
    out = [_table(["model (validation, val10 / small5, 1 seed)", *(f"{s} supports" for s in sizes)],
                  [[m, *(f"{_f(g[(m, s)][0])} / {_f(g[(m, s)][1])}" for s in sizes)] for m in models])]
    body = []
    for test, (title, name) in GMISEG_HELDOUT.items():
        if not (d.root / "incontext" / f"{name}_results.csv").is_file():
            continue
        gm, conv = _incontext_dice(d, name), _incontext_dice(d, f"heldout_{test}_shipped")
        for n in sorted({k[1] for k in gm}):
            keys = [k for k in gm if k[1] == n and k in conv]
            diffs = [gm[k] - conv[k] for k in keys]
            body.append([title, n, _f(float(np.mean([gm[k] for k in keys]))), _f(float(np.mean([conv[k] for k in keys]))),
                         _ci(summarise(diffs), signed=True), f"{sum(x > 0 for x in diffs)} of {len(diffs)}"])
    if body:
        out.append(_table(["held-out set", "supports", "GMISeg", "conv (shipped)", "GMISeg − conv (95 % CI)",
                           "GMISeg better"], body))
    return "\n\n".join(out)


def paths_incontext(d: Data) -> str:
    aal, aal_base = d.summary("heldout_aal_shipped"), d.summary("heldout_aal_no_smoothing")
    nm, nm_base = d.summary("heldout_neuromorphometrics_shipped"), d.summary("heldout_neuromorphometrics_no_smoothing")
    ft = (d.summary("heldout_vs_finetuning"), _summary_if(d, "heldout_neuromorphometrics_vs_finetuning"))
    gmiseg = [_summary_if(d, name) for _, name in GMISEG_HELDOUT.values()]
    rows = [["conv in-context model (shipped)", "2: build", *(_cell(t, "incontext", n, ci=True) for t in (aal, nm) for n in (8, 16))],
            ["registered label fusion (no model)", "—", *(_cell(t, "registered-label-fusion", n, ci=True)
                                                        for t in (aal_base, nm_base) for n in (8, 16))],
            ["U-Net trained on the example slices (from-scratch CNN floor)", "—",
             *(_cell(t, "finetune", n, ci=True) if t else "not measured" for t in ft for n in (8, 16))],
            ["in-context on LiteMedSAM's encoder with LoRA (GMISeg, an hour of CPU training)", "1: adapt",
             *(_cell(t, "incontext", n, ci=True) if t else "not measured" for t in gmiseg for n in (8, 16))]]
    for who, stem, which in PROMPT_SETS:
        paths = [_prompt_set(d, atlas, stem, n) for _, atlas in HELDOUT_LABELS for n in (8, 16)]
        if any(p.is_file() for p in paths):
            cells = [_ci(summarise([float(r["prompt_defined_dice"]) for r in _rows(p)])) if p.is_file() else "not measured"
                     for p in paths]
            rows.append([f"conv in-context, example set given as boxes (masks drawn by {who})", which, *cells])
    return _table(["model", "path", "AAL, 8 supports", "AAL, 16", "Neuromorphometrics, 8", "Neuromorphometrics, 16"], rows)


def throughput(d: Data) -> str:
    folder = d.root / "bench"
    if not folder.is_dir():
        return "_(no data yet: run the commands above)_"
    out = []
    for f in sorted(folder.glob("*.json")):
        js = json.loads(f.read_text())
        out.append(f"**{f.stem}** (`{js.get('command', '')}`)\n")
        flat = {k: v for k, v in js.items() if isinstance(v, (int, float, str)) and k not in ("command",)}
        rows = [[k, v] for k, v in flat.items()]
        m = js.get("machine")
        if isinstance(m, dict):  # absolute times hold for this host only
            native = {True: ", bf16 native", False: ", bf16 emulated"}.get(m.get("cpu_bf16_native"), "")
            rows.append(["machine", ", ".join(str(m[k]) for k in ("cpu", "cpu_capability") if k in m)
                         + f"{native}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}"])
        for r in js.get("results", []) if isinstance(js.get("results"), list) else []:
            rows.append([", ".join(f"{k} {v}" for k, v in r.items() if not isinstance(v, (int, float)) or k in ("size",)),
                         ", ".join(f"{k} {v}" for k, v in r.items() if isinstance(v, (int, float)) and k != "size")])
        out.append(_table(["measure", "value"], rows))
    return "\n\n".join(out)


TABLES: dict[str, Callable[[Data], str]] = {
    "aal_curve": aal_curve, "aal_structures": aal_structures, "nm_summary": nm_summary, "nm_structures": nm_structures,
    "finetune_summary": finetune_summary, "sam_prompts": sam_prompts,
    "tried_heldout": tried_heldout, "tried_heldout_nm": tried_heldout_nm, "tried_validation_training": tried_validation_training,
    "tried_validation_smoothing": tried_validation_smoothing, "tried_validation_prior": tried_validation_prior,
    "tried_validation_refine": tried_validation_refine, "tried_validation_registration": tried_validation_registration,
    "tried_validation_encoder": tried_validation_encoder, "tried_gmiseg": tried_gmiseg, "label_efficiency": label_efficiency,
    "label_efficiency_paired": label_efficiency_paired, "throughput": throughput,
    "support_prompts": support_prompts, "paths_prompts": paths_prompts, "paths_few_labels": paths_few_labels, "paths_incontext": paths_incontext,
    "same_study": same_study, "same_study_paired": same_study_paired, "same_study_validation": same_study_validation,
    "same_study_refiner_validation": lambda d: same_study_validation(d, SAME_STUDY_REFINER_VALIDATION),
    "cross_subject_2d": cross_subject_2d,
    "cross_subject_2d_validation": lambda d: cross_subject_2d(d, (("Colin27 examples -> MNI152 queries", "validation"),),
                                                              "non-held-out structures"),
    "cross_subject_2d_validation_deformable": lambda d: cross_subject_2d(
        d, (("Colin27 examples -> MNI152 queries", "validation_deformable"),), "non-held-out structures"),
    "query_box": query_box, "query_box_validation": query_box_validation,
}

#: templates rendered somewhere other than beside the results pages (relative to them)
ELSEWHERE = {"paths.md": Path("..") / "paths.md"}


# ---- plots ----------------------------------------------------------------------------------------------

def _curve_plot(d: Data, path: Path, series: list[tuple[str, str, str]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, name, method in series:
        s = d.summary(name)
        xs = [n for n in SIZES if (method, n) in s]
        if not xs:
            continue
        ys = [float(s[(method, n)]["dice_mean"]) for n in xs]
        lo = [float(s[(method, n)]["ci_low"]) for n in xs]
        hi = [float(s[(method, n)]["ci_high"]) for n in xs]
        ax.plot(xs, ys, marker="o", label=label)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(SIZES, [str(n) for n in SIZES])
    ax.set_xlabel("support slices per structure")
    ax.set_ylabel("3D Dice (mean, 95 % CI)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _seeds_plot(d: Data, path: Path) -> None:
    """Test Dice of every run, by arm (one panel per label fraction), with the arm's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _label_efficiency_rows(d, "results.csv")
    fracs = sorted({float(r["fraction"]) for r in rows})
    # each panel shows the arms run at its fraction, sized to them
    arms_at = {f: list(dict.fromkeys(r["arm"] for r in rows if float(r["fraction"]) == f)) for f in fracs}
    widths = [len(arms_at[f]) + 0.5 for f in fracs]
    fig, axes = plt.subplots(1, len(fracs), figsize=(2.2 + 1.3 * sum(widths), 3.6), dpi=100, squeeze=False,
                             sharey=True, gridspec_kw={"width_ratios": widths})
    axes[0][0].set_ylabel("test Dice (one dot per seed)")
    for ax, frac in zip(axes[0], fracs):
        arms = arms_at[frac]
        for i, arm in enumerate(arms):
            ys = [float(r["test_dice"]) for r in rows if r["arm"] == arm and float(r["fraction"]) == frac]
            ax.scatter([i] * len(ys), ys, s=18, alpha=0.7)
            if ys:
                ax.hlines(np.mean(ys), i - 0.3, i + 0.3, color="k", lw=1.5)
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        ax.set_title(f"label fraction {frac:g}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


PLOTS: dict[str, Callable[[Data, Path], None]] = {
    "label_efficiency": _seeds_plot,
    "same_study": _same_study_plot,
    "cross_subject_2d": _cross_subject_2d_plot,
    "aal_curve": lambda d, p: _curve_plot(d, p, [
        ("in-context, shipped", "heldout_aal_shipped", "incontext"),
        ("in-context, no smoothing", "heldout_aal_no_smoothing", "incontext"),
        ("registered label fusion", "heldout_aal_no_smoothing", "registered-label-fusion"),
        ("label fusion", "heldout_aal_no_smoothing", "label-fusion")], "Held-out AAL structures, Colin27 -> MNI152"),
    "nm_curve": lambda d, p: _curve_plot(d, p, [
        ("in-context, shipped", "heldout_neuromorphometrics_shipped", "incontext"),
        ("registered label fusion", "heldout_neuromorphometrics_no_smoothing", "registered-label-fusion"),
        ("label fusion", "heldout_neuromorphometrics_no_smoothing", "label-fusion")],
        "Held-out structures, Neuromorphometrics labels on MNI152"),
    "finetune_curve": lambda d, p: _curve_plot(d, p, [
        ("in-context", "heldout_vs_finetuning", "incontext"), ("fine-tuned U-Net", "heldout_vs_finetuning", "finetune"),
        ("label fusion", "heldout_vs_finetuning", "label-fusion")], "In-context vs fine-tuning on the supports"),
    "tried_heldout": lambda d, p: _curve_plot(d, p, [(label, name, "incontext") for label, name in
                                                     (*INFERENCE_VARIANTS, *WEIGHT_VARIANTS)],
                                              "Held-out AAL: weights and inference variants"),
}


# ---- pages ----------------------------------------------------------------------------------------------

TOKEN = re.compile(r"\{\{(table|plot):([a-z0-9_]+)\}\}")


def render(root: str | Path = "docs/results", out: str | Path | None = None, plots: bool = True) -> list[Path]:
    """Render every template of ``root/templates`` into ``out`` (default ``root``); returns the pages."""
    root = Path(root)
    out = Path(out) if out else root
    data = Data(root / "data")
    written = []
    for template in sorted((root / "templates").glob("*.md")):
        text = template.read_text()

        def fill(m: re.Match) -> str:
            kind, key = m.group(1), m.group(2)
            if kind == "table":
                return TABLES[key](data)
            if plots:
                PLOTS[key](data, out / "plots" / f"{key}.png")
            return f"![{key}](plots/{key}.png)"

        where = "results/" if template.name in ELSEWHERE else ""
        page = f"<!-- made by `make results` from {where}templates/{template.name} and {where}data/; edit those -->\n" + \
            TOKEN.sub(fill, text)
        # the head-to-head page lives in docs/ (rendered beside the others when out is not the docs tree)
        path = (root / ELSEWHERE[template.name]) if template.name in ELSEWHERE and out == root else out / template.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    for p in render(args[0] if args else "docs/results"):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``RUN/model_card.md``: what a fine-tuned model was trained on and how well it does, with pictures
of where it fails (the worst cases' slices with truth and prediction side by side)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfound.data.nnunet import NnUNetDataset
from medfound.data.orientation import to_canonical
from medfound.eval.metrics import case_metrics, summarise
from medfound.infer.predict import predict_image
from medfound.io.atomic import write_text
from medfound.io.figures import best_slice, overlay, save_figure
from medfound.models.segmenter import load_segmenter


def evaluate_cases(run: Path, ds: NnUNetDataset, cases: list[str], split: str = "Tr") -> tuple[list, dict]:
    """Per case and trained label metrics on the original grids, plus the predictions kept for plots."""
    model, cfg = load_segmenter(run)
    rows, preds = [], {}
    values = [int(i["label"]) for i in cfg["classes"].values()]
    for case in cases:
        image, truth = ds.read_case(case, split)
        pred = predict_image(model, cfg, image)
        preds[case] = (image, truth, pred)
        rows += case_metrics(case, pred.astype(np.int64), truth.array.astype(np.int64), truth.spacing, values)
    return rows, preds


def _worst_overlays(run: Path, rows: list, preds: dict, k: int = 2) -> list[str]:
    import matplotlib.pyplot as plt

    per_case = {}
    for r in rows:
        per_case.setdefault(r.case, []).append(r.dice)
    worst = sorted(per_case, key=lambda c: np.mean(per_case[c]))[:k]
    files = []
    for case in worst:
        image, truth, pred = preds[case]
        img, lab, prd = image, truth.array, pred
        if image.ndim == 3:
            can, _ = to_canonical(image)
            lab = to_canonical(truth)[0].array
            prd = to_canonical(truth.with_array(pred))[0].array
            kk = best_slice(lab)
            img, lab, prd = can.array[:, :, kk], lab[:, :, kk], prd[:, :, kk]
        else:
            img = image.array
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
        overlay(axes[0], img, lab, title=f"{case}: truth")
        overlay(axes[1], img, prd, title=f"{case}: prediction (mean Dice {np.mean(per_case[case]):.3f})")
        name = f"failure_{case}.png"
        save_figure(fig, run / name)
        files.append(name)
    return files


def _architecture(cfg: dict) -> str:
    enc = cfg["encoder_config"]
    if cfg["architecture"]["type"] == "tinyvit":
        return (f"U-Net on a TinyViT feature pyramid (stages {'/'.join(map(str, enc['embed_dims']))} wide, "
                f"{'/'.join(map(str, enc['depths']))} blocks)")
    if cfg["architecture"]["type"] == "cnn":
        return f"U-Net on a {enc['backbone']} encoder (MONAI FlexibleUNet), trained from scratch"
    return (f"ViT-UNETR segmenter: {cfg['architecture']['type']} encoder {enc['width']} wide x {enc['depth']} blocks "
            f"(patch {enc['patch_size']})")


def write_model_card(run: str | os.PathLike, dataset: str | os.PathLike, cases: list[str], split: str = "Tr",
                     what: str = "validation cases (also used to pick the checkpoint: optimistic)") -> tuple[Path, list]:
    """Write the card; returns its path and the per case/label metric rows it reports."""
    import json

    run = Path(run)
    ds = NnUNetDataset.open(dataset)
    cfg = json.loads((run / "config.json").read_text())
    rows, preds = evaluate_cases(run, ds, cases, split)
    figures = _worst_overlays(run, rows, preds)
    lines = [f"# Model card: {run.name}", "",
             "## Model",
             _architecture(cfg) + f", from `{cfg['encoder']['source']}` ({cfg['encoder']['kind']}); "
             f"fine-tuning mode **{cfg['mode']}**" + (f" (LoRA rank {cfg['lora_rank']})" if cfg.get("lora_rank") else "")
             + f"; {cfg['training']['trainable_parameters']:,} of {cfg['training']['total_parameters']:,} parameters trained, "
             f"{cfg['training']['steps']} steps, {cfg['training']['seconds']:.0f} s.", "",
             "## Data",
             f"Dataset `{ds.root.name}` ({ds.info.get('description', '')}); modality {cfg.get('modality') or 'mixed'}; "
             f"slices of {cfg['image_size']} px along axis {cfg['axis']} after reorientation to RAS.",
             f"Label fraction {cfg['data']['label_fraction']:g}: trained on {len(cfg['data']['train_cases'])} case(s) "
             f"({', '.join(cfg['data']['train_cases'])}); validation cases {', '.join(cfg['data']['val_cases'])}.",
             "Held-out labels never trained on: " + (", ".join(cfg["data"]["heldout_labels_excluded"]) or "none") + ".", "",
             f"## Metrics on {len(cases)} {what}",
             "", "| label | Dice | IoU | HD95 (mm) | NSD (1 mm) |", "|---|---|---|---|---|"]
    for c, info in cfg["classes"].items():
        sel = [r for r in rows if r.label == int(info["label"])]
        cells = []
        for m in ("dice", "iou", "hd95", "nsd"):
            s = summarise([getattr(r, m) for r in sel])
            cells.append(f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]")
        lines.append(f"| {info['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean [95 % bootstrap CI] over cases; empty-mask convention as in `medfound evaluate`.", "",
              "## Intended use",
              "Research on the modality and anatomy above, at the resolution it was trained on. Not a medical "
              "device; not validated for clinical decisions. Check every output visually.", "",
              "## Known failure cases (worst cases by mean Dice)", ""]
    lines += [f"![{f}]({f})" for f in figures]
    path = run / "model_card.md"
    write_text(path, "\n".join(lines) + "\n")
    return path, rows

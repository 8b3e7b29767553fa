"""Label-efficiency and out-of-domain experiments: pretrained vs scratch (and LoRA vs full).

Test cases are fixed before anything trains — the dataset's ``imagesTs``/``labelsTs`` when it has
them, else a seed-independent share of the cases — and never enter training or model selection
(validation cases are drawn from the rest, per seed). Each (arm, label fraction, seed) fine-tunes one
model; its test Dice is the mean over test cases and trained labels, computed on the original grids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfound.data.nnunet import NnUNetDataset
from medfound.errors import InputError
from medfound.eval.metrics import case_metrics, summarise
from medfound.eval.model_card import write_model_card
from medfound.infer.predict import predict_image
from medfound.io.atomic import write_csv, write_text
from medfound.models.cnn_unet import CNN_ENCODERS
from medfound.models.segmenter import load_segmenter
from medfound.train.finetune import FinetuneConfig, run_finetune


@dataclass(frozen=True)
class Arm:
    name: str
    encoder: str
    mode: str
    lora_stages: tuple[int, ...] | None = None  # a TinyViT LoRA arm's adapted stages (None: the default)
    encoder_lr_scale: float | None = None  # a full arm's encoder rate / the decoder's (None: the default)


MODES = ("full", "linear", "lora")


def arms_for(encoder: str, modes: list[str], scratch: str | None = None,
             lora_stages: tuple[int, ...] | None = None, encoder_lr_scale: float | None = None) -> list[Arm]:
    """The arms of a label-efficiency experiment.

    One MAE run (``--encoder RUN``): ``pretrained-MODE`` for each mode, plus ``scratch-full`` (a fresh
    encoder of the same architecture). A list (``--encoder scratch,RUN,litemedsam``): one arm per entry
    and mode, named by the entry (``scratch-full``, ``RUNNAME-MODE``, ``litemedsam-MODE``); ``scratch``
    is a fresh encoder shaped like the first run of the list (vit-tiny without one) and trains fully;
    ``ENTRY=MODE[+MODE]`` sets an entry's own modes (``litemedsam=linear``).

    ``lora_stages`` are the stages a TinyViT's LoRA arms adapt (``litemedsam``, ``scratch:tinyvit``);
    other than the default (``LORA_STAGES``) they name the arm (``litemedsam-lora-stages-1-2-3``), so
    that its runs never mix with the default's in one output folder. So does an ``encoder_lr_scale``
    other than fine-tuning's default, on the arms that train fully (``scratch-unet-full-encoder-lr-1``).
    """
    arms = _arms(encoder, modes, scratch)
    if encoder_lr_scale is not None:
        if not encoder_lr_scale > 0:
            raise InputError(None, f"--encoder-lr-scale must be > 0, got {encoder_lr_scale}")
        if encoder_lr_scale != FinetuneConfig.encoder_lr_scale:
            arms = [Arm(f"{a.name}-encoder-lr-{encoder_lr_scale:g}", a.encoder, a.mode, a.lora_stages, encoder_lr_scale)
                    if a.mode == "full" else a for a in arms]
    if lora_stages:
        from medfound.models.tinyvit import TINYVIT_ENCODERS, TinyViTConfig, check_attention_stages
        from medfound.models.tinyvit_unet import LORA_STAGES

        tiny = [a for a in arms if a.mode == "lora" and a.encoder in TINYVIT_ENCODERS]
        if not tiny:
            raise InputError(None, "--lora-stages applies to TinyViT arms in lora mode "
                                   "(--encoder litemedsam=lora or scratch:tinyvit=lora)")
        stages = tuple(sorted(set(lora_stages)))
        check_attention_stages(stages, len(TinyViTConfig().depths))
        suffix = "" if stages == LORA_STAGES else "-stages-" + "-".join(map(str, stages))
        arms = [Arm(a.name + suffix, a.encoder, a.mode, stages) if a in tiny else a for a in arms]
    return arms


def _arms(encoder: str, modes: list[str], scratch: str | None) -> list[Arm]:
    """:func:`arms_for` before the encoder rate and the LoRA stages name any arm."""
    entries = [e.strip() for e in encoder.split(",") if e.strip()]
    if not entries:
        raise InputError(None, "--encoder is empty")
    if len(entries) == 1 and "=" not in entries[0] and not _named(entries[0]):
        scratch = scratch or f"scratch:{encoder}"
        arms = [Arm(f"pretrained-{mode}", encoder, mode) for mode in modes]
        return arms + ([Arm("scratch-full", scratch, "full")] if "full" in modes else [])
    runs = [e.partition("=")[0] for e in entries if not _named(e.partition("=")[0])]
    arms: list[Arm] = []
    for entry in entries:
        spec, _, own = entry.partition("=")
        entry_modes = own.split("+") if own else (["full"] if spec.startswith("scratch") else list(modes))
        bad = [m for m in entry_modes if m not in MODES]
        if bad:
            raise InputError(None, f"--encoder {entry!r}: modes are {', '.join(MODES)}, got {', '.join(bad)}")
        if spec in CNN_ENCODERS and entry_modes != ["full"]:
            raise InputError(None, f"--encoder {entry!r}: a CNN from scratch trains fully (drop '={own}')")
        if spec == "scratch":
            name, spec = "scratch", scratch or (f"scratch:{runs[0]}" if runs else "scratch:vit-tiny")
        elif spec.startswith("scratch:"):
            name = "scratch-" + Path(spec[len("scratch:"):]).name
        else:
            name = spec if spec == "litemedsam" else Path(spec).name
        arms += [Arm(f"{name}-{m}", spec, m) for m in entry_modes]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise InputError(None, f"--encoder {encoder!r} names an arm twice ({', '.join(names)})")
    return arms


def _named(spec: str) -> bool:
    """An encoder given by name rather than by an MAE run folder."""
    return spec == "litemedsam" or spec.startswith("scratch") or spec.startswith("sam:")


def test_split(ds: NnUNetDataset, test_fraction: float = 0.25) -> tuple[list[str], list[str], str]:
    """(cases available for training, test cases, split name). imagesTs with labels wins."""
    ts = [c for c in ds.cases("Ts") if ds.label_path(c, "Ts").exists()]
    if ts:
        return ds.cases(), ts, "Ts"
    cases = ds.cases()
    if len(cases) < 3:
        raise InputError(ds.root, f"need at least 3 labeled cases (test, validation, training); got {len(cases)}")
    order = list(np.random.default_rng(12345).permutation(cases))  # fixed, independent of --seeds
    n_test = min(len(cases) - 2, max(1, int(round(test_fraction * len(cases)))))
    return sorted(order[n_test:]), sorted(order[:n_test]), "Tr"


def dice_on(model_run: Path, ds: NnUNetDataset, cases: list[str], split: str,
            name_map: dict[str, int] | None = None) -> tuple[float, list]:
    """Mean Dice over ``cases`` and the model's classes (matched to ``ds`` labels by name)."""
    model, cfg = load_segmenter(model_run)
    ds_by_name = ds.labels
    rows = []
    for case in cases:
        image, truth = ds.read_case(case, split)
        pred = predict_image(model, cfg, image, batch_size=16)
        for c, info in cfg["classes"].items():
            target = ds_by_name.get(info["name"])
            if target is None:
                continue
            m = case_metrics(case, (pred == info["label"]).astype(np.int64), (truth.array == target).astype(np.int64),
                             truth.spacing, [1])[0]
            rows.append((case, info["name"], m.dice, m.hd95))
    if not rows:
        raise InputError(ds.root, "no label of the model is present in this dataset (labels match by name)")
    return float(np.mean([r[2] for r in rows])), rows


def label_efficiency(dataset: str | os.PathLike, encoder: str, fractions: list[float], seeds: int,
                     out: str | os.PathLike, modes: list[str] = ("full",), max_steps: int = 300,
                     ood_dataset: str | os.PathLike | None = None, base: FinetuneConfig | None = None,
                     scratch: str | None = None, log=print, lora_stages: tuple[int, ...] | None = None,
                     encoder_lr_scale: float | None = None) -> dict:
    out = Path(out)
    ds = NnUNetDataset.open(dataset)
    ood = NnUNetDataset.open(ood_dataset) if ood_dataset else None
    train_pool, test_cases, split = test_split(ds)
    arms = arms_for(encoder, list(modes), scratch, lora_stages, encoder_lr_scale)
    results: list[dict] = []
    summary: list[dict] = []
    meta = {"dataset": str(ds.root), "test_cases": test_cases, "test_split": split, "train_pool": train_pool,
            "ood_dataset": str(ood.root) if ood else None, "max_steps": max_steps, "seeds": seeds,
            "fractions": fractions}
    for frac in fractions:
        for seed in range(seeds):
            for arm in arms:
                run = out / "runs" / f"{arm.name}_f{frac:g}_s{seed}"
                cfg = FinetuneConfig(**{**(base.__dict__ if base else {}), "mode": arm.mode, "label_fraction": frac,
                                        "seed": seed, "max_steps": max_steps, "progress": False,
                                        "lora_stages": arm.lora_stages,
                                        **({"encoder_lr_scale": arm.encoder_lr_scale} if arm.encoder_lr_scale else {})})
                log(f"[experiment] {arm.name} fraction {frac:g} seed {seed} ...")
                c = run_finetune(ds.root, run, arm.encoder, cfg, cases=train_pool)
                _, rows = write_model_card(run, ds.root, test_cases, split, what="test cases (never trained or selected on)")
                dice = float(np.mean([r.dice for r in rows]))
                row = {"arm": arm.name, "encoder": arm.encoder, "mode": arm.mode, "fraction": frac, "seed": seed,
                       "labeled_cases": len(c["data"]["train_cases"]), "val_dice": c["training"]["best_val_dice"],
                       "test_dice": dice, "seconds": c["training"]["seconds"],
                       "trainable_parameters": c["training"]["trainable_parameters"],
                       "lora_stages": "-".join(map(str, c.get("lora_stages") or ())),
                       "encoder_lr_scale": cfg.encoder_lr_scale if arm.mode == "full" else ""}
                if ood is not None:
                    row["ood_dice"], _ = dice_on(run, ood, ood.cases(), "Tr")
                results.append(row)
                log(f"[experiment]   test Dice {dice:.3f}")
                # Written after every run: an interrupted experiment keeps what it finished.
                summary = _summary(results, ood is not None)
                _write(out, results, summary, meta)
    return summary


def _summary(results: list[dict], with_ood: bool) -> list[dict]:
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in results):
        for frac in dict.fromkeys(r["fraction"] for r in results):
            sel = [r for r in results if r["arm"] == arm and r["fraction"] == frac]
            if not sel:  # not run yet (the summary is rewritten after every run)
                continue
            s = summarise([r["test_dice"] for r in sel])
            row = {"arm": arm, "fraction": frac, "labeled_cases": sel[0]["labeled_cases"], "seeds": len(sel),
                   "test_dice_mean": s["mean"], "test_dice_std": float(np.std([r["test_dice"] for r in sel])),
                   "ci_low": s["ci_low"], "ci_high": s["ci_high"]}
            if with_ood:
                o = summarise([r["ood_dice"] for r in sel])
                row |= {"ood_dice_mean": o["mean"], "ood_ci_low": o["ci_low"], "ood_ci_high": o["ci_high"]}
            rows.append(row)
    return rows


def _write(out: Path, results: list[dict], summary: list[dict], meta: dict) -> None:
    import matplotlib.pyplot as plt

    from medfound.io.figures import save_figure

    write_csv(out / "results.csv", results)
    write_csv(out / "summary.csv", summary)
    write_text(out / "experiment.json", json.dumps({**meta, "summary": summary}, indent=2))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm in dict.fromkeys(r["arm"] for r in summary):
        sel = [r for r in summary if r["arm"] == arm]
        x = [r["fraction"] for r in sel]
        y = np.array([r["test_dice_mean"] for r in sel])
        err = np.array([[r["test_dice_mean"] - r["ci_low"], r["ci_high"] - r["test_dice_mean"]] for r in sel]).T
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("label fraction (of training cases)")
    ax.set_ylabel("test Dice (mean, 95% CI over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "label_efficiency.png")

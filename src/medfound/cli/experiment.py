"""`medfound experiment ...`: label efficiency, support size, example sets as prompts, same-study completion."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.cli.common import (
    FlipOpt,
    PrecisionOpt,
    PriorOpt,
    RefineOpt,
    RegisterOpt,
    SmoothOpt,
    _ints,
    _lora_stages,
    experiment_app,
    refiner_choice,
)
from medfound.errors import InputError


@experiment_app.command("label-efficiency")
def experiment_label_efficiency(
    dataset: Annotated[Path, typer.Option("--dataset", help="nnU-Net dataset (imagesTs/labelsTs are the test set if present).")],
    encoder: Annotated[str, typer.Option("--encoder", help="An MAE run (arms pretrained-MODE and scratch-full), or a comma-separated list of arms: scratch, RUN, litemedsam, scratch:tinyvit, scratch:unet (a ResNet-18 U-Net, the CNN floor); ENTRY=MODE sets an entry's mode (litemedsam=linear).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder: results.csv, summary.csv, label_efficiency.png, runs/.")],
    fractions: Annotated[str, typer.Option(help="Comma-separated label fractions.")] = "0.05,0.1,0.25,0.5,1",
    seeds: Annotated[int, typer.Option(help="Seeds per fraction and arm.")] = 3,
    modes: Annotated[str, typer.Option(help="Modes of the pretrained arms: comma-separated of full, linear, lora (scratch trains fully).")] = "full",
    max_steps: Annotated[int, typer.Option(help="Fine-tuning steps per run.")] = 300,
    ood_dataset: Annotated[Optional[Path], typer.Option("--ood-dataset", help="Second dataset for an out-of-domain table (labels matched by name).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Slice size (default: the encoder's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Decoder learning rate.")] = 1e-3,
    precision: PrecisionOpt = "auto",
    lora_stages: Annotated[Optional[str], typer.Option(help="The stages a TinyViT's LoRA arms adapt (litemedsam=lora), comma-separated, each 1-3 (default 2,3); other stages name the arm (litemedsam-lora-stages-1-2-3).")] = None,
    encoder_lr_scale: Annotated[Optional[float], typer.Option(help="Encoder lr = --lr x this in the arms that train fully (default 0.3, as finetune); another value names those arms (scratch-unet-full-encoder-lr-1).")] = None,
) -> None:
    """Dice vs label fraction, pretrained vs scratch (and LoRA vs full), with seeds and CIs."""
    from medfound.eval.experiments import arms_for, label_efficiency
    from medfound.train.checkpoint import lightning_precision
    from medfound.train.finetune import FinetuneConfig

    try:
        fr = [float(f) for f in fractions.split(",")]
    except ValueError:
        raise InputError(None, f"--fractions must be numbers, got {fractions!r}") from None
    if not fr or any(not 0 < f <= 1 for f in fr) or seeds < 1 or max_steps < 1:
        raise InputError(None, "--fractions in (0, 1], --seeds and --max-steps >= 1")
    mode_list = [m.strip() for m in modes.split(",")]
    if any(m not in ("full", "linear", "lora") for m in mode_list):
        raise InputError(None, f"--modes takes full, linear, lora; got {modes!r}")
    stages = _lora_stages(lora_stages)
    arms_for(encoder, mode_list, lora_stages=stages, encoder_lr_scale=encoder_lr_scale)  # bad lists fail before anything trains
    lightning_precision(precision)  # a bad --precision fails before anything trains
    base = FinetuneConfig(image_size=image_size, batch_size=batch_size, lr=lr, precision=precision)
    summary = label_efficiency(dataset, encoder, fr, seeds, out, mode_list, max_steps, ood_dataset, base,
                               lora_stages=stages, encoder_lr_scale=encoder_lr_scale)
    for r in summary:
        extra = f"  OOD {r['ood_dice_mean']:.3f}" if "ood_dice_mean" in r else ""
        print(f"{r['arm']:18s} fraction {r['fraction']:<5g} ({r['labeled_cases']} cases): Dice "
              f"{r['test_dice_mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] over {r['seeds']} seed(s){extra}")
    print(f"{out / 'summary.csv'}, {out / 'label_efficiency.png'}")




@experiment_app.command("support-size")
def experiment_support_size(
    support: Annotated[Path, typer.Option("--support", help="nnU-Net dataset the support slices come from.")],
    test: Annotated[Path, typer.Option("--test", help="nnU-Net dataset of query volumes with their labels.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder: results.csv, summary.csv, summary.json, support_size.png.")],
    sizes: Annotated[str, typer.Option(help="Support sizes (comma-separated).")] = "1,2,4,8,16,32",
    seeds: Annotated[int, typer.Option(help="Random support subsets per size and structure.")] = 3,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="In-context run (default: the shipped model).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated of incontext, label-fusion, registered-label-fusion, finetune.")] = "incontext,label-fusion,registered-label-fusion,finetune",
    finetune_steps: Annotated[int, typer.Option(help="Steps of the fine-tuning baseline per support set.")] = 150,
    finetune_sizes: Annotated[Optional[str], typer.Option(help="Sizes at which to run the (slow) fine-tuning baseline (default: all).")] = None,
    structure: Annotated[Optional[list[str]], typer.Option("--label", help="Support label name to evaluate; repeat (default: the held-out structures found in both).")] = None,
    axis: Annotated[int, typer.Option(help="Slice axis (RAS).")] = 2,
    also_largest: Annotated[bool, typer.Option(help="Also score in-context with only the largest connected piece kept (method incontext+largest).")] = False,
    register: RegisterOpt = True,
    refine: RefineOpt = None,
    flip: FlipOpt = None,
    prior_weight: PriorOpt = None,
    through_plane_sigma: SmoothOpt = None,
) -> None:
    """Dice vs support size: in-context vs fine-tuning on the support vs label fusion, with seeds and CIs."""
    from medfound.eval.support_size import support_size_experiment

    if seeds < 1 or finetune_steps < 1:
        raise InputError(None, "--seeds and --finetune-steps must be positive")
    res = support_size_experiment(support, test, _ints(sizes, "--sizes"), out, seeds, model,
                                  tuple(m.strip() for m in methods.split(",") if m.strip()), finetune_steps,
                                  _ints(finetune_sizes, "--finetune-sizes") if finetune_sizes else None, structure, axis,
                                  progress=sys.stderr.isatty(), also_largest=also_largest, register=register,
                                  refine="model" if refine is None else refine, flip="model" if flip is None else flip,
                                  prior_weight="model" if prior_weight is None else prior_weight,
                                  through_plane_sigma="model" if through_plane_sigma is None else through_plane_sigma)
    for r in res["by_size"]:
        print(f"{r['method']:17s} {r['size']:3d} supports: Dice {r['dice_mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
              f"({r['runs']} runs, {r['seconds_mean']:.1f} s each)")
    print(f"{out / 'summary.json'}, {out / 'support_size.png'}")


@experiment_app.command("support-prompts")
def experiment_support_prompts(
    support: Annotated[Path, typer.Option("--support", help="nnU-Net dataset with masks: the boxes are drawn from them.")],
    test: Annotated[Path, typer.Option("--test", help="nnU-Net dataset of query volumes with their labels.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder: prompts.json, results.csv, sam_masks.csv, summary.json, both sets' masks.")],
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Support label name; repeat (default: the held-out structures found in both).")] = None,
    sam_model: Annotated[Optional[str], typer.Option("--sam-model", help="SAM that draws the masks (as sam segment --model; default: the shipped small SAM).")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="In-context run (default: the shipped model).")] = None,
    support_size: Annotated[int, typer.Option(help="Support slices per label.")] = 16,
    jitter: Annotated[int, typer.Option(help="Each side of a box moved by up to this many pixels.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the box jitter.")] = 0,
) -> None:
    """In-context segmentation from an example set given as boxes (a SAM draws the masks) vs the same set's masks."""
    from medfound.eval.prompted_supports import support_prompts_experiment

    if support_size < 1 or jitter < 0:
        raise InputError(None, "--support-size must be positive and --jitter not negative")
    res = support_prompts_experiment(support, test, out, label, sam_model, model, support_size, jitter, seed,
                                     progress=sys.stderr.isatty())
    s = res["summary"]
    for key in ("mask_defined", "prompt_defined", "prompt_minus_mask", "sam_mask_dice_on_support_slices"):
        print(f"{key:32s} {s[key]['mean']:+.3f} [{s[key]['ci_low']:+.3f}, {s[key]['ci_high']:+.3f}] (n {s[key]['n']})")
    print(out / "summary.json")


@experiment_app.command("same-study")
def experiment_same_study(
    dataset: Annotated[list[Path], typer.Option("--dataset", help="nnU-Net dataset whose first labelled volume is the study; repeat.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder: results.csv, summary.csv, summary.json, same_study.png.")],
    labelled: Annotated[str, typer.Option("--labelled", help="Labelled slices per structure (comma-separated).")] = "2,4,8,16",
    seeds: Annotated[int, typer.Option(help="Placements of the labelled slices per structure and count (seed 0: centred).")] = 3,
    structures: Annotated[str, typer.Option(help="held-out, trained or all (held-out structures follow DESIGN.md's rule).")] = "all",
    per_group: Annotated[int, typer.Option(help="At most this many structures of each group per dataset, spread over its labels (0: all).")] = 12,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Structure name to test; repeat (default: --structures).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated of completion (segment --partial-labels), interpolation (its outlines before the refiner), nearest-slice, contour-interpolation, incontext.")] = "completion,nearest-slice,contour-interpolation",
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="In-context run for incontext and --model-share (default: the shipped model).")] = None,
    model_share: Annotated[Optional[float], typer.Option("--model-share", help="The in-context model's share in completion (as segment --partial-labels).")] = None,
    axis: Annotated[int, typer.Option(help="Slice axis (RAS).")] = 2,
    taper: Annotated[Optional[float], typer.Option(help="Completion: mean gaps beyond the outermost labelled slice over which the outline shrinks away (default: shipped).")] = None,
    refiner: Annotated[Optional[str], typer.Option("--refiner", help="Completion's refiner (as segment --refiner: a train-completion run, or 'none'; default: the shipped one).")] = None,
) -> None:
    """Same-study completion: a few labelled slices of a volume, the rest segmented, against copying the nearest labelled slice and contour interpolation."""
    from medfound.eval.same_study import same_study_experiment

    refiner_run, refine = refiner_choice(refiner)

    groups = {"all": ("held-out", "trained"), "held-out": ("held-out",), "trained": ("trained",)}.get(structures)
    if groups is None:
        raise InputError(None, f"--structures takes held-out, trained or all; got {structures!r}")
    if axis not in (0, 1, 2):
        raise InputError(None, "--axis must be 0, 1 or 2")
    for d in dataset:
        if not d.is_dir():
            raise InputError(d, "no such dataset folder")
    res = same_study_experiment(dataset, out, _ints(labelled, "--labelled"), seeds, groups, label, per_group or None,
                                tuple(m.strip() for m in methods.split(",") if m.strip()), model, model_share, axis,
                                taper, progress=sys.stderr.isatty(), refiner_run=refiner_run, refine=refine)
    for r in res["by_count"]:
        print(f"{r['group']:8s} {r['method']:22s} {r['labelled']:3d} labelled: Dice {r['dice_mean']:.3f} "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({r['runs']} runs)")
    for r in res["paired"]:
        print(f"{r['group']:8s} completion - {r['baseline']:22s} {r['labelled']:3d}: {r['difference']:+.3f} "
              f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], wins {r['wins']}/{r['pairs']}")
    print(f"{out / 'summary.json'}, {out / 'same_study.png'}")


@experiment_app.command("cross-subject-2d")
def experiment_cross_subject_2d(
    support: Annotated[Path, typer.Option("--support", help="nnU-Net dataset whose first volume gives the example slices (written as PNG).")],
    test: Annotated[Path, typer.Option("--test", help="nnU-Net dataset whose first volume gives the queries (2D, new field of view and scale).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder: results.csv, summary.csv, summary.json, cross_subject_2d.png, examples/, queries/.")],
    sizes: Annotated[str, typer.Option(help="Example slices per structure (comma-separated).")] = "1,2,4,8,16,32",
    seeds: Annotated[int, typer.Option(help="Draws of examples and query crops per size (seed 0: examples spread evenly).")] = 3,
    queries: Annotated[int, typer.Option(help="Query slices per structure, spread over its extent.")] = 6,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Structure name; repeat (default: the held-out structures found in both).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated of incontext, label-fusion, mean-mask, incontext-registered, registered-label-fusion (examples registered onto each query first, 2D affine), incontext-deformable, deformable-label-fusion (affine refined by a deformation).")] = "incontext,label-fusion,mean-mask",
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="In-context run (default: the shipped model).")] = None,
) -> None:
    """2D cross-subject: example slices of one brain as PNG, queries from another brain cropped and rescaled, no geometry."""
    from medfound.eval.cross_subject_2d import cross_subject_2d_experiment

    res = cross_subject_2d_experiment(support, test, out, _ints(sizes, "--sizes"), seeds, queries, label,
                                      tuple(m.strip() for m in methods.split(",") if m.strip()), model,
                                      progress=sys.stderr.isatty())
    for r in res["by_size"]:
        print(f"{r['method']:13s} {r['size']:3d} examples: 2D Dice {r['dice_mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
              f"({r['runs']} queries, {r['seconds_mean']:.2f} s each)")
    print(f"{out / 'summary.json'}, {out / 'cross_subject_2d.png'}")


@experiment_app.command("query-box")
def experiment_query_box(
    dataset: Annotated[Path, typer.Option("--dataset", help="nnU-Net dataset; each case is the query once, the others its examples (e.g. the lesion cases).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder: results.csv, summary.json.")],
    label: Annotated[Optional[str], typer.Option("--label", help="Label name or value (default: the first).")] = None,
    support_size: Annotated[int, typer.Option(help="Example slices.")] = 16,
    jitter: Annotated[int, typer.Option(help="Each side of the query box moved by up to this many pixels.")] = 2,
    seeds: Annotated[int, typer.Option(help="Box jitters per case.")] = 1,
    methods: Annotated[str, typer.Option(help="Comma-separated of incontext, incontext-box, sam-box.")] = "incontext,incontext-box,sam-box",
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="In-context run (default: the shipped model).")] = None,
    sam_model: Annotated[Optional[str], typer.Option("--sam-model", help="SAM for sam-box (as sam segment --model; default: the shipped small SAM).")] = None,
    extent: Annotated[str, typer.Option(help="How far incontext-box reaches from the boxed slice: reach (as far as the box is wide), propagate (until the answer shrinks), both.")] = "both",
) -> None:
    """Targets that move between patients, leave-one-out: in-context alone, in-context with a query box, a SAM with the same box."""
    from medfound.eval.query_box import query_box_experiment

    if support_size < 1 or jitter < 0 or seeds < 1:
        raise InputError(None, "--support-size and --seeds must be positive, --jitter not negative")
    if extent not in ("reach", "propagate", "both"):
        raise InputError(None, f"--extent takes reach, propagate or both; got {extent!r}")
    res = query_box_experiment(dataset, out, label, support_size, jitter, seeds,
                               tuple(m.strip() for m in methods.split(",") if m.strip()), model, sam_model,
                               extent, progress=sys.stderr.isatty())
    for r in res["by_method"]:
        print(f"{r['method']:14s} 3D Dice {r['dice_3d']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}], on the boxed slice "
              f"{r['dice_slice']:.3f} ({r['runs']} runs, {r['seconds_mean']:.1f} s each)")
    print(out / "summary.json")

"""`medfound sam ...`: finetune (LoRA), train (the small SAM), segment (prompts), evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.cli.common import (
    AcceleratorOpt,
    BankOpt,
    CheckpointEveryOpt,
    DeviceOpt,
    DevicesOpt,
    DicomSegOpt,
    ExcludeDatasetOpt,
    ExcludeLabelOpt,
    LrOpt,
    MaxMinutesOpt,
    NumNodesOpt,
    PrecisionOpt,
    PushOpt,
    ResumeOpt,
    RtstructOpt,
    SamFlipOpt,
    SamPrecisionOpt,
    StepSeedOpt,
    StrategyOpt,
    WarmupOpt,
    _lora_stages,
    _step_training,
    device_count,
    sam_app,
)
from medfound.errors import InputError


@sam_app.command("finetune")
def sam_finetune(
    dataset: Annotated[list[Path], typer.Option("--dataset", help="nnU-Net v2 raw dataset folder; repeat to train on several (every case of each trains then).")],
    base: Annotated[str, typer.Option("--base", help="litemedsam (the real medical SAM installed by `make install`), an official SAM / MedSAM .pth, or a variant (vit_b, vit_l, vit_h, tiny) for random weights.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: adapters.safetensors, config.json, checkpoints/.")],
    rank: Annotated[int, typer.Option(help="LoRA rank on the image encoder's attention; 0 adapts the mask decoder alone on the frozen encoder (each slice embedded once).")] = 4,
    lora_targets: Annotated[str, typer.Option(help="q,v (query and value of the fused qkv, as SAMed) or module names: qkv,proj.")] = "q,v",
    lora_stages: Annotated[Optional[str], typer.Option(help="LiteMedSAM only: adapt the attention of these TinyViT stages (comma-separated, each 1-3, e.g. 2,3; default all); the stages before them stay frozen and are computed once per slice.")] = None,
    image_size: Annotated[int, typer.Option(help="Input size (1024 as released; 256/512 for speed).")] = 256,
    prompt: Annotated[str, typer.Option(help="Simulated prompts: box, point or both.")] = "both",
    train_prompt_encoder: Annotated[bool, typer.Option(help="Train the prompt encoder too.")] = False,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Slices per device per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    precision: PrecisionOpt = "32",
    accelerator: AcceleratorOpt = "auto",
    devices: DevicesOpt = "1",
    num_nodes: NumNodesOpt = 1,
    strategy: StrategyOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    max_minutes: MaxMinutesOpt = None,
    exclude_label: ExcludeLabelOpt = None,
    init: Annotated[Optional[str], typer.Option(help="Start from this SAM LoRA run on the same base (or litemedsam-adapted, litemedsam-lora): its decoder and adapters, then train on.")] = None,
    box_zoom: Annotated[Optional[float], typer.Option(help="Train (and answer) box prompts on the box's neighbourhood, this many times its larger side (at least a quarter of the slice).")] = None,
    box_size: Annotated[Optional[int], typer.Option(help="Input side of that crop (default --image-size; LiteMedSAM runs at any multiple of 16, 128 costs a quarter of 256).")] = None,
) -> None:
    """Adapt SAM to a dataset (or several) with LoRA on its image encoder and prompts simulated from the labels."""
    from medfound.train.sam_finetune import SamFinetuneConfig, run_sam_finetune

    if rank < 0 or max_steps < 1 or batch_size < 1:
        raise InputError(None, "--rank must be >= 0, --max-steps and --batch-size positive")
    dev = device_count(devices)
    cfg = run_sam_finetune(dataset[0] if len(dataset) == 1 else dataset, base, out, SamFinetuneConfig(
        exclude_labels=tuple(exclude_label or ()), max_minutes=max_minutes, init=init, box_zoom=box_zoom, box_size=box_size,
        rank=rank, targets=tuple(t.strip() for t in lora_targets.split(",")), lora_stages=_lora_stages(lora_stages) or (),
        image_size=image_size, prompt=prompt, train_prompt_encoder=train_prompt_encoder,
        max_steps=max_steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, precision=precision,
        accelerator=accelerator, devices=dev, num_nodes=num_nodes, strategy=strategy, seed=seed), resume=resume)
    if cfg:
        size = (out / "adapters.safetensors").stat().st_size / 2**20
        print(f"{out}: {cfg['training']['steps']} steps; adapters {size:.2f} MiB "
              f"({cfg['training']['trainable_parameters']:,} trained of {cfg['training']['total_parameters']:,})")




@sam_app.command("train")
def sam_train(
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: checkpoints/, logs/, previews/, model.safetensors, config.json.")],
    datasets: Annotated[Optional[list[Path]], typer.Option("--datasets", help="nnU-Net datasets whose labels are the training structures; repeat.")] = None,
    bank: BankOpt = None,
    steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Prompted structures per device per step.")] = 32,
    image_size: Annotated[int, typer.Option(help="Input size (multiple of 32; the bank's size with --bank).")] = 128,
    synthetic_fraction: Annotated[float, typer.Option(help="Share of samples that are synthetic shapes.")] = 0.2,
    point_fraction: Annotated[float, typer.Option(help="Share of samples prompted with points instead of a box.")] = 0.3,
    zoom_fraction: Annotated[float, typer.Option(help="Share of samples cropped around their structure.")] = 0.5,
    exclude_label: ExcludeLabelOpt = None,
    exclude_dataset: ExcludeDatasetOpt = None,
    lr: LrOpt = 2e-3,
    warmup_steps: WarmupOpt = 100,
    max_minutes: MaxMinutesOpt = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from this conv SAM run's weights.")] = None,
    precision: PrecisionOpt = "32",
    accelerator: AcceleratorOpt = "auto",
    devices: DevicesOpt = "auto",
    num_nodes: NumNodesOpt = 1,
    strategy: StrategyOpt = "auto",
    checkpoint_every: CheckpointEveryOpt = 200,
    seed: StepSeedOpt = 0,
    resume: ResumeOpt = False,
) -> None:
    """Train a small promptable SAM (conv encoder, SAM's prompt encoder and mask decoder) from scratch
    on every non-held-out structure of the datasets, with simulated boxes, points and corrections."""
    from medfound.train.sam_train import SamTrainConfig, run_sam_train

    _step_training(SamTrainConfig, run_sam_train, "structures", out=out, datasets=datasets, bank=bank,
                   exclude_label=exclude_label, exclude_dataset=exclude_dataset, steps=steps, batch_size=batch_size,
                   lr=lr, warmup_steps=warmup_steps, max_minutes=max_minutes, init=init, precision=precision,
                   accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                   checkpoint_every=checkpoint_every, seed=seed, resume=resume, image_size=image_size,
                   synthetic_fraction=synthetic_fraction, p_point=point_fraction, p_zoom=zoom_fraction)


def _xy(text: str, n: int, what: str) -> list[float]:
    try:
        v = [float(t) for t in text.split(",")]
    except ValueError:
        v = []
    if len(v) != n:
        raise InputError(None, f"{what} takes {n} comma-separated numbers, got {text!r}")
    return v


@sam_app.command("segment")
def sam_segment(
    input: Annotated[Path, typer.Option("--input", "-i", help="Image file, DICOM series folder, or DICOMweb series (dicomweb+http://HOST:PORT/dicom-web/studies/UID/series/UID).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the mask (CASE.nii.gz in the input's geometry).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="litemedsam, litemedsam-adapted (its mask decoder adapted by medfound), litemedsam-lora (that decoder with LoRA on TinyViT stages 2-3), a SAM run folder (`sam train` / `sam finetune`), an official .pth, or a variant name (default: the small SAM shipped with medfound).")] = None,
    box: Annotated[Optional[list[str]], typer.Option(help="x0,y0,x1,y1 in the slice's voxel indices (x along the first array axis i, y along the second j; the viewer's convention too). Repeat for a structure in several pieces (both kidneys): each box is answered alone and the masks are united.")] = None,
    point: Annotated[Optional[list[str]], typer.Option(help="x,y,label (1 inside, 0 outside); repeatable.")] = None,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="Slice index along --axis, in the image's own voxel indices as 3D Slicer and ITK-SNAP number them (required for 3D inputs).")] = None,
    axis: Annotated[int, typer.Option(help="Slice axis of the stored array (3D inputs).")] = 2,
    propagate: Annotated[bool, typer.Option(help="Carry the box (each box) through neighbouring slices.")] = False,
    base: Annotated[Optional[str], typer.Option(help="Where the run's base checkpoint is now, if moved.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size for a plain checkpoint (default: its own).")] = None,
    dicom_seg: DicomSegOpt = False,
    rtstruct: RtstructOpt = False,
    push: PushOpt = False,
    device: DeviceOpt = "auto",
    precision: SamPrecisionOpt = None,
    flip: SamFlipOpt = None,
) -> None:
    """Segment one structure with a box and/or points on a slice (or through a volume)."""
    import numpy as np

    from medfound.device import inference_device
    from medfound.infer.sam_segment import SamSession
    from medfound.infer.summary import summarise
    from medfound.io import read_image
    from medfound.io.formats import case_name
    from medfound.models.sam import load_sam_model

    boxes = [_xy(b, 4, "--box") for b in (box or [])]
    pts = [_xy(p, 3, "--point") for p in (point or [])]
    if not boxes and not pts:
        raise InputError(None, "give --box and/or --point")
    if propagate and not boxes:
        raise InputError(None, "--propagate needs a --box")
    if len(boxes) > 1 and pts:
        raise InputError(None, "--point goes with one --box: with several boxes each piece is answered by its box alone")
    if axis not in (0, 1, 2):
        raise InputError(None, f"--axis must be 0, 1 or 2, got {axis}")
    from medfound.cli.common import check_push, push_results
    from medfound.io.dicomweb import is_dicomweb
    from medfound.io.outputs import check_output_dir
    from medfound.io.result_files import ResultFormats

    check_push(push, input)
    check_output_dir(output, [input, model, base])
    image = read_image(input)
    formats = ResultFormats(dicom_seg or push, rtstruct,
                            f"medfound sam segment ({Path(model).name if model else 'shipped small SAM'})")
    formats.check(image, input)
    if image.ndim == 3 and slice_index is None:
        raise InputError(input, f"a volume of {image.shape[axis]} slices along --axis {axis}: give --slice K, the slice the prompt is on")
    slice_index = slice_index or 0
    dev = inference_device(device)
    sam, cfg = load_sam_model(model, base, image_size)
    session = SamSession.for_model(sam.to(dev), cfg, image, axis=axis, precision=precision, flip=flip)
    vol = np.zeros(image.shape, bool)
    if propagate:
        from medfound.progress import Progress

        for n, b in enumerate(boxes, start=1):
            what = "propagating the box" + (f" ({n} of {len(boxes)})" if len(boxes) > 1 else "")
            with Progress(what, session.n_slices, enabled=True) as bar:
                vol |= session.propagate(slice_index, b, progress=lambda note: bar.advance(1, note))
    else:
        if pts:
            m2 = session.segment(slice_index, box=boxes[0] if boxes else None, points=[p[:2] for p in pts],
                                 labels=[int(p[2]) for p in pts])
        else:  # one structure in as many pieces as boxes: each answered alone, then united
            m2 = np.logical_or.reduce([session.segment(slice_index, box=b) for b in boxes])
        if image.ndim == 2:
            vol = m2
        else:
            idx = [slice(None)] * 3
            idx[axis] = slice_index
            vol[tuple(idx)] = m2
    if is_dicomweb(input):
        name = image.meta["dicomweb"].rsplit("/", 1)[-1]  # the SeriesInstanceUID
    else:
        name = input.name if input.is_dir() else case_name(input, strip_channel=True)
    ext = ".png" if image.format in ("png", "jpeg", "bmp") else ".nii.gz"
    mask = vol.astype(np.uint8)
    from medfound.io.outputs import final_paths, staged_dir

    with staged_dir(output) as stage:  # the mask and its DICOM objects appear together, or none
        written = formats.write(mask, image, stage, name, {1: "structure"}, extension=ext)
    path, *dicom_objects = final_paths(written, stage, output)
    on = int(np.any(vol, axis=tuple(d for d in range(vol.ndim) if d != axis)).sum()) if vol.ndim == 3 else int(vol.any())
    prompt = " + ".join(p for p, given in (("box" if len(boxes) < 2 else f"{len(boxes)} boxes", bool(boxes)),
                                            (f"{len(pts)} point(s)", bool(pts))) if given)
    summarise(name, mask, image, {1: "structure"},
              f"{Path(model).name if model else 'the shipped small SAM'} on {dev.type}, {prompt}"
              + (f" on slice {slice_index}" if image.ndim == 3 else "") + (", propagated" if propagate else ""),
              "the prompt found nothing: check the box is on this slice, in voxel indices")
    print(f"{path}: {int(vol.sum())} voxels on {on} slice(s)")
    for f in dicom_objects:
        print(f)
    if push:
        push_results(input, dicom_objects)


@sam_app.command("evaluate")
def sam_evaluate(
    dataset: Annotated[Path, typer.Option("--dataset", help="nnU-Net dataset; a LoRA run's validation cases (or imagesTs), else every case.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="CSV of Dice by prompt (per-structure rows beside it for a plain model).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="litemedsam, a SAM LoRA run (compared with its base), a `sam train` run, an official .pth (default: the shipped small SAM).")] = None,
    structures: Annotated[str, typer.Option(help="For a plain model: heldout (DESIGN.md's never-trained structures), trained (the others) or all labels.")] = "heldout",
    base: Annotated[Optional[str], typer.Option(help="Base checkpoint, if moved since fine-tuning.")] = None,
    seed: Annotated[int, typer.Option(help="Prompt sampling seed (same for both models).")] = 0,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Only these structures (names); repeat. Overrides --structures.")] = None,
    per_structure: Annotated[bool, typer.Option(help="Evaluate a LoRA run per structure like any SAM (instead of base vs adapted on its validation cases).")] = False,
    propagate: Annotated[bool, typer.Option("--propagate/--no-propagate", help="Also score a box propagated through the volume (the slowest prompt).")] = True,
    axis: Annotated[int, typer.Option(help="Slice plane of the RAS-oriented volumes a plain model is prompted on: 2 axial, 1 coronal, 0 sagittal.")] = 2,
    box_shift: Annotated[int, typer.Option(help="Each side of a simulated box is off the structure's own box by up to this many pixels, in or out (a hurried user's box: 5 or more).")] = 2,
    box_per_piece: Annotated[bool, typer.Option("--box-per-piece", help="Also score one box per connected piece of a structure on a slice, answered alone and united (as `sam segment --box B1 --box B2`), against their inscribed ellipses.")] = False,
    precision: SamPrecisionOpt = None,
    flip: SamFlipOpt = None,
) -> None:
    """Dice by prompt type. A LoRA run: un-adapted base vs adapted, same prompts (box, 1/3/5 points).
    Any other SAM: per structure through the interactive session - box, one click, box + corrective
    click, box propagated through the volume - against the box's inscribed ellipse."""
    from medfound.data.nnunet import NnUNetDataset
    from medfound.eval.sam_eval import compare, structure_prompt_dice, summarise_prompts
    from medfound.io.atomic import write_csv
    from medfound.models.sam import load_sam, load_sam_model

    if axis not in (0, 1, 2):
        raise InputError(None, f"--axis must be 0, 1 or 2, got {axis}")
    if box_shift < 0:
        raise InputError(None, f"--box-shift is a number of pixels, 0 or more; got {box_shift}")
    adapted, cfg = load_sam_model(model, base)
    overrides = {k: v for k, v in (("precision", precision), ("flip", flip)) if v is not None}
    cfg = {**cfg, "inference": {**cfg.get("inference", {}), **overrides}}
    ds = NnUNetDataset.open(dataset)
    if not cfg.get("adapted") or per_structure or label:
        if structures not in ("heldout", "trained", "all"):
            raise InputError(None, f"--structures must be heldout, trained or all, got {structures!r}")
        chosen = {n: v for n, v in ds.labels.items() if v and (structures == "all" or (n in ds.heldout) == (structures == "heldout"))}
        if label:
            unknown = [n for n in label if n not in ds.labels]
            if unknown:
                raise InputError(ds.root / "dataset.json", f"no label {unknown[0]!r} in this dataset")
            chosen = {n: ds.labels[n] for n in label}
        if not chosen:
            raise InputError(ds.root, f"no {structures} structures in this dataset")
        cases = [c for c in ds.cases("Ts") if ds.label_path(c, "Ts").exists()] or ds.cases()
        rows = structure_prompt_dice(adapted, cfg, ds, cases, {v: n for n, v in chosen.items()}, seed, propagate=propagate,
                                     per_piece=box_per_piece, axis=axis, box_shift=box_shift)
        if not rows:
            raise InputError(ds.root, "none of the chosen structures is present on any slice")
        summary = summarise_prompts(rows)
        write_csv(out.with_name(out.stem + "_structures.csv"), rows, "{:.4f}")
        write_csv(out, summary, "{:.4f}")
        for r in summary:
            print(f"{r['prompt']:36s} Dice {r['dice_mean']:.3f} (95 % CI {r['ci95_low']:.3f}-{r['ci95_high']:.3f}, n={r['n']})")
        print(out)
        return
    if box_per_piece or axis != 2 or box_shift != 2:
        raise InputError(None, "--box-per-piece, --axis and --box-shift score structures one by one: add --per-structure "
                               "for a LoRA run")
    cases = [c for c in ds.cases("Ts") if ds.label_path(c, "Ts").exists()] or cfg["data"]["val_cases"]
    base_model, _ = load_sam(base or cfg["base"]["base"], cfg["image_size"])
    rows = compare({"base": base_model.eval(), "lora": adapted}, ds, cases, cfg["image_size"], out, seed)
    for r in rows:
        print(f"{r['model']:5s} {r['prompt']:9s} Dice {r['dice_mean']:.3f} ± {r['dice_std']:.3f} (n={r['n']})")
    print(out)

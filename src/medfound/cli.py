"""``medfound``: one Typer app; each command is a thin call into the library.

Exit codes: 0 success; 2 bad input (one line on stderr naming the file and the problem); 1 a bug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.errors import InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Segmentation foundation models for medical images.")
data_app = typer.Typer(no_args_is_help=True, help="Read, inspect, ingest and materialise data.")
app.add_typer(data_app, name="data")
sam_app = typer.Typer(no_args_is_help=True, help="Segment Anything: LoRA fine-tuning, prompted segmentation, evaluation.")
app.add_typer(sam_app, name="sam")
classify_app = typer.Typer(no_args_is_help=True, help="Image classification heads on the same encoders.")
app.add_typer(classify_app, name="classify")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments: label efficiency, support size, out-of-domain.")
app.add_typer(experiment_app, name="experiment")
incontext_app = typer.Typer(no_args_is_help=True, help="In-context segmentation: many-task training of the example-set model.")
app.add_typer(incontext_app, name="incontext")


@data_app.command("inspect")
def data_inspect(
    path: Annotated[Path, typer.Argument(help="Image file (NIfTI, MGZ, NRRD, MHA, DICOM, PNG, JPEG, TIFF) or DICOM folder.")],
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID, when a DICOM folder holds several.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Modality to assume (ct, mr, pet, xray, us) if the file has none.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print what medfound reads from an image: shape, spacing, orientation, modality, range."""
    from medfound.io import read_image

    if path.is_dir() and series is None:
        from medfound.io.dicom import find_series

        found, _ = find_series([f for f in sorted(path.rglob("*")) if f.is_file()])
        if len(found) > 1:
            rows = [{"series_uid": s.uid, "modality": s.modality, "files": len(s.files), "description": s.description}
                    for s in found]
            if as_json:
                print(json.dumps({"path": str(path), "series": rows}, indent=1))
            else:
                print(f"{path}: {len(rows)} DICOM series (choose one with --series UID)")
                for r in rows:
                    print(f"  {r['series_uid']}  {r['modality']:3s} {r['files']:5d} files  {r['description']}")
            return
    image = read_image(path, modality=modality, series_uid=series)
    info = image.summary()
    if as_json:
        print(json.dumps(info, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path), show_header=False)
    for k, v in info.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    Console().print(table)


@data_app.command("ingest")
def data_ingest(
    sources: Annotated[list[str], typer.Argument(help="Pool folders or files; prefix with a modality to declare it: ct:/data/ct.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: manifest.json + shards/.")],
    modality: Annotated[Optional[list[str]], typer.Option(help="Modality per source, in order (or one for all).")] = None,
    size: Annotated[int, typer.Option(help="Square slice size in pixels.")] = 224,
    axis: Annotated[int, typer.Option(help="Slice axis of 3D volumes after reorientation to RAS (2 = axial).")] = 2,
    stride: Annotated[int, typer.Option(help="Keep every N-th slice.")] = 1,
    ct_window: Annotated[str, typer.Option(help="CT window preset: wide, soft_tissue, lung, bone, brain, ...")] = "wide",
    shard_size: Annotated[int, typer.Option(help="Slices per shard.")] = 5000,
    workers: Annotated[int, typer.Option(help="Reader processes.")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Scan unlabeled pools of mixed formats into a manifest and normalised 2D slice shards."""
    from medfound.data.ingest import IngestOptions, ingest
    from medfound.data.normalize import CT_WINDOWS
    from medfound.data.sources import Source
    from medfound.io.image import canonical_modality, is_known_modality

    parsed = [Source.parse(s) for s in sources]
    if modality:
        if len(modality) not in (1, len(parsed)):
            raise InputError(None, f"--modality given {len(modality)} times for {len(parsed)} sources; give one, or one per source")
        for m in modality:
            if not is_known_modality(m):
                raise InputError(None, f"unknown modality {m!r} (use ct, mr, pet, nm, xray, us)")
        mods = modality * len(parsed) if len(modality) == 1 else modality
        parsed = [Source(s.path, canonical_modality(m)) for s, m in zip(parsed, mods)]
    if ct_window not in CT_WINDOWS:
        raise InputError(None, f"unknown --ct-window {ct_window!r}; choose from {', '.join(CT_WINDOWS)}")
    if size < 16 or stride < 1 or axis not in (0, 1, 2) or shard_size < 1:
        raise InputError(None, "--size must be >= 16, --stride >= 1, --axis 0/1/2, --shard-size >= 1")
    manifest = ingest(parsed, out, IngestOptions(size=size, axis=axis, stride=stride, ct_window=ct_window,
                                                 shard_size=shard_size), workers=workers, overwrite=overwrite)
    print(f"{out}: {manifest['num_images']} images, {manifest['num_slices']} slices "
          f"({', '.join(f'{k} {v}' for k, v in manifest['slices_per_modality'].items())}) in "
          f"{len(manifest['shards'])} shard(s); {len(manifest['errors'])} file(s) skipped")


@data_app.command("samples")
def data_samples(
    out: Annotated[Path, typer.Option("--out", help="Folder for the sample datasets and pool.")],
    only: Annotated[Optional[str], typer.Option(help="Comma-separated parts: tissue,lesions,atlases,colin27,phantoms,pool.")] = None,
) -> None:
    """Materialise real sample images from installed packages as nnU-Net datasets and a DICOM pool."""
    from medfound.data.samples import PARTS, materialise_samples

    parts = tuple(p.strip() for p in only.split(",")) if only else PARTS
    made = materialise_samples(out, parts)
    for part, folders in made.items():
        print(f"{part}: {', '.join(folders) or '(skipped)'}")


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option("--out", help="nnU-Net dataset folder to write.")],
    modalities: Annotated[str, typer.Option(help="Comma-separated: CT,MR,PT,XR,US.")] = "CT,MR,PT,XR,US",
    cases: Annotated[int, typer.Option(help="Cases per modality.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write synthetic multi-structure phantoms as an nnU-Net dataset."""
    from medfound.data.phantoms import PHANTOM_MODALITIES, write_phantom_dataset
    from medfound.io.image import canonical_modality

    mods = tuple(canonical_modality(m) for m in modalities.split(","))
    bad = [m for m, c in zip(modalities.split(","), mods) if c not in PHANTOM_MODALITIES]
    if bad or cases < 1:
        raise InputError(None, f"phantom modalities are {', '.join(PHANTOM_MODALITIES)} and --cases >= 1 (got {', '.join(bad) or cases})")
    ds = write_phantom_dataset(out, mods, cases, seed)
    print(f"{out}: {len(ds.cases())} phantom cases")


@data_app.command("check")
def data_check(dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw dataset folder.")]) -> None:
    """Validate an nnU-Net dataset: every image readable, every label on its image's grid."""
    from medfound.data.nnunet import NnUNetDataset

    ds = NnUNetDataset.open(dataset)
    cases = ds.cases()
    if not cases:
        raise InputError(dataset / "imagesTr", f"no images named CASE_0000{ds.file_ending}")
    declared = ds.info.get("numTraining")
    if declared != len(cases):
        raise InputError(dataset / "dataset.json", f"numTraining is {declared!r} but imagesTr holds {len(cases)} case(s)")
    for split in ("Tr", "Ts"):
        folder = dataset / f"labels{split}"
        known = set(ds.cases(split))
        found = sorted(folder.glob(f"*{ds.file_ending}")) if folder.is_dir() else []
        orphans = [f.name for f in found if f.name[: -len(ds.file_ending)] not in known]
        if orphans:
            raise InputError(folder / orphans[0], f"label map without an image in images{split}/ "
                                                  f"({len(orphans)} such file(s))")
    for case in cases:
        ds.read_case(case)
    for case in ds.cases("Ts"):
        ds.read_case(case, "Ts")
    print(f"{dataset}: {len(cases)} training case(s), {len(ds.cases('Ts'))} test case(s), "
          f"{len(ds.labels) - 1} label(s), held out: {', '.join(ds.heldout) or 'none'}: OK")


@data_app.command("convert-msd")
def data_convert_msd(
    task: Annotated[Path, typer.Argument(help="Medical Segmentation Decathlon task folder (TaskXX_Name).")],
    out: Annotated[Path, typer.Option("--out", help="nnU-Net v2 raw dataset folder to write.")],
) -> None:
    """Convert a Decathlon task folder to an nnU-Net v2 raw dataset."""
    from medfound.data.nnunet import convert_msd

    ds = convert_msd(task, out)
    print(f"{out}: {len(ds.cases())} training case(s)")


@app.command("pretrain")
def pretrain(
    data: Annotated[list[str], typer.Option("--data", help="Ingested shard folder or raw image tree ([mod:]PATH); repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/, logs/, previews/, encoder.safetensors, config.json.")],
    model: Annotated[str, typer.Option(help="vit-tiny, vit-small, vit-base (vit-micro for tests).")] = "vit-tiny",
    image_size: Annotated[int, typer.Option(help="Training image size (multiple of 16, 96-1024).")] = 224,
    mask_ratio: Annotated[float, typer.Option(help="Fraction of patches masked.")] = 0.75,
    norm_pix_loss: Annotated[bool, typer.Option(help="Per-patch normalised targets.")] = True,
    decoder_depth: Annotated[int, typer.Option(help="MAE decoder blocks.")] = 4,
    decoder_width: Annotated[int, typer.Option(help="MAE decoder width.")] = 192,
    batch_size: Annotated[int, typer.Option(help="Images per device per step.")] = 32,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (one epoch = as many slices as the pool holds).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default 1.5e-4 x global batch / 256, batch floored at 512).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps (default 10% of training, at most 1000).")] = None,
    precision: Annotated[str, typer.Option(help="bf16 or 32.")] = "bf16",
    accelerator: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    devices: Annotated[str, typer.Option(help="Devices per node (number or auto).")] = "auto",
    num_nodes: Annotated[int, typer.Option(help="Nodes (torchrun or SLURM sets the rest).")] = 1,
    strategy: Annotated[str, typer.Option(help="auto, ddp, ddp_spawn, fsdp ...")] = "auto",
    num_workers: Annotated[int, typer.Option(help="Data-loader workers per device.")] = 2,
    modality_alpha: Annotated[float, typer.Option(help="Modality sampling weight = count**alpha (0 equal, 1 natural).")] = 0.5,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps.")] = 100,
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt.")] = False,
) -> None:
    """Self-supervised MAE pretraining of a ViT encoder on unlabeled images."""
    from medfound.train.pretrain import PretrainConfig, run_pretrain

    if batch_size < 1 or (max_steps is not None and max_steps < 1) or (epochs is not None and epochs < 1):
        raise InputError(None, "--batch-size, --max-steps and --epochs must be positive")
    dev = int(devices) if devices.isdigit() else devices
    cfg = PretrainConfig(model=model, image_size=image_size, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
                         decoder_depth=decoder_depth, decoder_width=decoder_width, batch_size=batch_size,
                         max_steps=max_steps, epochs=epochs, lr=lr, warmup_steps=warmup_steps, precision=precision,
                         accelerator=accelerator, devices=dev, num_nodes=num_nodes, strategy=strategy,
                         num_workers=num_workers, alpha=modality_alpha, checkpoint_every=checkpoint_every,
                         compile=compile, seed=seed)
    config = run_pretrain(data, out, cfg, resume=resume)
    if config:
        t = config["training"]
        print(f"{out}: {t['steps']} steps, final loss {t['final_loss']:.4f}; encoder -> {out / 'encoder.safetensors'}")


@app.command("finetune")
def finetune(
    dataset: Annotated[Path, typer.Option("--dataset", help="nnU-Net v2 raw dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: model.safetensors, config.json, checkpoints/, logs/.")],
    encoder: Annotated[str, typer.Option(help="An exported MAE run folder, or scratch (scratch:vit-small ...).")] = "scratch",
    mode: Annotated[str, typer.Option(help="full, linear (frozen encoder) or lora.")] = "full",
    rank: Annotated[int, typer.Option(help="LoRA rank (--mode lora).")] = 4,
    label_fraction: Annotated[float, typer.Option(help="Fraction of the non-validation cases whose labels are used.")] = 1.0,
    val_fraction: Annotated[float, typer.Option(help="Fraction of cases held back for validation (by case).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed (case split, initialisation, augmentation).")] = 0,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the decoder.")] = 1e-3,
    encoder_lr_scale: Annotated[float, typer.Option(help="Encoder lr = lr x this (--mode full).")] = 0.3,
    image_size: Annotated[Optional[int], typer.Option(help="Slice size (default: the encoder's pretraining size, else 224).")] = None,
    val_every: Annotated[int, typer.Option(help="Validate every N steps.")] = 100,
    precision: Annotated[str, typer.Option(help="bf16 or 32.")] = "bf16",
    accelerator: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    devices: Annotated[str, typer.Option(help="Devices per node.")] = "1",
    num_nodes: Annotated[int, typer.Option(help="Nodes.")] = 1,
    strategy: Annotated[str, typer.Option(help="auto, ddp ...")] = "auto",
) -> None:
    """Fine-tune a segmenter (ViT-UNETR) on labeled cases, from a pretrained encoder or from scratch."""
    from medfound.train.finetune import FinetuneConfig, run_finetune

    if max_steps < 1 or batch_size < 1 or rank < 1 or not 0 < val_fraction < 1:
        raise InputError(None, "--max-steps, --batch-size, --rank must be positive and --val-fraction in (0, 1)")
    dev = int(devices) if devices.isdigit() else devices
    cfg = FinetuneConfig(mode=mode, rank=rank, label_fraction=label_fraction, val_fraction=val_fraction, seed=seed,
                         max_steps=max_steps, batch_size=batch_size, lr=lr, encoder_lr_scale=encoder_lr_scale,
                         image_size=image_size, val_every=val_every, precision=precision, accelerator=accelerator,
                         devices=dev, num_nodes=num_nodes, strategy=strategy)
    config = run_finetune(dataset, out, encoder, cfg)
    from medfound.eval.model_card import write_model_card

    write_model_card(out, dataset, config["data"]["val_cases"])
    t = config["training"]
    print(f"{out}: {t['steps']} steps, best validation Dice {t['best_val_dice']:.3f} "
          f"({len(config['data']['train_cases'])} labeled case(s), {t['trainable_parameters']:,} trainable parameters)")


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Option("--model", help="Fine-tuned run folder (model.safetensors + config.json).")],
    input: Annotated[Path, typer.Option("--input", help="Image file, DICOM series folder, or folder of images.")],
    output: Annotated[Path, typer.Option("--output", help="Folder for the masks (CASE.nii.gz, in the input's geometry).")],
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 16,
    dicom_seg: Annotated[bool, typer.Option(help="Also write DICOM-SEG for DICOM inputs.")] = False,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (faster on CPUs with bf16 support and on GPUs).")] = False,
    modality: Annotated[Optional[str], typer.Option(help="Modality of inputs that do not record one (default: the model's).")] = None,
) -> None:
    """Segment 2D images and 3D volumes (slice by slice, in batches) with a fine-tuned model.

    Outputs appear whole or not at all: the masks are staged beside OUTPUT and moved in only when every
    input has succeeded. OUTPUT may not be, contain or lie inside an input."""
    from medfound.infer.predict import predict_path
    from medfound.io.image import is_known_modality

    if batch_size < 1:
        raise InputError(None, "--batch-size must be >= 1")
    if modality and not is_known_modality(modality):
        raise InputError(None, f"unknown modality {modality!r} (use ct, mr, pet, nm, xray, us)")
    for p in predict_path(model, input, output, batch_size, dicom_seg, bf16, modality=modality):
        print(p)


@app.command("evaluate")
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted label maps (CASE.nii.gz ...).")],
    truth: Annotated[Path, typer.Option("--truth", help="Folder of reference label maps (e.g. labelsTs).")],
    out: Annotated[Path, typer.Option("--out", help="CSV: case,label,dice,iou,hd95,nsd (summary JSON beside it).")],
    nsd_tolerance: Annotated[float, typer.Option("--nsd-tolerance", help="NSD tolerance in mm.")] = 1.0,
) -> None:
    """Dice, IoU, HD95 and NSD in mm per case and label (through MONAI), with means and 95 % CIs."""
    from medfound.eval.evaluate import evaluate_folders, format_summary

    import math

    from medfound.io.outputs import check_output_file

    if not math.isfinite(nsd_tolerance) or nsd_tolerance < 0:
        raise InputError(None, f"--nsd-tolerance must be a finite number of mm >= 0, got {nsd_tolerance}")
    for folder in (pred, truth):
        if not folder.is_dir():
            raise InputError(folder, "no such folder of label maps")
    check_output_file(out, [pred, truth])
    summary = evaluate_folders(pred, truth, out, nsd_tolerance)
    print(format_summary(summary))
    print(f"{out} ({summary['cases']} case(s)); summary: {out.with_name(out.stem + '_summary.json')}")


@sam_app.command("finetune")
def sam_finetune(
    dataset: Annotated[Path, typer.Option("--dataset", help="nnU-Net v2 raw dataset folder.")],
    base: Annotated[str, typer.Option("--base", help="litemedsam (the real medical SAM installed by `make install`), an official SAM / MedSAM .pth, or a variant (vit_b, vit_l, vit_h, tiny) for random weights.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: adapters.safetensors, config.json, checkpoints/.")],
    rank: Annotated[int, typer.Option(help="LoRA rank on the image encoder's attention.")] = 4,
    lora_targets: Annotated[str, typer.Option(help="q,v (query and value of the fused qkv, as SAMed) or module names: qkv,proj.")] = "q,v",
    image_size: Annotated[int, typer.Option(help="Input size (1024 as released; 256/512 for speed).")] = 256,
    prompt: Annotated[str, typer.Option(help="Simulated prompts: box, point or both.")] = "both",
    train_prompt_encoder: Annotated[bool, typer.Option(help="Train the prompt encoder too.")] = False,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    precision: Annotated[str, typer.Option(help="bf16 or 32.")] = "32",
    accelerator: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    devices: Annotated[str, typer.Option(help="Devices per node.")] = "1",
    num_nodes: Annotated[int, typer.Option(help="Nodes.")] = 1,
    strategy: Annotated[str, typer.Option(help="auto, ddp ...")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt.")] = False,
) -> None:
    """Adapt SAM to a dataset with LoRA on its image encoder and prompts simulated from the labels."""
    from medfound.train.sam_finetune import SamFinetuneConfig, run_sam_finetune

    if rank < 1 or max_steps < 1 or batch_size < 1:
        raise InputError(None, "--rank, --max-steps and --batch-size must be positive")
    dev = int(devices) if devices.isdigit() else devices
    cfg = run_sam_finetune(dataset, base, out, SamFinetuneConfig(
        rank=rank, targets=tuple(t.strip() for t in lora_targets.split(",")), image_size=image_size, prompt=prompt, train_prompt_encoder=train_prompt_encoder,
        max_steps=max_steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, precision=precision,
        accelerator=accelerator, devices=dev, num_nodes=num_nodes, strategy=strategy, seed=seed), resume=resume)
    if cfg:
        size = (out / "adapters.safetensors").stat().st_size / 2**20
        print(f"{out}: {cfg['training']['steps']} steps; adapters {size:.2f} MiB "
              f"({cfg['training']['trainable_parameters']:,} trained of {cfg['training']['total_parameters']:,})")


# In-context inference (`segment`, `experiment support-size`).
RegisterOpt = Annotated[bool, typer.Option(
    "--register/--no-register", help="Place 3D support slices at the query height they show by an affine registration of "
    "each support volume onto the query (else by relative position in each volume).")]
RefineOpt = Annotated[Optional[bool], typer.Option(
    "--refine/--no-refine", help="A second pass on a window around each structure at 2-3x the resolution "
    "(default: the model's setting; the shipped model refines).")]
FlipOpt = Annotated[Optional[bool], typer.Option(
    "--flip/--no-flip", help="Test-time augmentation: query and supports also mirrored, both averaged; twice the time "
    "(default: the model's setting).")]
PriorOpt = Annotated[Optional[float], typer.Option(
    "--prior-weight", help="3D: share of each voxel's probability given to the registration prior (the mask of the "
    "support registered nearest in height; 0 = the model alone, 1 = registered label fusion; default: the model's setting).")]
SmoothOpt = Annotated[Optional[float], typer.Option(
    "--through-plane-sigma", help="3D: Gaussian smoothing of the probabilities across slices, in pixels of the model's "
    "in-plane grid (0 = none; default: the model's setting, 1 for the shipped model).")]

# Options of the step-indexed many-task training commands (`incontext train`, `sam train`).
BankOpt = Annotated[Optional[Path], typer.Option(help="A slice bank from `medfound incontext bank` instead of --datasets (train where the image readers are not installed).")]
ExcludeLabelOpt = Annotated[Optional[list[str]], typer.Option("--exclude-label", help="Label name never trained on (held out); repeat. DESIGN.md's held-out structures are always excluded.")]
ExcludeDatasetOpt = Annotated[Optional[list[str]], typer.Option("--exclude-dataset", help="Dataset folder name never read (held out); repeat.")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")]
WarmupOpt = Annotated[int, typer.Option(help="Linear warm-up steps.")]
MaxMinutesOpt = Annotated[Optional[float], typer.Option(help="Stop and export after this wall time even if steps remain.")]
PrecisionOpt = Annotated[str, typer.Option(help="bf16 or 32.")]
AcceleratorOpt = Annotated[str, typer.Option(help="cpu, gpu or auto.")]
DevicesOpt = Annotated[str, typer.Option(help="Devices per node (number or auto).")]
NumNodesOpt = Annotated[int, typer.Option(help="Nodes (torchrun or SLURM sets the rest).")]
StrategyOpt = Annotated[str, typer.Option(help="auto, ddp, ddp_spawn ...")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Save a checkpoint every N steps.")]
StepSeedOpt = Annotated[int, typer.Option(help="Random seed (batches are a function of seed, rank and step).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt.")]


def _step_training(config_cls, run, what: str, *, out: Path, datasets, bank, exclude_label, exclude_dataset, steps: int,
                   batch_size: int, lr: float, warmup_steps: int, max_minutes, init, precision: str, accelerator: str,
                   devices: str, num_nodes: int, strategy: str, checkpoint_every: int, seed: int, resume: bool,
                   **specific) -> None:
    """Shared body of the step-indexed training commands: check, read the task data, build the
    config (``config_cls`` with the command's ``specific`` fields), train with ``run`` and report."""
    if steps < 1 or batch_size < 1:
        raise InputError(None, "--steps and --batch-size must be positive")
    chosen, prebuilt, skip = _task_data(datasets, bank, exclude_label, exclude_dataset)
    cfg = config_cls(batch_size=batch_size, max_steps=steps, lr=lr, warmup_steps=warmup_steps, max_minutes=max_minutes,
                     init=str(init) if init else None, precision=precision, accelerator=accelerator,
                     devices=int(devices) if devices.isdigit() else devices, num_nodes=num_nodes, strategy=strategy,
                     checkpoint_every=checkpoint_every, seed=seed, exclude_labels=tuple(exclude_label or ()),
                     progress=sys.stderr.isatty(), **specific)
    cfg.extra = {"command": "medfound " + " ".join(sys.argv[1:]), "excluded_datasets": sorted(skip)}
    config = run(chosen, out, cfg, resume=resume, bank=prebuilt)
    if config:
        t = config["training"]
        print(f"{out}: {t['steps']} steps in {t['seconds']} s, final loss {t['final_loss']:.4f}; "
              f"{config['data']['tasks']} {what} -> {out / 'model.safetensors'}")


def _task_data(datasets, bank, exclude_label, exclude_dataset):
    """(dataset folders to read, or a loaded slice bank, excluded dataset names) for the many-task
    training commands: exactly one of --datasets / --bank, exclusions applied to either."""
    if bool(datasets) == bool(bank):
        raise InputError(None, "give either --datasets or --bank")
    skip = set(exclude_dataset or [])
    chosen = [str(d) for d in (datasets or []) if d.name not in skip]
    if datasets and not chosen:
        raise InputError(None, "every --datasets folder is excluded")
    prebuilt = None
    if bank:
        from medfound.data.episodes import load_bank

        prebuilt = load_bank(bank, exclude_labels=tuple(exclude_label or ()), exclude_datasets=tuple(skip))
    return chosen, prebuilt, skip


@sam_app.command("train")
def sam_train(
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/, logs/, previews/, model.safetensors, config.json.")],
    datasets: Annotated[Optional[list[Path]], typer.Option("--datasets", help="nnU-Net datasets whose labels are the training structures; repeat.")] = None,
    bank: BankOpt = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 3000,
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
    input: Annotated[Path, typer.Option("--input", help="Image file or DICOM series folder.")],
    output: Annotated[Path, typer.Option("--output", help="Folder for the mask (CASE.nii.gz in the input's geometry).")],
    model: Annotated[Optional[str], typer.Option("--model", help="litemedsam, a SAM run folder (`sam train` / `sam finetune`), an official .pth, or a variant name (default: the small SAM shipped with medfound).")] = None,
    box: Annotated[Optional[str], typer.Option(help="x0,y0,x1,y1 in the slice's pixels (x = first array axis).")] = None,
    point: Annotated[Optional[list[str]], typer.Option(help="x,y,label (1 inside, 0 outside); repeatable.")] = None,
    slice_index: Annotated[int, typer.Option("--slice", help="Slice index along --axis (3D inputs).")] = 0,
    axis: Annotated[int, typer.Option(help="Slice axis of the stored array (3D inputs).")] = 2,
    propagate: Annotated[bool, typer.Option(help="Carry the box through neighbouring slices.")] = False,
    base: Annotated[Optional[str], typer.Option(help="Where the run's base checkpoint is now, if moved.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size for a plain checkpoint (default: its own).")] = None,
) -> None:
    """Segment one structure with a box and/or points on a slice (or through a volume)."""
    import numpy as np

    from medfound.infer.sam_segment import SamSession
    from medfound.io import read_image, write_mask
    from medfound.io.formats import case_name
    from medfound.models.sam import load_sam_model

    b = _xy(box, 4, "--box") if box else None
    pts = [_xy(p, 3, "--point") for p in (point or [])]
    if b is None and not pts:
        raise InputError(None, "give --box and/or --point")
    if propagate and b is None:
        raise InputError(None, "--propagate needs a --box")
    if axis not in (0, 1, 2):
        raise InputError(None, f"--axis must be 0, 1 or 2, got {axis}")
    from medfound.io.outputs import check_output_dir

    check_output_dir(output, [input, model, base])
    image = read_image(input)
    sam, cfg = load_sam_model(model, base, image_size)
    session = SamSession.for_model(sam, cfg, image, axis=axis)
    if propagate:
        vol = session.propagate(slice_index, b)
    else:
        m2 = session.segment(slice_index, box=b, points=[p[:2] for p in pts] or None, labels=[int(p[2]) for p in pts] or None)
        vol = np.zeros(image.shape, bool)
        if image.ndim == 2:
            vol = m2
        else:
            idx = [slice(None)] * 3
            idx[axis] = slice_index
            vol[tuple(idx)] = m2
    name = input.name if input.is_dir() else case_name(input, strip_channel=True)
    ext = ".png" if image.format in ("png", "jpeg", "bmp") else ".nii.gz"
    path = write_mask(vol.astype(np.uint8), image, output / f"{name}{ext}")
    print(f"{path}: {int(vol.sum())} voxels on {int(np.any(vol, axis=tuple(d for d in range(vol.ndim) if d != axis)).sum()) if vol.ndim == 3 else 1} slice(s)")


@sam_app.command("evaluate")
def sam_evaluate(
    dataset: Annotated[Path, typer.Option("--dataset", help="nnU-Net dataset; a LoRA run's validation cases (or imagesTs), else every case.")],
    out: Annotated[Path, typer.Option("--out", help="CSV of Dice by prompt (per-structure rows beside it for a plain model).")],
    model: Annotated[Optional[str], typer.Option("--model", help="litemedsam, a SAM LoRA run (compared with its base), a `sam train` run, an official .pth (default: the shipped small SAM).")] = None,
    structures: Annotated[str, typer.Option(help="For a plain model: heldout (DESIGN.md's never-trained structures), trained (the others) or all labels.")] = "heldout",
    base: Annotated[Optional[str], typer.Option(help="Base checkpoint, if moved since fine-tuning.")] = None,
    seed: Annotated[int, typer.Option(help="Prompt sampling seed (same for both models).")] = 0,
) -> None:
    """Dice by prompt type. A LoRA run: un-adapted base vs adapted, same prompts (box, 1/3/5 points).
    Any other SAM: per structure through the interactive session - box, one click, box + corrective
    click, box propagated through the volume - against the box's inscribed ellipse."""
    from medfound.data.nnunet import NnUNetDataset
    from medfound.eval.sam_eval import compare, structure_prompt_dice, summarise_prompts
    from medfound.io.atomic import write_csv
    from medfound.models.sam import load_sam, load_sam_model

    adapted, cfg = load_sam_model(model, base)
    ds = NnUNetDataset.open(dataset)
    if not cfg.get("adapted"):
        if structures not in ("heldout", "trained", "all"):
            raise InputError(None, f"--structures must be heldout, trained or all, got {structures!r}")
        chosen = {n: v for n, v in ds.labels.items() if v and (structures == "all" or (n in ds.heldout) == (structures == "heldout"))}
        if not chosen:
            raise InputError(ds.root, f"no {structures} structures in this dataset")
        cases = [c for c in ds.cases("Ts") if ds.label_path(c, "Ts").exists()] or ds.cases()
        rows = structure_prompt_dice(adapted, cfg, ds, cases, {v: n for n, v in chosen.items()}, seed)
        if not rows:
            raise InputError(ds.root, "none of the chosen structures is present on any slice")
        summary = summarise_prompts(rows)
        write_csv(out.with_name(out.stem + "_structures.csv"), rows, "{:.4f}")
        write_csv(out, summary, "{:.4f}")
        for r in summary:
            print(f"{r['prompt']:36s} Dice {r['dice_mean']:.3f} (95 % CI {r['ci95_low']:.3f}-{r['ci95_high']:.3f}, n={r['n']})")
        print(out)
        return
    cases = [c for c in ds.cases("Ts") if ds.label_path(c, "Ts").exists()] or cfg["data"]["val_cases"]
    base_model, _ = load_sam(base or cfg["base"]["base"], cfg["image_size"])
    rows = compare({"base": base_model.eval(), "lora": adapted}, ds, cases, cfg["image_size"], out, seed)
    for r in rows:
        print(f"{r['model']:5s} {r['prompt']:9s} Dice {r['dice_mean']:.3f} ± {r['dice_std']:.3f} (n={r['n']})")
    print(out)


@classify_app.command("train")
def classify_train(
    csv_path: Annotated[Path, typer.Option("--csv", help="CSV with columns image,label (paths relative to the CSV).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: model.safetensors + config.json.")],
    encoder: Annotated[str, typer.Option(help="Exported MAE run, or scratch.")] = "scratch",
    mode: Annotated[str, typer.Option(help="linear (probe, frozen encoder) or full.")] = "linear",
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out for validation.")] = 0.2,
    image_size: Annotated[Optional[int], typer.Option(help="Image size (default: the encoder's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train a linear probe or fine-tune a classifier from an image,label CSV."""
    from medfound.train.classify import ClassifyConfig, run_classify

    if max_steps < 1 or batch_size < 1 or not 0 < val_fraction < 1:
        raise InputError(None, "--max-steps, --batch-size >= 1 and --val-fraction in (0, 1)")
    cfg = run_classify(csv_path, out, encoder, ClassifyConfig(mode=mode, max_steps=max_steps, batch_size=batch_size,
                                                              lr=lr, val_fraction=val_fraction, image_size=image_size,
                                                              seed=seed))
    v = cfg["validation"]
    print(f"{out}: validation accuracy {v['accuracy']:.3f}, balanced accuracy {v['balanced_accuracy']:.3f} "
          f"({cfg['data']['val_images']} images)")


@classify_app.command("predict")
def classify_predict(
    model: Annotated[Path, typer.Option("--model", help="Classifier run folder.")],
    input: Annotated[Path, typer.Option("--input", help="Image file or folder of images.")],
    out: Annotated[Path, typer.Option("--out", help="CSV: image,label,probability.")],
) -> None:
    """Classify images with a trained classifier; writes image,label,probability."""
    import csv as _csv
    import io

    from medfound.io.atomic import write_text
    from medfound.io.formats import sniff_format
    from medfound.train.classify import classify_paths

    if not input.exists():
        raise InputError(input, "no such file or folder")
    paths = [input] if input.is_file() else [f for f in sorted(input.iterdir()) if f.is_file() and sniff_format(f)]
    if not paths:
        raise InputError(input, "no images found")
    buf = io.StringIO()
    w = _csv.writer(buf)
    w.writerow(["image", "label", "probability"])
    for p, label, prob in classify_paths(model, paths):
        w.writerow([str(p), label, f"{prob:.4f}"])
    write_text(out, buf.getvalue())
    print(f"{out}: {len(paths)} image(s)")


@experiment_app.command("label-efficiency")
def experiment_label_efficiency(
    dataset: Annotated[Path, typer.Option("--dataset", help="nnU-Net dataset (imagesTs/labelsTs are the test set if present).")],
    encoder: Annotated[str, typer.Option("--encoder", help="Exported MAE run to compare against scratch.")],
    out: Annotated[Path, typer.Option("--out", help="Folder: results.csv, summary.csv, label_efficiency.png, runs/.")],
    fractions: Annotated[str, typer.Option(help="Comma-separated label fractions.")] = "0.05,0.1,0.25,0.5,1",
    seeds: Annotated[int, typer.Option(help="Seeds per fraction and arm.")] = 3,
    modes: Annotated[str, typer.Option(help="Pretrained arms: comma-separated of full, linear, lora (scratch-full is always added with full).")] = "full",
    max_steps: Annotated[int, typer.Option(help="Fine-tuning steps per run.")] = 300,
    ood_dataset: Annotated[Optional[Path], typer.Option("--ood-dataset", help="Second dataset for an out-of-domain table (labels matched by name).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Slice size (default: the encoder's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Decoder learning rate.")] = 1e-3,
) -> None:
    """Dice vs label fraction, pretrained vs scratch (and LoRA vs full), with seeds and CIs."""
    from medfound.eval.experiments import label_efficiency
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
    base = FinetuneConfig(image_size=image_size, batch_size=batch_size, lr=lr)
    summary = label_efficiency(dataset, encoder, fr, seeds, out, mode_list, max_steps, ood_dataset, base)
    for r in summary:
        extra = f"  OOD {r['ood_dice_mean']:.3f}" if "ood_dice_mean" in r else ""
        print(f"{r['arm']:18s} fraction {r['fraction']:<5g} ({r['labeled_cases']} cases): Dice "
              f"{r['test_dice_mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] over {r['seeds']} seed(s){extra}")
    print(f"{out / 'summary.csv'}, {out / 'label_efficiency.png'}")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(None, f"{what} must be comma-separated integers, got {text!r}") from None


@incontext_app.command("train")
def incontext_train(
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/, logs/, previews/, model.safetensors, config.json.")],
    datasets: Annotated[Optional[list[Path]], typer.Option("--datasets", help="nnU-Net datasets whose labels are the training tasks; repeat.")] = None,
    bank: BankOpt = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Episodes per device per step.")] = 16,
    size: Annotated[int, typer.Option(help="Working slice size (multiple of 8).")] = 128,
    support_sizes: Annotated[str, typer.Option(help="Support-set sizes drawn per step (comma-separated, 1-64).")] = "1,2,4,8,12,16",
    synthetic_fraction: Annotated[float, typer.Option(help="Share of episodes that are synthetic shape tasks.")] = 0.25,
    negative_fraction: Annotated[float, typer.Option(help="Share of queries where the structure is absent.")] = 0.3,
    zoom_fraction: Annotated[float, typer.Option(help="Share of real episodes cut to a window around the task at 2-3x the resolution (the refinement pass's view); reads the data at twice --size.")] = 0.0,
    cross_subject_fraction: Annotated[float, typer.Option(help="Share of real episodes whose supports and query come from different subjects (tasks drawn in several), as in use: one patient's labels, another patient segmented.")] = 0.0,
    exclude_label: ExcludeLabelOpt = None,
    exclude_dataset: ExcludeDatasetOpt = None,
    lr: LrOpt = 2e-3,
    warmup_steps: WarmupOpt = 100,
    max_minutes: MaxMinutesOpt = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from this in-context run's weights.")] = None,
    encoder: Annotated[str, typer.Option(help="Shared encoder: 'conv' (small convolutional, trained from scratch) or an MAE run folder from `medfound pretrain` (frozen ViT with LoRA adapters).")] = "conv",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank on the MAE encoder's attention (with --encoder RUN).")] = 4,
    precision: PrecisionOpt = "bf16",
    accelerator: AcceleratorOpt = "auto",
    devices: DevicesOpt = "auto",
    num_nodes: NumNodesOpt = 1,
    strategy: StrategyOpt = "auto",
    checkpoint_every: CheckpointEveryOpt = 200,
    seed: StepSeedOpt = 0,
    resume: ResumeOpt = False,
) -> None:
    """Many-task episodic training: every non-held-out label of every dataset is a task."""
    from medfound.train.incontext import InContextTrainConfig, run_incontext_train

    if not 0 <= negative_fraction < 1:
        raise InputError(None, "--negative-fraction must be in [0, 1)")
    if encoder != "conv" and not Path(encoder).is_dir():
        raise InputError(encoder, "--encoder must be 'conv' or an MAE run folder (from `medfound pretrain`)")
    if lora_rank < 1:
        raise InputError(None, "--lora-rank must be positive")
    _step_training(InContextTrainConfig, run_incontext_train, "tasks", out=out, datasets=datasets, bank=bank,
                   exclude_label=exclude_label, exclude_dataset=exclude_dataset, steps=steps, batch_size=batch_size,
                   lr=lr, warmup_steps=warmup_steps, max_minutes=max_minutes, init=init, precision=precision,
                   accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                   checkpoint_every=checkpoint_every, seed=seed, resume=resume, size=size,
                   support_sizes=tuple(_ints(support_sizes, "--support-sizes")),
                   synthetic_fraction=synthetic_fraction, p_negative=negative_fraction, encoder=encoder,
                   lora_rank=lora_rank, zoom_fraction=zoom_fraction,
                   cross_subject_fraction=cross_subject_fraction)


@incontext_app.command("bank")
def incontext_bank(
    datasets: Annotated[list[Path], typer.Option("--datasets", help="nnU-Net datasets to read; repeat.")],
    out: Annotated[Path, typer.Option("--out", help="Bank file (.npz): uint8 slices, label maps, positions, task index.")],
    size: Annotated[int, typer.Option(help="Slice size of the bank (multiple of 8): the training --size, twice it for --zoom-fraction.")] = 128,
    exclude_label: Annotated[Optional[list[str]], typer.Option("--exclude-label", help="Label name never used as a task; repeat.")] = None,
) -> None:
    """Read task datasets once into a slice bank (held-out labels erased) for `incontext train --bank`."""
    from medfound.data.episodes import build_bank, save_bank

    for d in datasets:
        if not d.is_dir():
            raise InputError(d, "no such dataset folder")
    bank = build_bank([str(d) for d in datasets], size, exclude_labels=tuple(exclude_label or ()),
                      progress=sys.stderr.isatty())
    save_bank(bank, out)
    s = bank.summary()
    print(f"{out}: {s['slices']} slices, {s['tasks']} tasks from {len(s['datasets'])} datasets")


@app.command("segment")
def segment(
    support: Annotated[Path, typer.Option("--support", help="Example set: nnU-Net folder (imagesTr/labelsTr), 2D or 3D.")],
    input: Annotated[Path, typer.Option("--input", help="Image file, DICOM series folder, or folder of images.")],
    output: Annotated[Path, typer.Option("--output", help="Output folder: one mask per input, in its geometry.")],
    model: Annotated[Optional[Path], typer.Option(help="In-context run (default: the model shipped with medfound).")] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Label value or name to segment; repeat (default: all).")] = None,
    support_size: Annotated[int, typer.Option(help="Support slices per label (spread over the example set).")] = 16,
    ensemble: Annotated[int, typer.Option(help="Average over this many support subsets (member 1 evenly spread, others random).")] = 1,
    axis: Annotated[int, typer.Option(help="Slice axis of 3D volumes in RAS (0 sagittal, 1 coronal, 2 axial).")] = 2,
    batch_size: Annotated[int, typer.Option(help="Query slices per batch.")] = 16,
    modality: Annotated[Optional[str], typer.Option(help="Modality to assume (ct, mr, pet, xray, us) when a file records none.")] = None,
    keep_largest: Annotated[bool, typer.Option(help="Keep only the largest connected piece of each label (single anatomical structures; not for lesions).")] = False,
    register: RegisterOpt = True,
    refine: RefineOpt = None,
    flip: FlipOpt = None,
    prior_weight: PriorOpt = None,
    through_plane_sigma: SmoothOpt = None,
) -> None:
    """Segment new images from an example set, with no training (in-context).

    Outputs appear whole or not at all: every input is read first, the masks are staged beside OUTPUT
    and moved in only when every input has succeeded. OUTPUT may not be, contain or lie inside an input."""
    from medfound.infer.incontext import segment_path

    if axis not in (0, 1, 2):
        raise InputError(None, "--axis must be 0, 1 or 2")
    written = segment_path(support, input, output, model, label, support_size, ensemble, axis, batch_size, modality,
                           progress=sys.stderr.isatty(), keep_largest=keep_largest, register=register, refine=refine,
                           flip=flip, prior_weight=prior_weight, through_plane_sigma=through_plane_sigma)
    for w in written:
        print(w)


@experiment_app.command("support-size")
def experiment_support_size(
    support: Annotated[Path, typer.Option("--support", help="nnU-Net dataset the support slices come from.")],
    test: Annotated[Path, typer.Option("--test", help="nnU-Net dataset of query volumes with their labels.")],
    out: Annotated[Path, typer.Option("--out", help="Folder: results.csv, summary.csv, summary.json, support_size.png.")],
    sizes: Annotated[str, typer.Option(help="Support sizes (comma-separated).")] = "1,2,4,8,16,32",
    seeds: Annotated[int, typer.Option(help="Random support subsets per size and structure.")] = 3,
    model: Annotated[Optional[Path], typer.Option(help="In-context run (default: the shipped model).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated of incontext, label-fusion, registered-label-fusion, finetune.")] = "incontext,label-fusion,registered-label-fusion,finetune",
    finetune_steps: Annotated[int, typer.Option(help="Steps of the fine-tuning baseline per support set.")] = 150,
    finetune_sizes: Annotated[Optional[str], typer.Option(help="Sizes at which to run the (slow) fine-tuning baseline (default: all).")] = None,
    structure: Annotated[Optional[list[str]], typer.Option("--structure", help="Support label name to evaluate; repeat (default: the held-out structures found in both).")] = None,
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


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1 keeps it on this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workdir: Annotated[Optional[Path], typer.Option(help="Folder for uploaded studies and example sets (default: a new temporary folder).")] = None,
    support: Annotated[Optional[list[Path]], typer.Option("--support", help="nnU-Net example set offered on the page; repeat.")] = None,
    model: Annotated[Optional[list[Path]], typer.Option("--model", help="Fine-tuned segmenter run offered on the page; repeat.")] = None,
    sam: Annotated[Optional[str], typer.Option(help="SAM for box/point prompts: litemedsam, a `sam train` or `sam finetune` run, an official .pth, or a variant name (default: the small SAM shipped with medfound).")] = None,
    incontext_model: Annotated[Optional[Path], typer.Option(help="In-context run (default: the shipped model).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload (refused from its Content-Length, never read in full).")] = 512,
    max_voxels: Annotated[int, typer.Option(help="Largest image accepted, in voxels (checked from the header where the format has one).")] = 100_000_000,
    memory_mb: Annotated[float, typer.Option(help="Memory budget of all open studies (images, masks, undo); uploads beyond it are refused.")] = 4096,
    idle_minutes: Annotated[float, typer.Option(help="Close a study (and remove its files) after this long without a request.")] = 60,
) -> None:
    """Web viewer: scroll a study, prompt SAM, segment from an example set, download the mask.

    The page answers only to the host it is bound to, and state-changing requests must carry the
    page's token, so other web pages cannot upload to it or read from it. A temporary work folder is
    removed when the server stops (a --workdir is kept)."""
    import tempfile

    import uvicorn

    from medfound.data.nnunet import NnUNetDataset
    from medfound.viewer.app import create_app

    import math

    if not 1 <= port <= 65535:
        raise InputError(None, f"--port must be 1..65535, got {port}")
    if not math.isfinite(max_upload_mb) or max_upload_mb <= 0:
        raise InputError(None, f"--max-upload-mb must be a positive number, got {max_upload_mb}")
    if workdir is not None:
        from medfound.io.outputs import check_output_dir

        check_output_dir(workdir, [*(support or []), *(model or [])])
    for s in support or []:
        NnUNetDataset.open(s)  # a bad example set fails here, with its path, not on the first click
    for m in model or []:
        if not (m / "config.json").is_file():
            raise InputError(m, "not a fine-tuned model run (no config.json)")
    if max_voxels < 1 or not math.isfinite(memory_mb) or memory_mb <= 0 or not math.isfinite(idle_minutes) or idle_minutes <= 0:
        raise InputError(None, "--max-voxels, --memory-mb and --idle-minutes must be positive")
    work = workdir or Path(tempfile.mkdtemp(prefix="medfound-serve-"))
    # A wildcard bind answers to any name the machine has; a named bind only to that name (DNS rebinding).
    hosts = None if host in ("0.0.0.0", "::") else sorted({host, "localhost", "127.0.0.1", "::1"})
    app_ = create_app(work, support, model, sam, incontext_model, max_upload_mb, max_voxels=max_voxels,
                      memory_mb=memory_mb, idle_minutes=idle_minutes, allowed_hosts=hosts)
    print(f"medfound viewer on http://{host}:{port}/  (studies in {work})", flush=True)
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        if workdir is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for data, shards and report/.")] = Path("demo"),
    pretrain_steps: Annotated[int, typer.Option(help="MAE pretraining steps in the demo.")] = 300,
    finetune_steps: Annotated[int, typer.Option(help="Fine-tuning steps per run in the demo.")] = 150,
    sam_steps: Annotated[int, typer.Option(help="SAM LoRA fine-tuning steps in the demo.")] = 300,
    baseline_steps: Annotated[int, typer.Option(help="Steps of the fine-tuning baseline in the in-context support-size curve.")] = 100,
) -> None:
    """Run the main job end to end on the real sample data and write a report."""
    from medfound.demo import run_demo

    if min(pretrain_steps, finetune_steps, sam_steps, baseline_steps) < 1:
        raise InputError(None, "--pretrain-steps, --finetune-steps, --sam-steps and --baseline-steps must be >= 1")
    run_demo(out, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, sam_steps=sam_steps,
             baseline_steps=baseline_steps)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", module="pydicom")  # odd-but-readable tags: not the user's concern
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    try:
        app()
    except InputError as e:
        print(f"medfound: error: {e.message}", file=sys.stderr)
        sys.exit(2)
    except FileExistsError as e:
        print(f"medfound: error: {e}: exists", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("medfound: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

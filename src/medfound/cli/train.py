"""Building from medical images: `pretrain`, `finetune`, `predict`, `evaluate`, `classify ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.cli.common import (
    AcceleratorOpt,
    DeviceOpt,
    DevicesOpt,
    DicomSegOpt,
    NumNodesOpt,
    PrecisionOpt,
    PushOpt,
    RtstructOpt,
    StrategyOpt,
    _lora_stages,
    app,
    check_push,
    classify_app,
    device_count,
    push_results,
)
from medfound.errors import InputError


@app.command("pretrain")
def pretrain(
    data: Annotated[list[str], typer.Option("--data", help="Ingested shard folder or raw image tree ([mod:]PATH); repeat for several.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: checkpoints/, logs/, previews/, encoder.safetensors, config.json.")],
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
    precision: PrecisionOpt = "auto",
    accelerator: AcceleratorOpt = "auto",
    devices: DevicesOpt = "auto",
    num_nodes: NumNodesOpt = 1,
    strategy: StrategyOpt = "auto",
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
    dev = device_count(devices)
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
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: model.safetensors, config.json, checkpoints/, logs/.")],
    encoder: Annotated[str, typer.Option(help="An exported MAE run folder, litemedsam (LiteMedSAM's TinyViT, released weights), or scratch (scratch:vit-small, scratch:tinyvit ...; scratch:unet: a ResNet-18 U-Net, the CNN floor, --mode full).")] = "scratch",
    mode: Annotated[str, typer.Option(help="full, linear (frozen encoder) or lora (on a TinyViT: the stages --lora-stages names, the frozen ones before them cached).")] = "full",
    rank: Annotated[int, typer.Option(help="LoRA rank (--mode lora).")] = 4,
    lora_stages: Annotated[Optional[str], typer.Option(help="--mode lora on a TinyViT: the stages whose attention is adapted, comma-separated, each 1-3 (default 2,3); the stages before the first are frozen and computed once per slice.")] = None,
    label_fraction: Annotated[float, typer.Option(help="Fraction of the non-validation cases whose labels are used.")] = 1.0,
    val_fraction: Annotated[float, typer.Option(help="Fraction of cases held back for validation (by case).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed (case split, initialisation, augmentation).")] = 0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Slices per device per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the decoder.")] = 1e-3,
    encoder_lr_scale: Annotated[float, typer.Option(help="Encoder lr = lr x this (--mode full).")] = 0.3,
    image_size: Annotated[Optional[int], typer.Option(help="Slice size (default: the encoder's pretraining size, else 224).")] = None,
    val_every: Annotated[Optional[int], typer.Option(
        min=1, help="Validate every N steps (default: about five validations, the last at the final step).")] = None,
    precision: PrecisionOpt = "auto",
    accelerator: AcceleratorOpt = "auto",
    devices: DevicesOpt = "1",
    num_nodes: NumNodesOpt = 1,
    strategy: StrategyOpt = "auto",
) -> None:
    """Fine-tune a segmenter on labeled cases (ViT-UNETR, or a U-Net on LiteMedSAM's TinyViT), from a pretrained encoder or from scratch."""
    from medfound.train.finetune import FinetuneConfig, run_finetune

    if max_steps < 1 or batch_size < 1 or rank < 1 or not 0 < val_fraction < 1:
        raise InputError(None, "--max-steps, --batch-size, --rank must be positive and --val-fraction in (0, 1)")
    dev = device_count(devices)
    cfg = FinetuneConfig(mode=mode, rank=rank, lora_stages=_lora_stages(lora_stages, mode), label_fraction=label_fraction,
                         val_fraction=val_fraction, seed=seed,
                         max_steps=max_steps, batch_size=batch_size, lr=lr, encoder_lr_scale=encoder_lr_scale,
                         image_size=image_size, val_every=val_every, precision=precision, accelerator=accelerator,
                         devices=dev, num_nodes=num_nodes, strategy=strategy)
    config = run_finetune(dataset, out, encoder, cfg)
    if not config:  # another rank of a distributed run: rank 0 writes and reports
        return
    from medfound.eval.model_card import write_model_card

    write_model_card(out, dataset, config["data"]["val_cases"])
    t = config["training"]
    print(f"{out}: {t['steps']} steps, best validation Dice {t['best_val_dice']:.3f} "
          f"({len(config['data']['train_cases'])} labeled case(s), {t['trainable_parameters']:,} trainable parameters)")


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="Fine-tuned run folder (model.safetensors + config.json).")],
    input: Annotated[Path, typer.Option("--input", "-i", help="Image file, DICOM series folder, folder of images, or a DICOMweb study/series (dicomweb+http://HOST:PORT/dicom-web/studies/UID or .../series/UID).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the masks (CASE.nii.gz, in the input's geometry).")],
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 16,
    dicom_seg: DicomSegOpt = False,
    precision: Annotated[str, typer.Option(help="bf16 (autocast: faster on CPUs with bf16 support and on GPUs) or 32.")] = "32",
    modality: Annotated[Optional[str], typer.Option(help="Modality of inputs that do not record one (default: the model's).")] = None,
    push: PushOpt = False,
    rtstruct: RtstructOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Segment 2D images and 3D volumes (slice by slice, in batches) with a fine-tuned model.

    Outputs appear whole or not at all: the masks are staged beside OUTPUT and moved in only when every
    input has succeeded. OUTPUT may not be, contain or lie inside an input."""
    from medfound.device import inference_device
    from medfound.infer.predict import predict_path
    from medfound.io.image import is_known_modality

    if batch_size < 1:
        raise InputError(None, "--batch-size must be >= 1")
    if modality and not is_known_modality(modality):
        raise InputError(None, f"unknown modality {modality!r} (use ct, mr, pet, nm, xray, us)")
    if precision not in ("bf16", "32"):
        raise InputError(None, f"--precision must be bf16 or 32, got {precision!r}")
    check_push(push, input)
    written = predict_path(model, input, output, batch_size, dicom_seg or push, precision == "bf16", modality=modality,
                           device=inference_device(device), rtstruct=rtstruct)
    for p in written:
        print(p)
    if push:
        push_results(input, written)


@app.command("evaluate")
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted label maps (CASE.nii.gz ...).")],
    truth: Annotated[Path, typer.Option("--truth", help="Folder of reference label maps (e.g. labelsTs).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="CSV: case,label,dice,iou,hd95,nsd (summary JSON beside it).")],
    nsd_tolerance: Annotated[float, typer.Option("--nsd-tolerance", help="NSD tolerance in mm.")] = 1.0,
    cases: Annotated[Optional[str], typer.Option(help="Only these cases (comma-separated names).")] = None,
    common_cases: Annotated[bool, typer.Option(help="Only the cases present in both folders (default: every truth case needs a prediction).")] = False,
) -> None:
    """Dice, IoU, HD95 and NSD in mm per case and label (through MONAI), with means and 95 % CIs.

    Labels are matched by name when the predictions carry a labels.json and the truth folder sits in a
    dataset with a dataset.json; by value otherwise. The summary JSON is strict (null where undefined)."""
    import math

    from medfound.eval.evaluate import evaluate_folders, format_summary
    from medfound.io.outputs import check_output_file

    if not math.isfinite(nsd_tolerance) or nsd_tolerance < 0:
        raise InputError(None, f"--nsd-tolerance must be a finite number of mm >= 0, got {nsd_tolerance}")
    for folder in (pred, truth):
        if not folder.is_dir():
            raise InputError(folder, "no such folder of label maps")
    check_output_file(out, [pred, truth])
    chosen = [c.strip() for c in cases.split(",") if c.strip()] if cases else None
    summary = evaluate_folders(pred, truth, out, nsd_tolerance, cases=chosen, common_only=common_cases)
    if chosen or common_cases:
        print(f"evaluated {summary['cases']} case(s): {', '.join(summary['case_names'][:10])}"
              f"{' ...' if summary['cases'] > 10 else ''}")
    if summary["labels_matched_by"] == "name":
        print("labels matched by name (the predictions' labels.json against the truth's dataset.json)")
    print(format_summary(summary))
    print(f"{out} ({summary['cases']} case(s)); summary: {out.with_name(out.stem + '_summary.json')}")




@classify_app.command("train")
def classify_train(
    csv_path: Annotated[Path, typer.Option("--csv", help="CSV with columns image,label (paths relative to the CSV).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: model.safetensors + config.json.")],
    encoder: Annotated[str, typer.Option(help="Exported MAE run, litemedsam, or scratch (scratch:tinyvit ...).")] = "scratch",
    mode: Annotated[str, typer.Option(help="linear (probe, frozen encoder), lora (adapters of --rank on the attention: a ViT's every block, a TinyViT's --lora-stages; folded into the weights on export) or full.")] = "linear",
    rank: Annotated[int, typer.Option(help="LoRA rank (--mode lora).")] = 4,
    lora_stages: Annotated[Optional[str], typer.Option(help="--mode lora on a TinyViT: the stages whose attention is adapted, comma-separated, each 1-3 (default 2,3); the stages before the first run once per image.")] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Images per device per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out for validation.")] = 0.2,
    image_size: Annotated[Optional[int], typer.Option(help="Image size (default: the encoder's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    precision: PrecisionOpt = "32",
    accelerator: AcceleratorOpt = "auto",
    devices: DevicesOpt = "1",
    num_nodes: NumNodesOpt = 1,
    strategy: StrategyOpt = "auto",
) -> None:
    """Train a linear probe or fine-tune a classifier from an image,label CSV."""
    from medfound.train.classify import ClassifyConfig, run_classify

    if max_steps < 1 or batch_size < 1 or rank < 1 or not 0 < val_fraction < 1:
        raise InputError(None, "--max-steps, --batch-size, --rank >= 1 and --val-fraction in (0, 1)")
    cfg = run_classify(csv_path, out, encoder, ClassifyConfig(
        mode=mode, rank=rank, lora_stages=_lora_stages(lora_stages, mode), max_steps=max_steps, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
        image_size=image_size, seed=seed, precision=precision, accelerator=accelerator,
        devices=device_count(devices), num_nodes=num_nodes, strategy=strategy))
    if not cfg:  # another rank of a distributed run: rank 0 writes and reports
        return
    v = cfg["validation"]
    print(f"{out}: validation accuracy {v['accuracy']:.3f}, balanced accuracy {v['balanced_accuracy']:.3f} "
          f"({cfg['data']['val_images']} images)")


@classify_app.command("predict")
def classify_predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="Classifier run folder.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="Image file or folder of images.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="CSV: image,label,probability.")],
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

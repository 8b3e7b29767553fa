"""In-context segmentation: `segment`, `incontext train`, `incontext train-completion`, `incontext bank`."""

from __future__ import annotations

import sys
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
    FlipOpt,
    LrOpt,
    MaxMinutesOpt,
    NumNodesOpt,
    PrecisionOpt,
    PriorOpt,
    PushOpt,
    RefineOpt,
    Register2dOpt,
    RegisterOpt,
    ResumeOpt,
    RtstructOpt,
    SmoothOpt,
    StepSeedOpt,
    StrategyOpt,
    WarmupOpt,
    _ints,
    _step_training,
    app,
    check_push,
    incontext_app,
    push_results,
    refiner_choice,
    register_2d_choice,
)
from medfound.errors import InputError


@incontext_app.command("train")
def incontext_train(
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: checkpoints/, logs/, previews/, model.safetensors, config.json.")],
    datasets: Annotated[Optional[list[Path]], typer.Option("--datasets", help="nnU-Net datasets whose labels are the training tasks; repeat.")] = None,
    bank: BankOpt = None,
    steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Episodes per device per step.")] = 16,
    size: Annotated[int, typer.Option("--image-size", help="Working slice size (multiple of 8).")] = 128,
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
    init: Annotated[Optional[Path], typer.Option(help="Start from this in-context run's weights; from a run with another encoder (the shipped conv model starting an --encoder litemedsam one) its attention, decoder and full-resolution stem carry over.")] = None,
    encoder: Annotated[str, typer.Option(help="Shared encoder: 'conv' (small convolutional, trained from scratch), 'litemedsam' (LiteMedSAM's TinyViT, as GMISeg; scratch:tinyvit: random) or an MAE run folder from `medfound pretrain`; the last two frozen with LoRA adapters.")] = "conv",
    lora_rank: Annotated[int, typer.Option("--rank", help="LoRA rank on the encoder's attention (with --encoder litemedsam or RUN).")] = 4,
    precision: PrecisionOpt = "auto",
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
    from medfound.models.tinyvit import TINYVIT_ENCODERS

    if encoder not in ("conv", *TINYVIT_ENCODERS) and not Path(encoder).is_dir():
        raise InputError(encoder, "--encoder must be 'conv', 'litemedsam' or an MAE run folder (from `medfound pretrain`)")
    if lora_rank < 1:
        raise InputError(None, "--rank must be positive")
    _step_training(InContextTrainConfig, run_incontext_train, "tasks", out=out, datasets=datasets, bank=bank,
                   exclude_label=exclude_label, exclude_dataset=exclude_dataset, steps=steps, batch_size=batch_size,
                   lr=lr, warmup_steps=warmup_steps, max_minutes=max_minutes, init=init, precision=precision,
                   accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                   checkpoint_every=checkpoint_every, seed=seed, resume=resume, size=size,
                   support_sizes=tuple(_ints(support_sizes, "--support-sizes")),
                   synthetic_fraction=synthetic_fraction, p_negative=negative_fraction, encoder=encoder,
                   lora_rank=lora_rank, zoom_fraction=zoom_fraction,
                   cross_subject_fraction=cross_subject_fraction)


@incontext_app.command("train-completion")
def incontext_train_completion(
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: checkpoints/, logs/, model.safetensors, config.json.")],
    datasets: Annotated[list[Path], typer.Option("--datasets", help="nnU-Net datasets of labelled volumes; every non-held-out structure gives same-study episodes; repeat.")],
    steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Slices per device per step.")] = 32,
    size: Annotated[int, typer.Option("--image-size", help="Side of the window around each structure after resizing (multiple of 16).")] = 96,
    episodes_per_structure: Annotated[int, typer.Option(help="Episodes (labelled-slice placements, each along a random axis) per structure.")] = 6,
    samples_per_episode: Annotated[int, typer.Option(help="Unlabelled slices kept per episode.")] = 6,
    exclude_label: ExcludeLabelOpt = None,
    exclude_dataset: ExcludeDatasetOpt = None,
    lr: LrOpt = 1e-3,
    warmup_steps: WarmupOpt = 100,
    max_minutes: MaxMinutesOpt = None,
    precision: PrecisionOpt = "32",
    accelerator: AcceleratorOpt = "auto",
    devices: DevicesOpt = "auto",
    num_nodes: NumNodesOpt = 1,
    strategy: StrategyOpt = "auto",
    checkpoint_every: CheckpointEveryOpt = 200,
    seed: StepSeedOpt = 0,
    resume: ResumeOpt = False,
) -> None:
    """Train the refiner of same-study completion (`segment --partial-labels`) on episodes cut from
    labelled volumes: a few slices of a structure given, the others to complete."""
    from medfound.train.completion import CompletionTrainConfig, run_completion_train

    if min(episodes_per_structure, samples_per_episode) < 1:
        raise InputError(None, "--episodes-per-structure and --samples-per-episode must be positive")
    _step_training(CompletionTrainConfig, run_completion_train, "structures", out=out, datasets=datasets, bank=None,
                   exclude_label=exclude_label, exclude_dataset=exclude_dataset, steps=steps, batch_size=batch_size,
                   lr=lr, warmup_steps=warmup_steps, max_minutes=max_minutes, init=None, precision=precision,
                   accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                   checkpoint_every=checkpoint_every, seed=seed, resume=resume, size=size,
                   episodes_per_structure=episodes_per_structure, samples_per_episode=samples_per_episode)


@incontext_app.command("bank")
def incontext_bank(
    datasets: Annotated[list[Path], typer.Option("--datasets", help="nnU-Net datasets to read; repeat.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Bank file (.npz): uint8 slices, label maps, positions, task index.")],
    size: Annotated[int, typer.Option("--image-size", help="Slice size of the bank (multiple of 8): the training --size, twice it for --zoom-fraction.")] = 128,
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
    input: Annotated[Path, typer.Option("--input", "-i", help="Image file, DICOM series folder, folder of images, or a DICOMweb study/series (dicomweb+http://HOST:PORT/dicom-web/studies/UID or .../series/UID; every series of a study).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: one mask per input, in its geometry.")],
    support: Annotated[Optional[Path], typer.Option("--support", help="Example set: nnU-Net folder (imagesTr/labelsTr), 2D or 3D; a DICOMweb study/series holding image series and their DICOM-SEG; with --support-prompts, the support images alone.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="In-context run (default: the model shipped with medfound).")] = None,
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
    register_2d: Register2dOpt = None,
    support_prompts: Annotated[Optional[Path], typer.Option("--support-prompts", help="JSON of boxes/points per support image, label and slice (docs/guide/incontext.md): a SAM draws the support masks.")] = None,
    sam_model: Annotated[Optional[str], typer.Option("--sam-model", help="SAM that turns --support-prompts into masks (as sam segment --model; default: the shipped small SAM).")] = None,
    partial_labels: Annotated[Optional[Path], typer.Option("--partial-labels", help="Same-study completion: a label map on the study's grid with some slices labelled; the other slices are segmented (no --support).")] = None,
    labelled_slices: Annotated[Optional[str], typer.Option("--labelled-slices", help="With --partial-labels: the labelled slice numbers (as the file counts them along --axis), so a labelled slice may be empty (default: every slice holding a label).")] = None,
    model_share: Annotated[Optional[float], typer.Option("--model-share", help="With --partial-labels: share of the in-context model in the result, the rest from interpolating the labelled outlines (default 0, docs/results/incontext-same-study.md).")] = None,
    refiner: Annotated[Optional[str], typer.Option("--refiner", help="With --partial-labels: the refiner that corrects the interpolated outlines from the image (a run of `medfound incontext train-completion`; 'none' = interpolation alone; default: the shipped refiner).")] = None,
    query_box: Annotated[Optional[str], typer.Option("--query-box", help="x0,y0,x1,y1 on --slice of the input: where the target is (lesions, anything whose position differs between patients); the example set says what it looks like.")] = None,
    query_slice: Annotated[Optional[int], typer.Option("--slice", help="With --query-box: the boxed slice, numbered as the file counts them along --axis (omit for 2D images).")] = None,
    dicom_seg: DicomSegOpt = False,
    rtstruct: RtstructOpt = False,
    push: PushOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Segment new images from an example set, with no training (in-context); or complete a
    study of which some slices are labelled (--partial-labels).

    Outputs appear whole or not at all: every input is read first, the masks are staged beside OUTPUT
    and moved in only when every input has succeeded. OUTPUT may not be, contain or lie inside an input."""
    from medfound.device import inference_device
    from medfound.infer.incontext import segment_path

    if axis not in (0, 1, 2):
        raise InputError(None, "--axis must be 0, 1 or 2")
    check_push(push, input)
    deform_2d = register_2d_choice(register_2d)
    dev = inference_device(device)
    from medfound.io.result_files import ResultFormats

    def formats(how: str) -> ResultFormats:
        return ResultFormats(dicom_seg or push, rtstruct,
                             f"medfound segment {how}({model.name if model else 'shipped in-context model'})")

    if partial_labels is not None:
        from medfound.infer.completion import complete_path

        if support is not None or support_prompts is not None:
            raise InputError(None, "--partial-labels takes the example set from the study itself: leave out --support / --support-prompts")
        slices = _ints(labelled_slices, "--labelled-slices") if labelled_slices else None
        refiner_run, refine = refiner_choice(refiner)
        written = complete_path(input, partial_labels, output, slices, axis, model, model_share, modality,
                                batch_size, progress=True, device=dev, formats=formats("--partial-labels "),
                                refiner_run=refiner_run, refine=refine)
        _report(written, input, push)
        return
    if support is None:
        raise InputError(None, "give an example set (--support) or the study's own partial labels (--partial-labels)")
    if labelled_slices is not None or model_share is not None or refiner is not None:
        raise InputError(None, "--labelled-slices, --model-share and --refiner go with --partial-labels")
    if query_box is not None or query_slice is not None:
        from medfound.infer.query_prompt import query_box_path

        if query_box is None:
            raise InputError(None, "--slice goes with --query-box")
        try:
            box = [float(x) for x in query_box.split(",")]
        except ValueError:
            raise InputError(None, f"--query-box takes x0,y0,x1,y1; got {query_box!r}") from None
        written = query_box_path(support, input, output, box, query_slice, model, label, support_size, axis,
                                 modality, device=dev, formats=formats("--query-box "))
        _report(written, input, push)
        return

    def run(example_set: Path) -> list:
        return segment_path(example_set, input, output, model, label, support_size, ensemble, axis, batch_size, modality,
                            progress=True, keep_largest=keep_largest, register=register, refine=refine,
                            flip=flip, prior_weight=prior_weight, through_plane_sigma=through_plane_sigma, device=dev,
                            dicom_seg=dicom_seg or push, rtstruct=rtstruct, deform_2d=deform_2d)

    from medfound.io.dicomweb import is_dicomweb

    if is_dicomweb(support):
        from medfound.data.support_set import dicomweb_support_set
        from medfound.io.outputs import check_output_dir

        if support_prompts is not None:
            raise InputError(None, "--support-prompts takes a local folder of support images, not a DICOMweb address")
        check_output_dir(output, [input, model])
        with dicomweb_support_set(str(support)) as example_set:
            written = run(example_set)
    elif support_prompts is None:
        written = run(support)
    else:
        from medfound.infer.support_prompts import prompted_support_set
        from medfound.io.outputs import check_output_dir

        check_output_dir(output, [input, support, support_prompts, model])
        with prompted_support_set(support, support_prompts, sam_model, dev) as example_set:
            written = run(example_set)
    _report(written, input, push)


def _report(written: list, source, push: bool) -> None:
    """Print what was written; with --push, store its DICOM objects in the source's PACS."""
    for w in written:
        print(w)
    if push:
        push_results(source, written)

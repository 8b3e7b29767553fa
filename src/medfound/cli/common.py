"""The app, its command groups and the options several commands share (defined once here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.errors import InputError

#: ``-h`` as well as ``--help`` on every command
HELP = {"help_option_names": ["-h", "--help"]}


def group(help_text: str) -> typer.Typer:
    return typer.Typer(no_args_is_help=True, help=help_text, context_settings=HELP)


app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, context_settings=HELP,
                  help="Segmentation foundation models for medical images.")


def _version(value: bool) -> None:
    if value:
        import medfound

        print(f"medfound {medfound.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Segmentation foundation models for medical images."""


data_app = group("Read, inspect, ingest and materialise data.")
app.add_typer(data_app, name="data")
sam_app = group("Segment Anything: prompted segmentation, LoRA fine-tuning, evaluation (LiteMedSAM, the shipped small SAM, official checkpoints).")
app.add_typer(sam_app, name="sam")
classify_app = group("Image classification heads on the same encoders.")
app.add_typer(classify_app, name="classify")
experiment_app = group("Experiments: label efficiency, support size, out-of-domain.")
app.add_typer(experiment_app, name="experiment")
incontext_app = group("In-context segmentation: many-task training of the example-set model.")
app.add_typer(incontext_app, name="incontext")


# In-context inference (`segment`, `experiment support-size`).
RegisterOpt = Annotated[bool, typer.Option(
    "--register/--no-register", help="Place 3D support slices at the query height they show by an affine registration of "
    "each support volume onto the query (else by relative position in each volume); register each 2D example onto a 2D query.")]
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
Register2dOpt = Annotated[Optional[str], typer.Option(
    "--register-2d", help="2D query: how each example slice is registered onto it: affine, or deformable (the affine "
    "refined by a smooth deformation; default: the model's setting).")]


def register_2d_choice(value: str | None) -> bool | None:
    """--register-2d as the ``deform_2d`` setting (None: the model's setting)."""
    if value is None:
        return None
    if value not in ("affine", "deformable"):
        raise InputError(None, f"--register-2d must be affine or deformable, got {value!r}")
    return value == "deformable"


def refiner_choice(value: str | None) -> tuple[Path | None, bool]:
    """--refiner as (run folder or None for the shipped refiner, whether to refine at all): 'none'
    turns the refiner off."""
    if value is not None and value.lower() == "none":
        return None, False
    return (Path(value) if value is not None else None), True


# Results into the user's PACS (predict, segment, sam segment, batch).
DicomSegOpt = Annotated[bool, typer.Option("--dicom-seg", help="Also write DICOM-SEG (CASE_seg.dcm) for DICOM inputs, referencing the source series.")]
PushOpt = Annotated[bool, typer.Option("--push", help="Store the result in the PACS the DICOMweb input came from (STOW-RS), as DICOM-SEG referencing the source series (and the RTSTRUCT with --rtstruct); implies --dicom-seg. Local outputs are kept.")]
RtstructOpt = Annotated[bool, typer.Option("--rtstruct", help="Also write an RT Structure Set (CASE_rtstruct.dcm, a ROI per label) for DICOM series, for radiotherapy systems.")]


def check_push(push: bool, source) -> None:
    """Before any work: ``--push`` needs a DICOMweb input, the PACS the result goes back to."""
    from medfound.io.dicomweb import is_dicomweb, parse

    if push:
        if not is_dicomweb(source):
            raise InputError(source, "--push stores results back in the PACS the input came from; this input is not a "
                                     "DICOMweb address (dicomweb+http://HOST:PORT/dicom-web/studies/UID)")
        parse(source)


def push_results(source, written) -> list[str]:
    """STOW-RS every DICOM-SEG among ``written`` to ``source``'s PACS; prints and returns their addresses."""
    from medfound.io.dicomweb import parse, push

    stored = push(source, written)
    for url in stored:
        print(f"{url}: stored in the PACS")
    if not stored:
        print(f"medfound: nothing to push to {parse(source).url}: no DICOM input, so no DICOM-SEG", file=sys.stderr)
    return stored


# Where the inference commands run (predict, segment, sam segment, serve).
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda (cuda:N) or auto (a GPU when there is one).")]

# Options of the step-indexed many-task training commands (`incontext train`, `sam train`).
BankOpt = Annotated[Optional[Path], typer.Option(help="A slice bank from `medfound incontext bank` instead of --datasets (train where the image readers are not installed).")]
ExcludeLabelOpt = Annotated[Optional[list[str]], typer.Option("--exclude-label", help="Label name never trained on (held out); repeat. DESIGN.md's held-out structures are always excluded.")]
ExcludeDatasetOpt = Annotated[Optional[list[str]], typer.Option("--exclude-dataset", help="Dataset folder name never read (held out); repeat.")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")]
WarmupOpt = Annotated[int, typer.Option(help="Linear warm-up steps.")]
MaxMinutesOpt = Annotated[Optional[float], typer.Option(help="Stop and export after this wall time even if steps remain.")]
# The trainer options of every training command, defined once (Lightning's names and meanings).
PrecisionOpt = Annotated[str, typer.Option(help="auto (bf16 where the devices compute it natively: a GPU, a CPU with AMX or AVX512-BF16; else 32, since other CPUs emulate bf16 about 10x slower), bf16 (mixed, bf16 autocast) or 32.")]
SamPrecisionOpt = Annotated[Optional[str], typer.Option(help="auto (bf16 where the device computes it natively: a GPU, a CPU with AMX or AVX512-BF16), bf16 or 32 (default: the model's own, 32 for every shipped SAM). bf16 roughly halves LiteMedSAM's time on a CPU and moves its masks a little.")]
SamFlipOpt = Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Average each answer with the answer on the mirrored slice (prompts mirrored too), as nnU-Net mirrors at test time; twice the cost (default: the model's own setting).")]
AcceleratorOpt = Annotated[str, typer.Option(help="cpu, gpu or auto.")]
DevicesOpt = Annotated[str, typer.Option(help="Devices per node (number or auto).")]
NumNodesOpt = Annotated[int, typer.Option(help="Nodes (torchrun or SLURM sets the rest).")]
StrategyOpt = Annotated[str, typer.Option(help="auto, ddp, ddp_spawn, fsdp ...")]


def device_count(devices: str) -> int | str:
    """``--devices`` as Lightning takes it: a number, or a word such as ``auto``."""
    return int(devices) if devices.isdigit() else devices
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
        raise InputError(None, "--max-steps and --batch-size must be positive")
    chosen, prebuilt, skip = _task_data(datasets, bank, exclude_label, exclude_dataset)
    cfg = config_cls(batch_size=batch_size, max_steps=steps, lr=lr, warmup_steps=warmup_steps, max_minutes=max_minutes,
                     init=str(init) if init else None, precision=precision, accelerator=accelerator,
                     devices=device_count(devices), num_nodes=num_nodes, strategy=strategy,
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




def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(None, f"{what} must be comma-separated integers, got {text!r}") from None


def _lora_stages(text: str | None, mode: str = "lora") -> tuple[int, ...] | None:
    """``--lora-stages`` as sorted distinct stage numbers (None where not given); the model checks them.
    A command with a ``--mode`` passes it: the stages need ``lora``."""
    if text and mode != "lora":
        raise InputError(None, "--lora-stages needs --mode lora")
    return tuple(sorted(set(_ints(text, "--lora-stages")))) if text else None

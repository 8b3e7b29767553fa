"""`batch segment`, `batch predict`: every series of a DICOMweb query, resumable, one row per series."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.cli.common import DeviceOpt, PushOpt, RtstructOpt, app, group
from medfound.errors import InputError

batch_app = group("A whole archive in one command: every series a DICOMweb query finds, one row each in OUT/batch.csv; "
                  "a rerun skips what is done and retries what failed.")
app.add_typer(batch_app, name="batch")

QueryOpt = Annotated[str, typer.Option("--query", help="dicomweb+http(s)://HOST:PORT/PREFIX?QIDO-PARAMS (QIDO-RS's own series "
                                       "search parameters, e.g. Modality=MR&StudyDate=20240101-20241231), or a study/series address.")]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder: one sub-folder per series (its mask, labels.json, DICOM-SEG) and batch.csv.")]
WorkersOpt = Annotated[int, typer.Option(help="Series run in parallel on this machine (processes).")]
SchedulerOpt = Annotated[Optional[str], typer.Option(help="Run the series on a Dask cluster: its scheduler's address (tcp://HOST:8786); workers need the same credentials (environment or netrc).")]


def _finish(rows: list[dict]) -> None:
    failed = [r for r in rows if r.get("status") != "done"]
    print(f"medfound: batch: {len(rows) - len(failed)} series done, {len(failed)} failed", file=sys.stderr)
    if failed:
        raise typer.Exit(2)


@batch_app.command("segment")
def batch_segment(
    query: QueryOpt,
    output: OutOpt,
    support: Annotated[Path, typer.Option("--support", help="Example set (nnU-Net folder), as for `medfound segment`.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="In-context run (default: the model shipped with medfound).")] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Label value or name to segment; repeat (default: all).")] = None,
    support_size: Annotated[int, typer.Option(help="Support slices per label.")] = 16,
    rtstruct: RtstructOpt = False,
    push: PushOpt = False,
    workers: WorkersOpt = 1,
    scheduler: SchedulerOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """In-context segmentation of every series the query finds (as `medfound segment`)."""
    from medfound.infer.batch import run_batch

    if not support.is_dir():
        raise InputError(support, "no such example set folder")
    options = {"support": str(support.resolve()), "model_run": str(model.resolve()) if model else None,
               "labels": label, "support_size": support_size, "device": device, "rtstruct": rtstruct}
    _finish(run_batch(query, output, "segment", options, push, workers, scheduler, progress=True))


@batch_app.command("predict")
def batch_predict(
    query: QueryOpt,
    output: OutOpt,
    model: Annotated[Path, typer.Option("--model", "-m", help="Fine-tuned run folder, as for `medfound predict`.")],
    rtstruct: RtstructOpt = False,
    push: PushOpt = False,
    workers: WorkersOpt = 1,
    scheduler: SchedulerOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """A fine-tuned model on every series the query finds (as `medfound predict`)."""
    from medfound.infer.batch import run_batch

    if not (model / "config.json").is_file():
        raise InputError(model, "not a fine-tuned run folder (no config.json)")
    options = {"model": str(model.resolve()), "device": device, "rtstruct": rtstruct}
    _finish(run_batch(query, output, "predict", options, push, workers, scheduler, progress=True))

"""`medfound serve` (the web viewer) and `medfound demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.cli.common import DeviceOpt, app
from medfound.errors import InputError


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1 keeps it on this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workdir: Annotated[Optional[Path], typer.Option(help="Folder for uploaded studies and example sets (default: a new temporary folder).")] = None,
    support: Annotated[Optional[list[Path]], typer.Option("--support", help="nnU-Net example set offered on the page; repeat.")] = None,
    model: Annotated[Optional[list[Path]], typer.Option("--model", "-m", help="Fine-tuned segmenter run offered on the page; repeat.")] = None,
    sam: Annotated[Optional[str], typer.Option("--sam-model", help="SAM for box/point prompts: litemedsam, litemedsam-adapted, litemedsam-lora, a `sam train` or `sam finetune` run, an official .pth, or a variant name (default: the small SAM shipped with medfound).")] = None,
    incontext_model: Annotated[Optional[Path], typer.Option(help="In-context run (default: the shipped model).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload (refused from its Content-Length, never read in full).")] = 512,
    max_voxels: Annotated[int, typer.Option(help="Largest image accepted, in voxels (checked from the header where the format has one).")] = 100_000_000,
    memory_mb: Annotated[float, typer.Option(help="Memory budget of all open studies (images, masks, undo); uploads beyond it are refused.")] = 4096,
    idle_minutes: Annotated[float, typer.Option(help="Close a study (and remove its files) after this long without a request.")] = 60,
    pacs: Annotated[Optional[str], typer.Option("--pacs", help="DICOMweb service root (dicomweb+http://HOST:PORT/dicom-web) whose studies the page may list and open; credentials from the environment or netrc.")] = None,
    device: DeviceOpt = "auto",
    sam_flip: Annotated[Optional[bool], typer.Option("--sam-flip/--no-sam-flip", help="Average each SAM answer with its answer on the mirrored slice (twice the cost; on the validation structures it helps a click alone and leaves a box as it is; default: the SAM's own setting).")] = None,
) -> None:
    """Web viewer: scroll a study, prompt SAM, segment from an example set, download the mask.

    The page answers only to the host it is bound to, and state-changing requests must carry the
    page's token, so other web pages cannot upload to it or read from it. A temporary work folder is
    removed when the server stops (a --workdir is kept)."""
    import math
    import tempfile

    import uvicorn

    from medfound.data.nnunet import NnUNetDataset
    from medfound.device import inference_device
    from medfound.viewer.app import create_app

    if pacs is not None:
        from medfound.io.dicomweb import parse

        ref = parse(pacs)
        if ref.study or ref.query:
            raise InputError(pacs, "--pacs takes the service root (dicomweb+http://HOST:PORT/dicom-web), not a study or query")
    if not 1 <= port <= 65535:
        raise InputError(None, f"--port must be 1..65535, got {port}")
    dev = inference_device(device)
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
                      memory_mb=memory_mb, idle_minutes=idle_minutes, allowed_hosts=hosts,
                      device=dev, pacs=pacs, sam_flip=sam_flip)
    print(f"medfound viewer on http://{host}:{port}/  (studies in {work})", flush=True)
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        if workdir is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder for data, shards and report/.")] = Path("demo"),
    pretrain_steps: Annotated[int, typer.Option(help="MAE pretraining steps in the demo.")] = 300,
    finetune_steps: Annotated[int, typer.Option(help="Fine-tuning steps per run in the demo.")] = 150,
    sam_steps: Annotated[int, typer.Option(help="SAM LoRA fine-tuning steps in the demo.")] = 300,
    baseline_steps: Annotated[int, typer.Option(help="Steps of the fine-tuning baseline in the in-context support-size curve.")] = 100,
    skip: Annotated[str, typer.Option(help="Comma-separated stages to leave out of the report: "
                                      "adaptation, sam, incontext, viewer.")] = "",
) -> None:
    """Run the main job end to end on the real sample data and write a report."""
    from medfound.demo import OPTIONAL_STAGES, run_demo

    if min(pretrain_steps, finetune_steps, sam_steps, baseline_steps) < 1:
        raise InputError(None, "--pretrain-steps, --finetune-steps, --sam-steps and --baseline-steps must be >= 1")
    skipped = [s.strip() for s in skip.split(",") if s.strip()]
    unknown = [s for s in skipped if s not in OPTIONAL_STAGES]
    if unknown:
        raise InputError(None, f"--skip: no stage {unknown[0]!r} (stages that can be left out: {', '.join(OPTIONAL_STAGES)})")
    run_demo(out, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, sam_steps=sam_steps,
             baseline_steps=baseline_steps, skip=tuple(skipped))

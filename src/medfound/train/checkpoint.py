"""Lightning plumbing shared by the training commands: atomic checkpoints, precision names."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from medfound.errors import InputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file and rename it: a kill never leaves a torn .ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def lightning_precision(name: str) -> str:
    """The CLI's ``--precision`` (bf16 or 32) as Lightning names it; InputError otherwise."""
    precision = {"bf16": "bf16-mixed", "32": "32-true"}.get(str(name))
    if precision is None:
        raise InputError(None, f"--precision must be bf16 or 32, got {name!r}")
    return precision


def run_folder_checkpoint(out: Path, resume: bool) -> Path:
    """``OUT/checkpoints/last.ckpt`` after checking the run folder fits ``--resume``: resuming needs it,
    a fresh run must not overwrite it (DDP child ranks skip the check: rank 0 already made it)."""
    last = Path(out) / "checkpoints" / "last.ckpt"
    is_child = int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0
    if resume and not last.is_file():
        raise InputError(last, "nothing to resume from (no last checkpoint in the run folder)")
    if not resume and not is_child and last.is_file():
        raise InputError(out, "run folder already holds checkpoints; pass --resume to continue or choose a new --out")
    return last

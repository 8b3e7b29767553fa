"""Lightning plumbing shared by the training commands: atomic checkpoints, precision names."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightning.pytorch.plugins.io import TorchCheckpointIO

from medfound.device import native_bf16
from medfound.errors import InputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file and rename it: a kill never leaves a torn .ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def accelerator_device(accelerator: str = "auto") -> torch.device:
    """The device that Lightning's ``--accelerator`` trains on here: the GPU where one is visible and
    asked for (``auto``, ``gpu``, ``cuda``), else the CPU."""
    gpu = str(accelerator).lower() in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def training_precision(name: str, accelerator: str = "auto") -> str:
    """The training ``--precision`` (auto, bf16 or 32) resolved to bf16 or 32; InputError otherwise.
    ``auto`` is bf16 where the devices compute it natively (a GPU; a CPU with AMX or AVX512-BF16) and
    32 elsewhere: a CPU without bf16 emulates it about ten times slower than fp32."""
    name = str(name).lower()
    if name not in ("auto", "bf16", "32"):
        raise InputError(None, f"--precision must be auto, bf16 or 32, got {name!r}")
    if name != "auto":
        return name
    return "bf16" if native_bf16(accelerator_device(accelerator)) else "32"


def lightning_precision(name: str, accelerator: str = "auto") -> str:
    """The training ``--precision`` as Lightning names it (see :func:`training_precision`)."""
    return {"bf16": "bf16-mixed", "32": "32-true"}[training_precision(name, accelerator)]


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


@dataclass
class StepTrainConfig:
    """What every step-indexed many-task training run takes (``incontext train``, ``sam train``):
    the optimisation, the Lightning trainer (:func:`step_trainer`) and the data exclusions."""

    batch_size: int = 16
    max_steps: int = 2000
    synthetic_fraction: float = 0.25
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    checkpoint_every: int = 200
    max_minutes: float | None = None  # stop (and export) after this wall time even if steps remain
    exclude_labels: tuple[str, ...] = ()
    init: str | None = None  # start from this run's weights (continue or specialise a model)
    progress: bool = True
    extra: dict = field(default_factory=dict)


def step_random(key: tuple, device) -> tuple[np.random.Generator, torch.Generator]:
    """NumPy and torch random sources that are a pure function of ``key`` (seed, rank, step, ...)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
    return np.random.default_rng(key), gen


class StepIndex(torch.utils.data.Dataset):
    """The 'data' of a step is its index: batches are drawn on the device inside the step, as a pure
    function of (seed, rank, step), so ``--resume`` and DDP ranks stay exact without a sampler."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def warmup_cosine(warmup_steps: int, max_steps: int, floor: float = 0.02):
    """LambdaLR factor: linear warm-up, then cosine down to ``floor`` of the peak."""
    warm, total = max(1, warmup_steps), max(max_steps, warmup_steps + 1)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))

    return schedule


def allow_unused_parameters(strategy: str) -> str:
    """SAM's decoder has parts a step may not use (mask prompts, the multi-mask and IoU heads): DDP
    must then look for unused parameters, which Lightning names as a strategy variant."""
    return {"ddp": "ddp_find_unused_parameters_true",
            "ddp_spawn": "ddp_spawn_find_unused_parameters_true"}.get(strategy, strategy)


def step_trainer(cfg: StepTrainConfig, out: Path, strategy: str | None = None):
    """The Lightning trainer of the step-indexed many-task commands (``incontext train``, ``sam
    train``): max steps and optional wall-time limit, atomic checkpoints every ``checkpoint_every``
    steps plus ``last.ckpt``, CSV logs, gradient clipping; batches come from :class:`StepIndex`."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                     strategy=strategy or cfg.strategy, precision=lightning_precision(cfg.precision, cfg.accelerator),
                     max_steps=cfg.max_steps, max_epochs=None,
                     max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
                     callbacks=[ModelCheckpoint(dirpath=Path(out) / "checkpoints", filename="step{step:08d}",
                                                auto_insert_metric_name=False, every_n_train_steps=cfg.checkpoint_every,
                                                save_last=True, save_top_k=1)],
                     logger=CSVLogger(save_dir=str(out), name="logs", version=""), plugins=[AtomicCheckpointIO()],
                     use_distributed_sampler=False, enable_progress_bar=cfg.progress, log_every_n_steps=10,
                     enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0)


def fit_by_steps(trainer, module, out: Path, summary: dict, max_steps: int, last: Path, resume: bool) -> float:
    """Write the data summary (rank 0), fit on step indices (resuming from ``last`` when asked) and
    return the wall time in seconds."""
    import json
    import time

    from medfound.io.atomic import write_text

    if trainer.is_global_zero:
        write_text(Path(out) / "data_summary.json", json.dumps(summary, indent=2))
    loader = torch.utils.data.DataLoader(StepIndex(max_steps), batch_size=None, shuffle=False)
    t0 = time.time()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if resume else None)
    return round(time.time() - t0, 1)


def device_name(trainer) -> str:
    """What the run trained on, for configs: the GPU's name, or cpu."""
    device = str(trainer.strategy.root_device)
    return torch.cuda.get_device_name(trainer.strategy.root_device) if device.startswith("cuda") else device

"""Training the completion refiner on same-study episodes (``medfound incontext train-completion``).

Each step draws a batch from the episode bank (``data.completion_episodes``) as a pure function of
(seed, rank, step), augments it (quarter turns and flips of the window, the labelled slices below and
above swapped, a random gamma on the images) and minimises BCE + Dice on the true mask. The run
folder is the other training commands' (``checkpoints/``, ``logs/metrics.csv``, ``data_summary.json``)
with ``model.safetensors`` + ``config.json`` at the end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from medfound.data.completion_episodes import CompletionBank, build_completion_bank
from medfound.data.completion_inputs import CHANNELS
from medfound.errors import InputError
from medfound.models.completion_refiner import (
    CompletionRefiner,
    RefinerConfig,
    save_refiner,
)
from medfound.models.lora import count_parameters
from medfound.train.checkpoint import (
    StepTrainConfig,
    device_name,
    fit_by_steps,
    run_folder_checkpoint,
    step_random,
    step_trainer,
    training_precision,
    warmup_cosine,
)

_SWAP = [CHANNELS.index(c) for c in ("image", "image_above", "mask_above", "image_below", "mask_below",
                                     "prior", "t", "beyond")]
_IMAGES = [CHANNELS.index(c) for c in ("image", "image_below", "image_above")]


@dataclass
class CompletionTrainConfig(StepTrainConfig):
    size: int = 96
    episodes_per_structure: int = 6
    samples_per_episode: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    precision: str = "32"


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quarter turn and flip for the whole batch; per sample, below and above swapped (the
    gap fraction becomes 1 - t; not beyond the ends, where both are the outermost slice) and a gamma."""
    dev = x.device
    k = int(torch.randint(4, (1,), generator=gen, device=dev))
    x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (1, 2))
    if bool(torch.rand(1, generator=gen, device=dev) < 0.5):
        x, y = x.flip(3), y.flip(2)
    t, beyond = CHANNELS.index("t"), CHANNELS.index("beyond")
    swapped = x[:, _SWAP].clone()
    swapped[:, t] = 1 - x[:, t]
    swap = (torch.rand(x.shape[0], generator=gen, device=dev) < 0.5) & (x[:, beyond, 0, 0] == 0)
    x = torch.where(swap[:, None, None, None], swapped, x)
    gamma = torch.exp(0.25 * torch.randn(x.shape[0], 1, 1, 1, generator=gen, device=dev))
    x[:, _IMAGES] = x[:, _IMAGES].clamp(0, None) ** gamma
    return x, y


def refiner_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice per sample, averaged); a sample without the structure scores its Dice as 1
    when nothing is predicted (the +1 smoothing)."""
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


class CompletionModule(L.LightningModule):
    def __init__(self, cfg: dict, bank: CompletionBank):
        super().__init__()
        self.save_hyperparameters(ignore=["bank"])
        self.cfg = cfg
        self.net = CompletionRefiner(RefinerConfig(size=cfg["size"]))
        self.bank = bank
        self.last_loss = float("nan")

    def training_step(self, batch, batch_idx):
        rank = self.trainer.global_rank if self._trainer is not None else 0
        _, gen = step_random((self.cfg["seed"], rank, int(self.global_step)), "cpu")
        idx = torch.randint(self.bank.inputs.shape[0], (self.cfg["batch_size"],), generator=gen)
        x, y = augment(self.bank.inputs[idx].float(), self.bank.targets[idx].float(), gen)
        x, y = x.to(self.device), y.to(self.device)
        loss = refiner_loss(self.net(x).float(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        self.last_loss = float(loss.detach())
        if not self.cfg["progress"] and self.global_rank == 0 and self.global_step % 100 == 0:
            self._t0 = getattr(self, "_t0", time.time())
            print(f"step {self.global_step}/{self.cfg['max_steps']} loss {self.last_loss:.4f} "
                  f"{time.time() - self._t0:.0f} s", flush=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.cfg["lr"], weight_decay=self.cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.cfg["warmup_steps"], self.cfg["max_steps"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run_completion_train(datasets: list[str], out: str | os.PathLike, cfg: CompletionTrainConfig,
                         resume: bool = False, bank: None = None) -> dict:
    """Train the completion refiner; returns its config (also ``OUT/config.json``). Episodes are
    drawn from the datasets at the start (``bank`` is the slice-bank option of the other training
    commands, which this one does not take)."""
    if bank is not None:
        raise InputError(None, "completion training reads --datasets (a slice bank holds no volumes)")
    out = Path(out)
    if cfg.size % 16 or not 32 <= cfg.size <= 256:
        raise InputError(None, f"--size must be a multiple of 16 between 32 and 256, got {cfg.size}")
    for d in datasets:
        if not Path(d).is_dir():
            raise InputError(d, "no such dataset folder")
    last = run_folder_checkpoint(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    episodes = build_completion_bank(datasets, cfg.size, cfg.episodes_per_structure, cfg.samples_per_episode,
                                 exclude_labels=cfg.exclude_labels, seed=cfg.seed, progress=cfg.progress)
    summary = episodes.summary() | {"exclude_labels": list(cfg.exclude_labels)}
    trainer = step_trainer(cfg, out)
    params = vars(cfg) | {"exclude_labels": list(cfg.exclude_labels)}
    module = CompletionModule(params, episodes)
    seconds = fit_by_steps(trainer, module, out, summary, cfg.max_steps, last, resume)
    config = {}
    if trainer.is_global_zero:
        config = {
            "parameters": count_parameters(module.net)[1],
            "inputs": list(CHANNELS),
            "training": {"steps": int(trainer.global_step), "final_loss": module.last_loss,
                         "global_batch": cfg.batch_size * trainer.world_size, "lr": cfg.lr,
                         "precision": training_precision(cfg.precision, cfg.accelerator),
                         "world_size": trainer.world_size, "seconds": seconds,
                         "device": device_name(trainer), "datasets": summary["datasets"],
                         "exclude_labels": list(cfg.exclude_labels),
                         "heldout_rule": "DESIGN.md held-out structures are never episodes"},
            "command": cfg.extra.get("command"),
            "data": summary,
        }
        save_refiner(module.net.cpu(), out, config)
    return config

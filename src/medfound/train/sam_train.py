"""Train a small promptable SAM from scratch on many tasks (``medfound sam train``).

Each step draws (slice, structure) pairs from the slice bank the in-context path uses (every
non-held-out label of every dataset, all slice axes) plus synthetic shape tasks, augments them
(geometry, contrast curves, bias, noise), zooms a share of them onto the structure (so the model
sees structures at the scale a box crop gives them at inference), and simulates a prompt per sample:
a jittered box or a few inside/outside points, followed on half of them by one corrective click as
an interactive user would give. Loss: Dice + BCE. Batches are a pure function of (seed, rank, step),
so ``--resume`` and DDP are exact, as in ``medfound incontext train``.

Held-out structures (DESIGN.md) are erased from the bank before any sample is drawn: a box around a
thalamus at inference is a structure this model never saw.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medfound.data.episodes import (SliceBank, augment_episodes, build_bank, cat_episodes, sample_episodes,
                                    synthetic_episodes)
from medfound.data.prompts import correction_point, jittered_box, sample_points
from medfound.errors import InputError
from medfound.models.sam import append_point, decode, sam_view, to_sam_input
from medfound.models.sam_conv import SamConvConfig, build_sam_conv, load_sam_conv, save_sam_conv
from medfound.train.checkpoint import (StepTrainConfig, allow_unused_parameters, device_name, fit_by_steps,
                                       run_folder_checkpoint, step_random, step_trainer, training_precision,
                                       warmup_cosine)


@dataclass
class SamTrainConfig(StepTrainConfig):
    batch_size: int = 32
    max_steps: int = 3000
    synthetic_fraction: float = 0.2
    image_size: int = 128
    widths: tuple[int, ...] = (32, 48, 64, 96, 128)
    prompt_dim: int = 64
    p_point: float = 0.3       # share of samples prompted with points instead of a box
    p_zoom: float = 0.5        # share of samples cropped around their structure
    p_correction: float = 0.5  # share of samples that get one corrective click

    def model_config(self) -> SamConvConfig:
        return SamConvConfig(image_size=self.image_size, widths=tuple(self.widths), prompt_dim=self.prompt_dim)


def zoom_to_structure(img: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a share ``p`` of (B, 1, S, S) samples to a square around their mask, 1.3-3x its size,
    and resample it to S: the view a box crop gives at inference."""
    b, _, s, _ = img.shape
    dev = img.device
    rows, cols = mask[:, 0].amax(2) > 0, mask[:, 0].amax(1) > 0  # (B, S) over i and j
    has = rows.any(1)
    ar = torch.arange(s, device=dev, dtype=torch.float32)
    big = torch.tensor(float(s), device=dev)
    i0 = torch.where(rows, ar, big).amin(1)
    i1 = torch.where(rows, ar, -big).amax(1)
    j0 = torch.where(cols, ar, big).amin(1)
    j1 = torch.where(cols, ar, -big).amax(1)
    u = lambda: torch.rand(b, generator=generator, device=dev)  # noqa: E731
    side = torch.maximum(i1 - i0, j1 - j0).clamp(min=4) * (1.3 + 1.7 * u())
    side = side.clamp(min=s // 4, max=s)  # at most 4x upsampling of the bank slice
    ci = (i0 + i1) / 2 + (u() - 0.5) * 0.2 * side
    cj = (j0 + j1) / 2 + (u() - 0.5) * 0.2 * side
    zoom = has & (u() < p)
    scale = torch.where(zoom, side / s, torch.ones_like(side))
    cx = torch.where(zoom, (2 * cj + 1) / s - 1, torch.zeros_like(cj))  # affine_grid x runs along j (width)
    cy = torch.where(zoom, (2 * ci + 1) / s - 1, torch.zeros_like(ci))
    zero = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([scale, zero, cx], 1), torch.stack([zero, scale, cy], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, s, s), align_corners=False)
    both = F.grid_sample(torch.cat([img, mask], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return both[:, :1], (both[:, 1:] > 0.5).float()


def simulate_prompt(mask: np.ndarray, p_point: float, rng: np.random.Generator):
    """(boxes (1, 4) or None, points ((1, n, 2), (1, n)) or None) in SAM's (x, y) = our (i, j); the
    box jitter scales with the structure (about 10 % of its size, as MedSAM's 0-20 px on 1024 px)."""
    if rng.random() >= p_point:
        xs, ys = np.nonzero(mask)
        shift = 1 + int(0.1 * max(xs.max() - xs.min(), ys.max() - ys.min()))
        return torch.from_numpy(jittered_box(mask, rng, max_shift=shift))[None], None
    pts, lab = sample_points(mask, int(rng.integers(1, 4)), int(rng.integers(0, 3)), rng)
    return None, (torch.from_numpy(pts)[None], torch.from_numpy(lab)[None])


class SamTrainModule(L.LightningModule):
    def __init__(self, cfg: dict, bank: SliceBank):
        super().__init__()
        self.save_hyperparameters(ignore=["bank"])
        self.cfg = cfg
        self.sam = build_sam_conv(SamConvConfig.from_dict(cfg["model"]))
        self.loss = DiceCELoss(sigmoid=True)
        self.bank_cpu = bank
        self.bank: SliceBank | None = None
        self.last_loss = float("nan")

    def on_fit_start(self) -> None:
        self.bank = self.bank_cpu.to(self.device)

    def samples(self, step: int, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 1, S, S), masks (B, 1, S, S)) of step ``step`` on this rank (deterministic)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        rng, gen = step_random((self.cfg["seed"], rank, step, 7), self.device)
        b = batch or self.cfg["batch_size"]
        n_syn = int(round(b * self.cfg["synthetic_fraction"]))
        ep = sample_episodes(self.bank, b - n_syn, 1, rng, p_negative=0.0, p_merge=0.05, p_drop_position=1.0)
        if n_syn:
            ep = cat_episodes(ep, synthetic_episodes(n_syn, 1, self.cfg["model"]["image_size"], gen, self.device))
        ep = augment_episodes(ep, gen)
        return zoom_to_structure(ep.query, ep.query_mask, gen, self.cfg["p_zoom"])

    def training_step(self, batch, batch_idx):
        step = int(self.global_step)
        x, masks = self.samples(step)
        rng = np.random.default_rng((self.cfg["seed"], step, 11))
        emb = self.sam.image_encoder(to_sam_input(sam_view(x)))  # (B, D, S/4, S/4)
        s, dev = x.shape[-1], x.device
        losses = []
        for b in range(x.shape[0]):
            m = masks[b, 0].cpu().numpy() > 0
            if m.sum() < 4:  # the structure left the view under augmentation
                continue
            boxes, points = simulate_prompt(m, self.cfg["p_point"], rng)
            boxes = boxes.to(dev) if boxes is not None else None
            points = tuple(t.to(dev) for t in points) if points is not None else None
            logits = sam_view(decode(self.sam, emb[b:b + 1], boxes, points, s))
            target = masks[b:b + 1]
            losses.append(self.loss(logits.float(), target))
            if rng.random() < self.cfg["p_correction"]:
                click = correction_point((logits[0, 0] > 0).detach().cpu().numpy(), m, rng)
                if click is not None:
                    pts = append_point(points, click[0], click[1], dev)
                    logits2 = sam_view(decode(self.sam, emb[b:b + 1], boxes, pts, s))
                    losses.append(self.loss(logits2.float(), target))
        loss = torch.stack(losses).mean() if losses else emb.sum() * 0
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        self.last_loss = float(loss.detach())
        if not self.cfg["progress"] and self.global_rank == 0 and step % 50 == 0:
            if step == 0 or not hasattr(self, "_t0"):
                self._t0 = time.time()
            print(f"step {step}/{self.cfg['max_steps']} loss {self.last_loss:.4f} {time.time() - self._t0:.0f} s", flush=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.sam.parameters(), lr=self.cfg["lr"], weight_decay=self.cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.cfg["warmup_steps"], self.cfg["max_steps"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def save_prompt_preview(module: SamTrainModule, path: Path, n: int = 6) -> Path:
    """Image + box / truth / prediction for a few fresh samples."""
    import matplotlib.pyplot as plt

    from medfound.io.figures import overlay, save_figure

    sam = module.sam.eval()
    x, masks = module.samples(10 ** 9, batch=n)
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(n, 2, figsize=(4, 2 * n), squeeze=False)
    emb = sam.image_encoder(to_sam_input(sam_view(x)))
    for r in range(n):
        m = masks[r, 0].numpy() > 0
        pred = np.zeros_like(m)
        if m.sum() >= 4:
            boxes, points = simulate_prompt(m, 0.0, rng)
            pred = (sam_view(decode(sam, emb[r:r + 1], boxes, points, x.shape[-1]))[0, 0] > 0).numpy()
        for c, (lab, title) in enumerate(((m, "truth"), (pred, "box prompt -> mask"))):
            overlay(axes[r][c], x[r, 0].float().numpy(), lab.astype(np.uint8))
            axes[r][c].set_title(title, fontsize=7)
    return save_figure(fig, path)


def run_sam_train(datasets: list[str], out: str | os.PathLike, cfg: SamTrainConfig, resume: bool = False,
                  bank: SliceBank | None = None) -> dict:
    """Train the conv SAM; returns its config (also ``OUT/config.json``)."""
    out = Path(out)
    if cfg.image_size % 32 or not 64 <= cfg.image_size <= 512:
        raise InputError(None, f"--image-size must be a multiple of 32 between 64 and 512, got {cfg.image_size}")
    for name, v in (("--synthetic-fraction", cfg.synthetic_fraction), ("--point-fraction", cfg.p_point),
                    ("--zoom-fraction", cfg.p_zoom)):
        if not 0 <= v <= 1:
            raise InputError(None, f"{name} must be between 0 and 1")
    last = run_folder_checkpoint(out, resume)
    for d in datasets:
        if not Path(d).is_dir():
            raise InputError(d, "no such dataset folder")
    if bank is not None and bank.images.shape[-1] != cfg.image_size:
        raise InputError(None, f"the bank holds {bank.images.shape[-1]} px slices; pass --image-size {bank.images.shape[-1]}")
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    bank = bank or build_bank(datasets, cfg.image_size, exclude_labels=cfg.exclude_labels, progress=cfg.progress)
    summary = bank.summary() | {"exclude_labels": list(cfg.exclude_labels)}
    trainer = step_trainer(cfg, out, allow_unused_parameters(cfg.strategy))
    params = vars(cfg) | {"model": cfg.model_config().as_dict(), "widths": list(cfg.widths),
                          "exclude_labels": list(cfg.exclude_labels)}
    module = SamTrainModule(params, bank)
    if cfg.init and not resume:
        init_sam, init_cfg = load_sam_conv(cfg.init)
        if init_cfg["model"] != params["model"]:
            raise InputError(cfg.init, "--init model has another architecture than this run")
        module.sam.load_state_dict(init_sam.state_dict())
    seconds = fit_by_steps(trainer, module, out, summary, cfg.max_steps, last, resume)
    config = {}
    if trainer.is_global_zero:
        device = device_name(trainer)
        config = {
            "normalisation": "medfound.data.normalize per modality (CT windows; MR/PET foreground percentiles)",
            "parameters": sum(p.numel() for p in module.sam.parameters()),
            # a box is answered on a crop this many times its size (training zooms cover 1.3-3x)
            "inference": {"box_zoom": 2.0},
            "prompts": {"box_jitter": "about 10 % of the structure size", "point_fraction": cfg.p_point,
                        "zoom_fraction": cfg.p_zoom, "correction_fraction": cfg.p_correction},
            "training": {"steps": int(trainer.global_step), "final_loss": module.last_loss,
                         "global_batch": cfg.batch_size * trainer.world_size, "lr": cfg.lr,
                         "precision": training_precision(cfg.precision, cfg.accelerator),
                         "world_size": trainer.world_size, "seconds": seconds, "device": device,
                         "datasets": summary["datasets"], "exclude_labels": list(cfg.exclude_labels),
                         "heldout_rule": "DESIGN.md held-out structures are never trained on",
                         "synthetic_fraction": cfg.synthetic_fraction, "init": str(cfg.init) if cfg.init else None},
            "command": cfg.extra.get("command"),
            "data": summary,
        }
        module.cpu()
        module.bank = module.bank_cpu
        save_prompt_preview(module, out / "previews" / "prompts.png")
        save_sam_conv(module.sam, cfg.model_config(), out, config)
    return config

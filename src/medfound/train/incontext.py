"""Many-task episodic training of the in-context segmenter (``medfound incontext train``).

Each step draws a batch of episodes (a task, a query slice, a support set of random size) from the
slice bank on the training device plus a share of synthetic shape tasks, augments them batched, and
minimises BCE + Dice on the query mask. Episodes are a pure function of (seed, rank, global step), so
``--resume`` continues the exact episode stream and DDP ranks never draw the same episodes.

The run folder mirrors pretraining: ``checkpoints/`` (atomic, ``last.ckpt``), ``logs/metrics.csv``,
``previews/``, ``data_summary.json`` and, at the end, ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from medfound.data.episodes import (SliceBank, augment_episodes, build_bank, cat_episodes, episode_loss,
                                    sample_episodes, synthetic_episodes, zoom_episodes)
from medfound.errors import InputError
from medfound.models.incontext import InContextConfig, InContextSegmenter, load_shared_weights
from medfound.models.incontext_weights import save_incontext
from medfound.models.lora import count_parameters as count_trainable
from medfound.models.tinyvit import TINYVIT_ENCODERS
from medfound.train.checkpoint import (StepTrainConfig, device_name, fit_by_steps, run_folder_checkpoint, step_random,
                                      step_trainer, training_precision, warmup_cosine)

SUPPORT_SIZES = (1, 2, 4, 8, 12, 16)


@dataclass
class InContextTrainConfig(StepTrainConfig):
    size: int = 128
    widths: tuple[int, ...] = (16, 32, 48, 64)
    support_sizes: tuple[int, ...] = SUPPORT_SIZES
    p_negative: float = 0.3  # share of queries where the label is absent (near the structure or anywhere)
    encoder: str = "conv"    # "conv", "litemedsam" (its TinyViT), or an MAE run folder: frozen, LoRA adapters
    lora_rank: int = 4
    zoom_fraction: float = 0.0  # share of real episodes cut to a window around the task at 2-3x (bank at 2x size)
    cross_subject_fraction: float = 0.0  # share of real episodes with supports and query from different subjects

    @property
    def bank_size(self) -> int:
        """Zoomed episodes are cut from a bank at twice the working size."""
        return self.size * (2 if self.zoom_fraction > 0 else 1)


def build_incontext_net(cfg: dict) -> InContextSegmenter:
    """A fresh in-context net for a training config: the conv encoder, or the MAE run's ViT (its
    pretrained weights loaded before the LoRA adapters go in)."""
    encoder = cfg.get("encoder", "conv")
    if encoder == "conv":
        return InContextSegmenter(InContextConfig(size=cfg["size"], widths=tuple(cfg["widths"])))
    if encoder in TINYVIT_ENCODERS:  # LiteMedSAM's TinyViT (random for scratch), LoRA
        from medfound.models.tinyvit_unet import litemedsam_encoder

        tiny, _ = litemedsam_encoder(cfg["size"], pretrained=encoder == "litemedsam")
        config = InContextConfig(size=cfg["size"], widths=tuple(cfg["widths"]), encoder="litemedsam",
                                 vit=tiny.tinyvit.cfg.as_dict(), lora_rank=int(cfg.get("lora_rank", 4)))
        return InContextSegmenter(config, tiny.tinyvit)
    from medfound.models.export import load_encoder

    vit, enc_cfg = load_encoder(encoder)
    config = InContextConfig(size=cfg["size"], widths=tuple(cfg["widths"]), encoder="mae",
                             vit=enc_cfg["architecture"], lora_rank=int(cfg.get("lora_rank", 4)))
    try:
        return InContextSegmenter(config, vit)
    except ValueError as e:
        raise InputError(encoder, str(e)) from None


class InContextModule(L.LightningModule):
    def __init__(self, cfg: dict, bank: SliceBank):
        super().__init__()
        self.save_hyperparameters(ignore=["bank"])
        self.cfg = cfg
        self.net = build_incontext_net(cfg)
        self.bank_cpu = bank
        self.bank: SliceBank | None = None
        self.last_loss = float("nan")

    def on_fit_start(self) -> None:
        self.bank = self.bank_cpu.to(self.device)

    def episodes(self, step: int, batch: int | None = None):
        """The batch of step ``step`` on this rank (deterministic)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        rng, gen = step_random((self.cfg["seed"], rank, step), self.device)
        sizes = self.cfg["support_sizes"]
        n = int(sizes[rng.integers(len(sizes))])
        b = batch or self.cfg["batch_size"]
        n_syn = int(round(b * self.cfg["synthetic_fraction"]))
        ep = sample_episodes(self.bank, b - n_syn, n, rng, p_negative=self.cfg.get("p_negative", 0.3),
                             p_cross=self.cfg.get("cross_subject_fraction", 0.0))
        if self.cfg.get("zoom_fraction", 0.0) > 0:
            ep = zoom_episodes(ep, self.cfg["size"], gen, self.cfg["zoom_fraction"])
        if n_syn:
            ep = cat_episodes(ep, synthetic_episodes(n_syn, n, self.cfg["size"], gen, self.device))
        return augment_episodes(ep, gen)

    def training_step(self, batch, batch_idx):
        ep = self.episodes(int(self.global_step))
        logits = self.net(ep.query, ep.support, ep.support_mask, ep.query_pos, ep.support_pos)
        loss = episode_loss(logits, ep.query_mask)
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        self.last_loss = float(loss.detach())
        if not self.cfg["progress"] and self.global_rank == 0 and self.global_step % 100 == 0:
            if self.global_step == 0:
                self._t0 = time.time()
            print(f"step {self.global_step}/{self.cfg['max_steps']} loss {self.last_loss:.4f} "
                  f"{time.time() - self._t0:.0f} s", flush=True)
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.net.parameters() if p.requires_grad]  # a pretrained ViT stays frozen (LoRA)
        opt = torch.optim.AdamW(trainable, lr=self.cfg["lr"], weight_decay=self.cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.cfg["warmup_steps"], self.cfg["max_steps"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def save_episode_preview(net: InContextSegmenter, module: InContextModule, path: Path, n: int = 6) -> Path:
    """Query / truth / prediction / first support for a few fresh episodes."""
    import matplotlib.pyplot as plt

    from medfound.io.figures import overlay, save_figure

    net.eval()
    with torch.no_grad():
        ep = module.episodes(10 ** 9, batch=n)
        k = min(n, ep.query.shape[0])
        pred = torch.sigmoid(net(ep.query[:k], ep.support[:k], ep.support_mask[:k], ep.query_pos[:k],
                                 ep.support_pos[:k])) > 0.5
    fig, axes = plt.subplots(k, 3, figsize=(6, 2 * k), squeeze=False)
    for r in range(k):
        for c, (img, lab, title) in enumerate(((ep.support[r, 0, 0], ep.support_mask[r, 0, 0], "support 1"),
                                               (ep.query[r, 0], ep.query_mask[r, 0], "query truth"),
                                               (ep.query[r, 0], pred[r, 0], "prediction"))):
            overlay(axes[r][c], img.float().cpu().numpy(), lab.cpu().numpy().astype(np.uint8))
            axes[r][c].set_title(title, fontsize=7)
    return save_figure(fig, path)


def run_incontext_train(datasets: list[str], out: str | os.PathLike, cfg: InContextTrainConfig,
                        resume: bool = False, bank: SliceBank | None = None) -> dict:
    """Train the in-context segmenter; returns its config (also ``OUT/config.json``)."""
    out = Path(out)
    if cfg.size % 8 or not 32 <= cfg.size <= 512:
        raise InputError(None, f"--size must be a multiple of 8 between 32 and 512, got {cfg.size}")
    if not 0 <= cfg.synthetic_fraction <= 1:
        raise InputError(None, "--synthetic-fraction must be between 0 and 1")
    if not cfg.support_sizes or min(cfg.support_sizes) < 1 or max(cfg.support_sizes) > 64:
        raise InputError(None, "--support-sizes must be between 1 and 64")
    last = run_folder_checkpoint(out, resume)
    for d in datasets:
        if not Path(d).is_dir():
            raise InputError(d, "no such dataset folder")
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if not 0 <= cfg.zoom_fraction <= 1:
        raise InputError(None, "--zoom-fraction must be between 0 and 1")
    if not 0 <= cfg.cross_subject_fraction <= 1:
        raise InputError(None, "--cross-subject-fraction must be between 0 and 1")
    bank = bank or build_bank(datasets, cfg.bank_size, exclude_labels=cfg.exclude_labels, progress=cfg.progress)
    if bank.images.shape[-1] != cfg.bank_size:
        raise InputError(None, f"the slice bank is at {bank.images.shape[-1]} px; this run needs {cfg.bank_size} "
                         f"(--size {cfg.size}{', twice that for --zoom-fraction' if cfg.zoom_fraction > 0 else ''})")
    summary = bank.summary() | {"exclude_labels": list(cfg.exclude_labels)}

    trainer = step_trainer(cfg, out)
    params = vars(cfg) | {"widths": list(cfg.widths), "support_sizes": list(cfg.support_sizes),
                          "exclude_labels": list(cfg.exclude_labels)}
    module = InContextModule(params, bank)
    inherited, carried = None, None
    if cfg.init:  # also on --resume: the run's config keeps what it inherited
        from medfound.models.incontext_weights import load_incontext

        init_net, init_cfg = load_incontext(cfg.init)
        if init_net.config.encoder != module.net.config.encoder:
            # another encoder (a conv model starting a GMISeg one): attention and decoder carry over
            try:
                copied = load_shared_weights(module.net, init_net)
            except ValueError as e:
                raise InputError(cfg.init, f"--init model: {e}") from None
            carried = f"{copied} tensors (attention, decoder, full-resolution stem) of a {init_net.config.encoder}-encoder model"
        elif init_net.config.as_dict() | {"extra": {}} != module.net.config.as_dict() | {"extra": {}}:
            raise InputError(cfg.init, "--init model has another architecture (size/widths) than this run")
        elif not resume:
            module.net.load_state_dict(init_net.state_dict())
        # the inference knobs (gate, registration, refinement) belong to the pipeline the --init model
        # was validated in; a continued model starts from them rather than from bare defaults
        inherited = init_cfg.get("inference")
    seconds = fit_by_steps(trainer, module, out, summary, cfg.max_steps, last, resume)
    config = {}
    if trainer.is_global_zero:
        device = device_name(trainer)
        trainable, total = count_trainable(module.net)
        config = {
            "image_size": cfg.size,
            "normalisation": "medfound.data.normalize per modality (CT windows; MR/PET foreground percentiles)",
            "parameters": total,
            "trainable_parameters": trainable,
            "encoder": "conv" if cfg.encoder == "conv" else
            {("base" if cfg.encoder in TINYVIT_ENCODERS else "mae_run"): str(cfg.encoder),
             "lora_rank": cfg.lora_rank},
            "training": {"steps": int(trainer.global_step), "final_loss": module.last_loss,
                         "global_batch": cfg.batch_size * trainer.world_size, "support_sizes": list(cfg.support_sizes),
                         "synthetic_fraction": cfg.synthetic_fraction, "lr": cfg.lr,
                         "precision": training_precision(cfg.precision, cfg.accelerator),
                         "world_size": trainer.world_size, "seconds": seconds, "device": device,
                         "datasets": summary["datasets"], "exclude_labels": list(cfg.exclude_labels),
                         "heldout_rule": "DESIGN.md held-out structures are never tasks",
                         "init": str(cfg.init) if cfg.init else None, "p_negative": cfg.p_negative,
                         "zoom_fraction": cfg.zoom_fraction, "cross_subject_fraction": cfg.cross_subject_fraction},
            "command": cfg.extra.get("command"),
            "data": summary,
        }
        if carried:
            config["training"]["init_carried"] = carried
        if inherited:
            config["inference"] = inherited | {"inherited_from": str(cfg.init)}
        module.cpu()  # the preview runs where the module now is; the bank follows it
        module.bank = module.bank_cpu
        save_episode_preview(module.net, module, out / "previews" / "episodes.png")
        save_incontext(module.net, out, config)
    return config

"""Fine-tuning a (pretrained or scratch) ViT-UNETR on a labeled nnU-Net dataset with few labels.

Modes: ``full`` (everything trains; the encoder at ``encoder_lr_scale`` x the decoder's rate, after
``encoder_warmup`` steps frozen), ``linear`` (encoder frozen: the decoder alone) and ``lora`` (rank-r
adapters on the encoder's attention - a TinyViT's ``lora_stages``, 2-3 by default - the decoder
trains). Validation Dice on held-back *cases* picks the exported weights; test data never enters
this function.

The encoder is a ViT (MAE run, scratch, SAM's) under UNETR, or LiteMedSAM's TinyViT under a U-Net
decoder on its feature pyramid. A frozen TinyViT (``linear``) embeds each training and validation
slice once and the decoder trains on those features, without augmentation: its full-resolution first
stage makes it slow to run at every step on a CPU. With LoRA on its stages 2-3 only the
frozen stages before them are run once per slice the same way, and each step runs stages 2-3.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader, Dataset

from medfound.data.labeled import SliceDataset, case_slices, label_lut, split_cases, training_classes
from medfound.data.nnunet import NnUNetDataset
from medfound.errors import InputError
from medfound.models.lora import count_parameters
from medfound.models.segmenter import adapt_encoder, encoder_for, save_segmenter, segmenter_for, size_multiple
from medfound.train.checkpoint import AtomicCheckpointIO, accelerator_device, lightning_precision, training_precision


@dataclass
class FinetuneConfig:
    mode: str = "full"
    rank: int = 4
    lora_stages: tuple[int, ...] | None = None  # a TinyViT's adapted stages (None: LORA_STAGES)
    label_fraction: float = 1.0
    val_fraction: float = 0.2
    seed: int = 0
    max_steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    encoder_lr_scale: float = 0.3
    encoder_warmup: int = 0
    weight_decay: float = 1e-4
    image_size: int | None = None
    axis: int = 2
    val_every: int | None = None  # None: about five validations, the last at the final step
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 1
    progress: bool = True


class SegModule(L.LightningModule):
    def __init__(self, model: nn.Module, cfg: FinetuneConfig, n_classes: int):
        super().__init__()
        self.model, self.cfg, self.n_classes = model, cfg, n_classes
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        return self.model(x)

    def on_train_batch_start(self, batch, batch_idx):
        if self.cfg.mode == "full" and self.cfg.encoder_warmup:
            frozen = self.global_step < self.cfg.encoder_warmup
            for p in self.model.encoder.parameters():
                p.requires_grad = not frozen

    def _logits(self, batch) -> torch.Tensor:
        x, y, *feats = batch  # feats: the frozen encoder (or its frozen stages) cached (FeatureCache)
        if not feats:
            return self.model(x)
        return self.model.decode_frozen(x, feats) if self.cfg.mode == "lora" else self.model.decode(x, feats)

    def training_step(self, batch, batch_idx):
        loss = self.loss(self._logits(batch), batch[1])
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._val.append((self._logits(batch).argmax(1).cpu(), batch[1][:, 0].cpu()))

    def on_validation_epoch_end(self):
        pred = torch.cat([p for p, _ in self._val])
        true = torch.cat([t for _, t in self._val])
        self._val.clear()
        dices = []
        for c in range(1, self.n_classes):
            p, t = pred == c, true == c
            if t.any() or p.any():
                dices.append(float(2 * (p & t).sum() / (p.sum() + t.sum())))
        self.log("val/dice", float(np.mean(dices)) if dices else 0.0, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        enc = [p for n, p in self.model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
        dec = [p for n, p in self.model.named_parameters() if not n.startswith("encoder.")]
        scale = 1.0 if self.cfg.mode == "lora" else self.cfg.encoder_lr_scale
        groups = [{"params": dec, "lr": self.cfg.lr}]
        if enc:
            groups.append({"params": enc, "lr": self.cfg.lr * scale})
        opt = torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)
        total, warm = self.cfg.max_steps, max(1, self.cfg.max_steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FeatureCache(Dataset):
    """(image, label, *features) with what ``encode`` returns (a frozen encoder's features, or its
    frozen stages' output) computed once per slice, in fp16.

    Features are kept in memory (about 2 MB per 128 px slice for TinyViT's stages 1-3)."""

    def __init__(self, slices: SliceDataset, encode: Callable[[torch.Tensor], list[torch.Tensor]], batch_size: int = 16,
                 what: str = "embedding slices", progress: bool = True, device: str | torch.device = "cpu"):
        from medfound.progress import Progress

        self.slices = slices
        chunks: list[list[torch.Tensor]] = []
        n = len(slices)
        with torch.no_grad(), Progress(what, n, enabled=progress) as bar:
            for i in range(0, n, batch_size):
                x = torch.stack([slices[j][0] for j in range(i, min(n, i + batch_size))]).to(device)
                chunks.append([f.half().cpu() for f in encode(x)])
                bar.advance(len(x))
        self.features = [torch.cat(level) for level in zip(*chunks)]

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int):
        x, y = self.slices[i]
        return (x, y, *(f[i] for f in self.features))


def cache_frozen(model: nn.Module, encode: Callable[[torch.Tensor], list[torch.Tensor]], train_set: Dataset,
                 val_set: Dataset, accelerator: str = "auto", progress: bool = True,
                 items: str = "slices") -> tuple[FeatureCache, FeatureCache]:
    """The training and validation sets with ``encode``'s output (what training leaves frozen) added
    to every item, computed once on the device that will train; ``model`` is back on the CPU in
    training mode afterwards, for Lightning to place."""
    device = accelerator_device(accelerator)
    model.eval().to(device)
    cached = tuple(FeatureCache(s, encode, what=f"embedding {which} {items}", progress=progress, device=device)
                   for s, which in ((train_set, "training"), (val_set, "validation")))
    model.cpu().train()
    return cached


def validation_interval(max_steps: int, every: int | None = None) -> int:
    """Steps between validations. Without `every`, about five evenly spaced validations whose last falls on
    the final step, so the best checkpoint is chosen among them and no trained steps go unvalidated."""
    if every is not None:
        return max(1, min(every, max_steps))
    fifth = max(1, max_steps // 5)
    for n in range(fifth, max(1, max_steps // 10) - 1, -1):
        if max_steps % n == 0:
            return n
    return fifth


def caches_features(model: nn.Module, cfg: FinetuneConfig) -> bool:
    """Whether training embeds each slice once: a frozen encoder with a separate decoder, or LoRA on
    a TinyViT's later stages only (what comes before them is frozen)."""
    if cfg.mode == "lora":
        return getattr(model, "first_adapted", None) is not None
    return cfg.mode == "linear" and hasattr(model, "encode")


def prepare_model(encoder_spec: str, n_classes: int, cfg: FinetuneConfig) -> tuple[nn.Module, dict]:
    encoder, enc_cfg = encoder_for(encoder_spec, cfg.image_size)
    encoder = adapt_encoder(encoder, cfg.mode, cfg.rank, cfg.lora_stages)
    torch.manual_seed(cfg.seed)
    return segmenter_for(encoder, n_classes), enc_cfg


def run_finetune(dataset: str | os.PathLike, out: str | os.PathLike, encoder: str, cfg: FinetuneConfig,
                 cases: list[str] | None = None) -> dict:
    """Fine-tune and export ``OUT/model.safetensors`` + ``OUT/config.json``; returns the config (an
    empty dict on the other ranks of a distributed run).
    ``cases`` restricts the training cases the split draws from (an experiment's test cases stay out)."""
    out = Path(out)
    ds = NnUNetDataset.open(dataset)
    classes = training_classes(ds)
    lut = label_lut(ds, classes)
    train_cases, val_cases = split_cases(cases if cases is not None else ds.cases(), cfg.label_fraction,
                                         cfg.val_fraction, cfg.seed)
    model, enc_cfg = prepare_model(encoder, len(classes) + 1, cfg)
    size = cfg.image_size or int(enc_cfg.get("image_size", 224))
    p = size_multiple(model.encoder)
    if size % p or size < 2 * p:
        raise InputError(None, f"--image-size {size} must be a multiple of {p}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rng = np.random.default_rng(cfg.seed)
    train = [case_slices(ds, c, size, lut, cfg.axis, rng=rng) for c in train_cases]
    val = [case_slices(ds, c, size, lut, cfg.axis, keep_empty=0.25, rng=np.random.default_rng(0)) for c in val_cases]
    cached = caches_features(model, cfg)
    train_set: Dataset = SliceDataset(train, augment=not cached, seed=cfg.seed)
    val_set: Dataset = SliceDataset(val, augment=False)
    workers = cfg.num_workers
    if cached:
        encode = model.encode_frozen if cfg.mode == "lora" else model.encode
        train_set, val_set = cache_frozen(model, encode, train_set, val_set, cfg.accelerator, cfg.progress)
        workers = 0  # the features are in this process's memory
    module = SegModule(model, cfg, len(classes) + 1)
    out.mkdir(parents=True, exist_ok=True)
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/dice", mode="max",
                           save_top_k=1, save_last=True)
    precision = lightning_precision(cfg.precision, cfg.accelerator)
    trainer = L.Trainer(max_steps=cfg.max_steps, val_check_interval=validation_interval(cfg.max_steps, cfg.val_every),
                        check_val_every_n_epoch=None, accelerator=cfg.accelerator, devices=cfg.devices,
                        num_nodes=cfg.num_nodes, strategy=cfg.strategy, precision=precision,
                        callbacks=[best], logger=CSVLogger(str(out), name="logs", version=""),
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=cfg.progress,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    share = len(train_set) // trainer.world_size  # each rank's slices: a full last batch only where one fits
    train_dl = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=share > cfg.batch_size,
                          num_workers=workers, persistent_workers=workers > 0)
    val_dl = DataLoader(val_set, batch_size=cfg.batch_size * 2, num_workers=0)
    t0 = time.time()
    trainer.fit(module, train_dl, val_dl)
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    trainable, total = count_parameters(model)
    enc_trainable, enc_total = count_parameters(model.encoder)
    config = {
        "kind": "segmenter",
        "architecture": model.encoder.architecture() if hasattr(model.encoder, "architecture")
        else {"type": "vit", **model.encoder.config.as_dict()},
        "encoder_config": model.encoder.config.as_dict(),
        "feature_size": 16,
        "n_classes": len(classes) + 1,
        "classes": {str(c): {"label": v, "name": n} for c, (v, n) in enumerate(sorted(classes.items()), start=1)},
        "mode": cfg.mode,
        "lora_rank": cfg.rank if cfg.mode == "lora" else None,
        "lora_stages": list(getattr(model.encoder, "lora_stages", ())) or None,
        "image_size": size,
        "axis": cfg.axis,
        "normalisation": "medfound.data.normalize by modality",
        "modality": _dataset_modality(ds),
        "encoder": {"source": encoder, "kind": enc_cfg.get("kind", "mae-encoder"), "features_cached": cached},
        "data": {"dataset": str(ds.root), "train_cases": train_cases, "val_cases": val_cases,
                 "label_fraction": cfg.label_fraction, "train_slices": int(sum(len(c.images) for c in train)),
                 "heldout_labels_excluded": ds.heldout},
        "training": {"steps": int(trainer.global_step), "seed": cfg.seed, "lr": cfg.lr, "batch_size": cfg.batch_size,
                     "world_size": trainer.world_size, "global_batch": cfg.batch_size * trainer.world_size,
                     "precision": training_precision(cfg.precision, cfg.accelerator),
                     "best_val_dice": float(best.best_model_score) if best.best_model_score is not None else None,
                     "trainable_parameters": trainable, "total_parameters": total,
                     "encoder_trainable_parameters": enc_trainable, "encoder_parameters": enc_total,
                     "seconds": round(time.time() - t0, 1)},
    }
    if not trainer.is_global_zero:
        return {}  # rank 0 alone exports and reports
    save_segmenter(model, out, config)
    return config


def _dataset_modality(ds: NnUNetDataset) -> str | None:
    """The modality the model was trained on, when all its cases share one (not 'mixed')."""
    from medfound.io.image import canonical_modality, is_known_modality

    mods = {ds.case_modality(c) for c in ds.cases()}
    if len(mods) != 1:
        return None
    m = mods.pop()
    return canonical_modality(m) if is_known_modality(m) else None

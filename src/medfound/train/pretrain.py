"""MAE pretraining with Lightning: one CPU to many GPUs and nodes (DDP), bf16, resumable.

``run_pretrain`` is what ``medfound pretrain`` calls. The run folder holds
``checkpoints/`` (Lightning ``.ckpt``, written atomically, ``last.ckpt`` to resume from),
``logs/metrics.csv``, ``previews/epoch_NNN.png`` (original / masked / reconstruction per modality),
``data_summary.json`` and, when training ends, ``encoder.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from medfound.data.shards import read_manifest
from medfound.train.checkpoint import AtomicCheckpointIO, lightning_precision, run_folder_checkpoint, training_precision
from medfound.data.stream import PretrainStream, StepAwareLoader, preview_slices
from medfound.errors import InputError
from medfound.io.atomic import write_text
from medfound.models.export import save_encoder
from medfound.models.mae import MAE, MAEConfig
from medfound.models.vit import VIT_CONFIGS


@dataclass
class PretrainConfig:
    model: str = "vit-tiny"
    image_size: int = 224
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_width: int = 192
    decoder_depth: int = 4
    decoder_heads: int | None = None  # default: width // 64 (at least 1), as in the MAE decoders
    batch_size: int = 32
    max_steps: int | None = None
    epochs: int | None = None
    lr: float | None = None  # peak lr; default 1.5e-4 per 256 images (MAE recipe), global batch floored at 512
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 2
    alpha: float = 0.5
    seed: int = 0
    checkpoint_every: int = 100
    compile: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)


class MAEModule(L.LightningModule):
    def __init__(self, cfg: dict, global_batch: int, total_steps: int, modalities: list[str]):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg
        self.mae = MAE(MAEConfig(encoder=cfg["model"], decoder_width=cfg["decoder_width"],
                                 decoder_depth=cfg["decoder_depth"], decoder_heads=cfg["decoder_heads"],
                                 mask_ratio=cfg["mask_ratio"], norm_pix_loss=cfg["norm_pix_loss"]))
        self.total_steps = total_steps
        self.lr = cfg["lr"] if cfg.get("lr") else 1.5e-4 * max(global_batch, 512) / 256
        self.modalities = modalities
        self.previews: dict[str, torch.Tensor] = {}
        self.preview_dir: Path | None = None
        self.last_loss = float("nan")
        self._step_model = self.mae

    def configure_model(self) -> None:
        if self.cfg.get("compile") and self._step_model is self.mae:
            self._step_model = torch.compile(self.mae)

    def training_step(self, batch, batch_idx):
        x, mod = batch
        loss, _, _ = self._step_model(x)
        self.log("train/loss", loss, prog_bar=True, on_step=True, sync_dist=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=False)
        self.last_loss = float(loss.detach())
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.mae.named_parameters():
            (no_decay if p.ndim < 2 or name.endswith("token") else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=(0.9, 0.95))
        warm = self.cfg.get("warmup_steps")
        warm = max(1, int(warm if warm is not None else min(0.1 * self.total_steps, 1000)))
        total = max(self.total_steps, warm + 1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_end(self) -> None:
        if self.trainer.is_global_zero and self.previews and self.preview_dir is not None:
            save_preview_grid(self.mae, self.previews, self.preview_dir / f"epoch_{self.current_epoch:03d}.png",
                              self.cfg["image_size"], title=f"epoch {self.current_epoch}, step {self.global_step}")


def save_preview_grid(mae: MAE, previews: dict[str, torch.Tensor], path: Path, size: int, title: str = "") -> Path:
    """Rows: modality x slice; columns: original, masked input, reconstruction (fixed mask seed)."""
    import matplotlib.pyplot as plt

    from medfound.io.figures import display, save_figure

    was_training = mae.training
    mae.eval()
    rows = [(m, x) for m, xs in previews.items() for x in xs]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    device = next(mae.parameters()).device
    with torch.no_grad():
        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(0)
            imgs = torch.stack([x for _, x in rows]).to(device)
            if imgs.shape[-1] != size:
                imgs = torch.nn.functional.interpolate(imgs, size=(size, size), mode="bilinear")
            _, pred, mask = mae(imgs)
        recon = mae.reconstruct(imgs, pred, mask).clamp(0, 1).cpu()
        p = mae.patch_size
        mask_img = mask.reshape(-1, 1, size // p, size // p).repeat_interleave(p, 2).repeat_interleave(p, 3).cpu()
    for r, (m, _) in enumerate(rows):
        orig = imgs[r, 0].cpu().numpy()
        for c, (img, label) in enumerate(((orig, f"{m} original"), (orig * (1 - mask_img[r, 0].numpy()), "masked"),
                                          (recon[r, 0].numpy(), "reconstruction"))):
            ax = axes[r][c]
            ax.imshow(display(img), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    if was_training:
        mae.train()
    return save_figure(fig, path)


def resolve_data(sources: list[str], run: Path, image_size: int) -> list[Path]:
    """Shard folders for each ``--data`` source; a raw folder tree is ingested once into
    ``RUN/data/`` (reused on resume and by DDP workers)."""
    from medfound.data.ingest import IngestOptions, ingest
    from medfound.data.sources import Source

    folders = []
    for i, text in enumerate(sources):
        src = Source.parse(text)
        if (src.path / "manifest.json").is_file():
            read_manifest(src.path)
            folders.append(src.path)
            continue
        if not src.path.exists():
            raise InputError(src.path, "no such file or folder")
        cache = run / "data" / f"source{i:02d}"
        if not (cache / "manifest.json").is_file():
            ingest([src], cache, IngestOptions(size=image_size), overwrite=True)
        folders.append(cache)
    return folders


def data_summary(folders: list[Path], stream: PretrainStream) -> dict:
    images, slices, norm = {}, {}, {}
    for f in folders:
        m = read_manifest(f)
        for im in m["images"]:
            images[im["modality"]] = images.get(im["modality"], 0) + 1
        for k, v in m["slices_per_modality"].items():
            slices[k] = slices.get(k, 0) + v
        norm.update(m.get("normalisation", {}))
    return {"sources": [str(f) for f in folders], "images_per_modality": images, "slices_per_modality": slices,
            "sampling_weights": stream.weights, "normalisation": norm}


def run_pretrain(data: list[str], out: str | os.PathLike, cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train an MAE; returns the exported config (also ``OUT/config.json``)."""
    out = Path(out)
    if cfg.model not in VIT_CONFIGS:
        raise InputError(None, f"unknown --model {cfg.model!r}; choose from {', '.join(VIT_CONFIGS)}")
    p = VIT_CONFIGS[cfg.model].patch_size
    if cfg.image_size % p or not 32 <= cfg.image_size <= 1024:
        raise InputError(None, f"--image-size must be a multiple of {p} between 32 and 1024")
    if cfg.decoder_heads is None:
        cfg.decoder_heads = max(1, cfg.decoder_width // 64)
    if cfg.decoder_width % 4 or cfg.decoder_width % cfg.decoder_heads or cfg.decoder_depth < 1:
        raise InputError(None, f"--decoder-width {cfg.decoder_width} must be a multiple of 4 and of the "
                               f"decoder heads ({cfg.decoder_heads}); --decoder-depth >= 1")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise InputError(None, "--mask-ratio must be between 0 and 1")
    if cfg.max_steps is None and cfg.epochs is None:
        cfg.epochs = 1
    last = run_folder_checkpoint(out, resume)
    ckpt_dir = last.parent
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    folders = resolve_data(data, out, cfg.image_size)

    precision = lightning_precision(cfg.precision, cfg.accelerator)
    trainer_kw = dict(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                      strategy=cfg.strategy, precision=precision)
    ckpt_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                              every_n_train_steps=cfg.checkpoint_every, save_last=True, save_top_k=1)
    logger = CSVLogger(save_dir=str(out), name="logs", version="")
    trainer = L.Trainer(**trainer_kw, max_steps=cfg.max_steps or -1, max_epochs=cfg.epochs if cfg.max_steps is None else None,
                        callbacks=[ckpt_cb], logger=logger, plugins=[AtomicCheckpointIO()],
                        use_distributed_sampler=False, enable_progress_bar=cfg.progress,
                        log_every_n_steps=1, enable_model_summary=False, num_sanity_val_steps=0,
                        gradient_clip_val=None)
    world = trainer.world_size
    stream = PretrainStream(folders, cfg.image_size, cfg.batch_size, cfg.num_workers, cfg.alpha, cfg.seed,
                            rank=trainer.global_rank, world=world)
    total_steps = cfg.max_steps or stream.steps_per_epoch * (cfg.epochs or 1)
    module = MAEModule(vars(cfg) | {"extra": cfg.extra}, global_batch=cfg.batch_size * world,
                       total_steps=total_steps, modalities=stream.modalities)
    module.preview_dir = out / "previews"
    summary = data_summary(folders, stream)
    if trainer.is_global_zero:
        module.previews = preview_slices(folders)
        write_text(out / "data_summary.json", json.dumps(summary, indent=2))
    loader = StepAwareLoader(stream, lambda: trainer.global_step, batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers, drop_last=True, pin_memory=False,
                             persistent_workers=False)
    t0 = time.time()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if resume else None)
    config = {}
    if trainer.is_global_zero:
        config = {
            "kind": "mae-encoder",
            "image_size": cfg.image_size,
            "patch_size": p,
            "in_channels": 1,
            "modalities": stream.modalities,
            "normalisation": summary["normalisation"],
            "mae": module.mae.config.as_dict(),
            "training": {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
                         "final_loss": module.last_loss, "global_batch": cfg.batch_size * world,
                         "lr": module.lr, "precision": training_precision(cfg.precision, cfg.accelerator), "world_size": world,
                         "seconds": round(time.time() - t0, 1)},
            "data": summary,
        }
        save_encoder(module.mae.encoder, out, config)
    return config

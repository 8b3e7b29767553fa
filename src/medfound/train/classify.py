"""Classification heads on the same encoders: a linear probe (frozen encoder), LoRA on the encoder's
attention, or full fine-tuning. LoRA adapters are folded into the weights they adapt when the run is
exported, so every classifier run loads as a plain encoder and head.

Input is a CSV ``image,label`` (paths relative to the CSV). Each image becomes one normalised square
slice: 2D images as they are, volumes by their middle slice along the axial (canonical RAS) axis.
The head reads the mean of the patch tokens joined with the class token, as MAE's linear probes do
(a TinyViT: its two deepest stages averaged over space).
Rows are split into training and validation by a seeded shuffle stratified by class. What training
leaves frozen - the whole encoder of a linear probe, a TinyViT's stages before those LoRA adapts -
runs once per image, and the steps read its cached output.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from medfound.data.normalize import normalize
from medfound.data.orientation import to_canonical
from medfound.data.slicing import to_square
from medfound.errors import InputError
from medfound.io import read_image
from medfound.io.atomic import atomic_file, write_text
from medfound.models.cnn_unet import CNN_ENCODERS
from medfound.models.lora import count_parameters, merge_lora, plain_state
from medfound.models.segmenter import adapt_encoder, build_encoder, encoder_for
from medfound.train.checkpoint import accelerator_device, lightning_precision, training_precision
from medfound.train.finetune import cache_frozen


class ViTClassifier(nn.Module):
    """(B, 1, S, S) -> logits (B, n_classes) from [class token, mean patch token] of a ViT, or from
    the encoder's own ``pooled`` features where it has them (TinyViT, whose output is a pyramid)."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        dim = getattr(encoder, "pooled_dim", None) or 2 * encoder.config.width
        self.norm = nn.BatchNorm1d(dim, affine=False)  # the MAE linear-probe trick: normalised features
        self.head = nn.Linear(dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.encoder, "pooled"):
            return self.encoder.pooled(x)
        tokens = self.encoder(x)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))

    def caches(self, mode: str) -> bool:
        """Whether training in ``mode`` leaves part of the encoder frozen, so that it can run once per
        image (:meth:`frozen_part`): all of it (``linear``), or a TinyViT's stages before LoRA's."""
        return mode == "linear" or (mode == "lora" and bool(getattr(self.encoder, "lora_stages", None)))

    def frozen_part(self, x: torch.Tensor, mode: str) -> list[torch.Tensor]:
        """What training in ``mode`` does not change (see :meth:`caches`): the pooled features, or
        the TinyViT's output before its first adapted stage."""
        if mode == "linear":
            return [self.features(x)]
        return self.encoder.frozen_part(x, min(self.encoder.lora_stages))

    def forward_frozen(self, part: list[torch.Tensor], mode: str) -> torch.Tensor:
        """Logits from what :meth:`frozen_part` returned for the same ``mode``."""
        if mode == "linear":
            (pooled,) = part
        else:
            stages = self.encoder.lora_stages
            pooled = self.encoder.pool(self.encoder.features_from([t.float() for t in part], min(stages)))
        return self.head(self.norm(pooled.float()))


def read_label_csv(path: str | os.PathLike) -> list[tuple[Path, str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise InputError(path, "CSV needs the columns image,label")
        rows = [(path.parent / r["image"], str(r["label"]).strip()) for r in reader if r.get("image")]
    if len(rows) < 2:
        raise InputError(path, "CSV holds fewer than 2 images")
    return rows


def image_to_square(path: Path, size: int) -> np.ndarray:
    image = read_image(path)
    arr = normalize(image.array, image.modality)
    if image.ndim == 3:
        can, _ = to_canonical(image.with_array(arr))
        arr = can.array[:, :, can.shape[2] // 2]
        spacing = can.spacing[:2]
    else:
        spacing = image.spacing
    return to_square(arr, spacing, size)[0]


@dataclass
class ClassifyConfig:
    mode: str = "linear"
    rank: int = 4  # LoRA rank (mode lora)
    lora_stages: tuple[int, ...] | None = None  # a TinyViT's adapted stages (None: LORA_STAGES)
    max_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    image_size: int | None = None
    precision: str = "32"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    progress: bool = True


class ClassifierModule(L.LightningModule):
    def __init__(self, model: ViTClassifier, cfg: ClassifyConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.loss = nn.CrossEntropyLoss()
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _logits(self, batch) -> torch.Tensor:
        x, _, *part = batch  # part: the frozen encoder's output, cached (see ViTClassifier.frozen_part)
        return self.model.forward_frozen(part, self.cfg.mode) if part else self.model(x)

    def training_step(self, batch, _):
        loss = self.loss(self._logits(batch), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        self._val.append((self._logits(batch).argmax(1).cpu(), batch[1].cpu()))

    def on_validation_epoch_end(self):
        p = torch.cat([a for a, _ in self._val])
        t = torch.cat([b for _, b in self._val])
        self._val.clear()
        recalls = [float((p[t == c] == c).float().mean()) for c in t.unique()]
        self.log("val/balanced_accuracy", float(np.mean(recalls)), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == c]
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx))) if len(idx) > 1 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    if not val:
        raise InputError(None, "too few images per class for a validation split")
    return sorted(train), sorted(val)


def run_classify(csv_path: str | os.PathLike, out: str | os.PathLike, encoder: str, cfg: ClassifyConfig) -> dict:
    """Train and export ``OUT/model.safetensors`` + ``OUT/config.json`` with the validation scores;
    returns the config (an empty dict on the other ranks of a distributed run)."""
    if encoder in CNN_ENCODERS:
        raise InputError(None, f"--encoder {encoder} is a segmentation network; classify takes a ViT or TinyViT encoder")
    out = Path(out)
    rows = read_label_csv(csv_path)
    names = sorted({l for _, l in rows})
    if len(names) < 2:
        raise InputError(csv_path, "need at least 2 classes")
    enc, enc_cfg = encoder_for(encoder, cfg.image_size)
    size = cfg.image_size or int(enc_cfg.get("image_size", 224))
    enc = adapt_encoder(enc, cfg.mode, cfg.rank, cfg.lora_stages)  # LoRA: a TinyViT's later stages, as for segmentation
    x = torch.from_numpy(np.stack([image_to_square(p, size) for p, _ in rows])[:, None])
    y = torch.tensor([names.index(l) for _, l in rows])
    tr, va = stratified_split(y.tolist(), cfg.val_fraction, cfg.seed)
    L.seed_everything(cfg.seed, verbose=False)
    model = ViTClassifier(enc, len(names))
    train_set, val_set = TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])
    if model.caches(cfg.mode):  # some of the encoder is frozen: embed each image once
        train_set, val_set = cache_frozen(model, partial(model.frozen_part, mode=cfg.mode), train_set, val_set,
                                          cfg.accelerator, cfg.progress, items="images")
    module = ClassifierModule(model, cfg)
    # the head's feature norm sees every rank's batch in a distributed run; torch syncs it on GPUs only
    gpu = accelerator_device(cfg.accelerator).type == "cuda"
    trainer = L.Trainer(max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=cfg.devices,
                        num_nodes=cfg.num_nodes, strategy=cfg.strategy, sync_batchnorm=gpu,
                        precision=lightning_precision(cfg.precision, cfg.accelerator), logger=False,
                        enable_checkpointing=False, enable_progress_bar=cfg.progress, enable_model_summary=False,
                        check_val_every_n_epoch=None, val_check_interval=min(50, cfg.max_steps), num_sanity_val_steps=0)
    # each rank reads its share of the images: a batch no larger than that share, so none is empty
    batch = min(cfg.batch_size, max(1, len(tr) // trainer.world_size))
    train_dl = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True)
    val_dl = DataLoader(val_set, batch_size=64)
    t0 = time.time()
    trainer.fit(module, train_dl, val_dl)
    if not trainer.is_global_zero:
        return {}  # rank 0 alone scores, exports and reports
    model.cpu().eval()
    trainable, _ = count_parameters(model)
    merge_lora(model)  # the adapters folded in: the exported weights are a plain encoder's
    with torch.no_grad():
        pred = model(x[va]).argmax(1)
    recalls = [float((pred[y[va] == c] == c).float().mean()) for c in y[va].unique()]
    arch = enc.architecture() if hasattr(enc, "architecture") else {"type": "vit", **enc.config.as_dict()}
    config = {"kind": "classifier", "architecture": arch, "classes": names,
              "mode": cfg.mode, "lora_rank": cfg.rank if cfg.mode == "lora" else None,
              "lora_stages": list(getattr(enc, "lora_stages", ())) or None,
              "image_size": size, "encoder": {"source": encoder, "kind": enc_cfg.get("kind")},
              "data": {"csv": str(csv_path), "train_images": len(tr), "val_images": len(va)},
              "validation": {"accuracy": float((pred == y[va]).float().mean()), "balanced_accuracy": float(np.mean(recalls))},
              "training": {"steps": int(trainer.global_step), "seconds": round(time.time() - t0, 1),
                           "trainable_parameters": trainable,
                           "precision": training_precision(cfg.precision, cfg.accelerator),
                           "world_size": trainer.world_size, "global_batch": train_dl.batch_size * trainer.world_size}}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in plain_state(model).items()}, str(tmp))
    write_text(out / "config.json", json.dumps(config, indent=2))
    return config


def load_classifier(run: str | os.PathLike) -> tuple[ViTClassifier, dict]:
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file() or not (run / "model.safetensors").is_file():
        raise InputError(run, "not a medfound classifier run (config.json / model.safetensors missing)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kind") != "classifier":
        raise InputError(cfg_path, f"not a classifier config (kind={cfg.get('kind')!r})")
    model = ViTClassifier(build_encoder(cfg["architecture"]), len(cfg["classes"]))
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return model.eval(), cfg


@torch.no_grad()
def classify_paths(run: str | os.PathLike, paths: list[Path]) -> list[tuple[Path, str, float]]:
    model, cfg = load_classifier(run)
    out = []
    for p in paths:
        x = torch.from_numpy(image_to_square(p, cfg["image_size"]))[None, None]
        prob = model(x).softmax(1)[0]
        k = int(prob.argmax())
        out.append((p, cfg["classes"][k], float(prob[k])))
    return out

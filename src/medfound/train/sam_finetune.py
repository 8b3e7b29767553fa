"""LoRA fine-tuning of SAM on an nnU-Net dataset with simulated prompts (SAMed / MedSAM style).

Every labeled structure on every slice is a sample: the slice, the structure's binary mask, and a
prompt simulated from the mask (a jittered box, a few points, or both), plus one iterative correction
click on half of the samples. Loss: Dice + BCE on the mask logits. Only the LoRA adapters and the
trained parts are saved (``adapters.safetensors``), to be loaded on top of the same base.

Several datasets train together (every non-held-out structure of each; ``exclude_labels`` keeps
validation structures out). Rank 0 adapts the mask decoder alone on a frozen encoder: each slice is
then embedded once and its embedding reused by every structure and step (keyed by the slice's
content, so the same image under several atlases is embedded once), which makes adapting an
expensive encoder such as LiteMedSAM's affordable on a CPU. LoRA on TinyViT's later stages only
(``lora_stages``) caches the same way what comes before them, the full-resolution stage above all.

With ``box_zoom`` a box sample is shown as inference shows it (``data.box_crop``): the box's
neighbourhood cut from the slice and resized to ``box_size`` (LiteMedSAM's encoder runs at any
size; 128 px costs a quarter of 256). Each crop is new, so its embedding is computed, not cached.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from monai.losses import DiceCELoss
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from medfound.data.box_crop import box_window
from medfound.data.labeled import case_slices, label_lut, split_cases, training_classes
from medfound.data.nnunet import NnUNetDataset
from medfound.data.prompts import correction_point, jittered_box, sample_points
from medfound.data.slicing import square_coords, to_square
from medfound.errors import InputError
from medfound.io.atomic import atomic_file, write_text
from medfound.models.lora import count_parameters
from medfound.models.sam import (ADAPTER_FILE, add_sam_lora, append_point, decode, load_sam, sam_view, to_sam_input,
                                 trained_state)
from medfound.train.checkpoint import AtomicCheckpointIO, allow_unused_parameters, lightning_precision



@dataclass
class SamFinetuneConfig:
    rank: int = 4
    targets: tuple[str, ...] = ("q", "v")
    lora_stages: tuple[int, ...] = ()  # TinyViT stages whose attention is adapted (empty: all)
    image_size: int = 256
    prompt: str = "both"  # box | point | both
    train_prompt_encoder: bool = False
    max_steps: int = 300
    batch_size: int = 4
    lr: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.2  # 0: every case trains (validation by excluded structures instead)
    exclude_labels: tuple[str, ...] = ()
    max_minutes: float | None = None  # stop and export after this wall time even if steps remain
    box_zoom: float | None = None  # box samples on the box's neighbourhood, this many times its side
    box_size: int | None = None  # ... resized to this input side (default image_size)
    init: str | None = None  # a SAM LoRA run (or a shipped one: litemedsam-adapted, -lora) on the same base to start from
    checkpoint_every: int = 100
    precision: str = "32"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    progress: bool = True


class StructureSlices(Dataset):
    """(slice (1, S, S), binary mask (S, S)) for each (slice, structure present on it)."""

    def __init__(self, cases, max_classes: int):
        self.images = np.concatenate([c.images for c in cases])
        labels = np.concatenate([c.labels for c in cases])
        self.items = [(i, c) for i in range(len(labels)) for c in range(1, max_classes + 1) if (labels[i] == c).sum() >= 4]
        self.labels = labels
        if not self.items:
            raise InputError(None, "no labeled structures on any training slice")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        i, c = self.items[k]
        return torch.from_numpy(self.images[i][None]), torch.from_numpy(self.labels[i] == c)


class FrozenCache:
    """What a frozen function of a slice returns (an encoder's embedding, or the frozen first stages'
    features), computed once per distinct slice (keyed by its bytes) and kept in bf16."""

    def __init__(self, fn):
        self.fn = fn
        self.store: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 1, S, S) -> fn's (B, ...)
        import hashlib

        keys = [hashlib.blake2b(xi.cpu().numpy().tobytes(), digest_size=16).digest() for xi in x]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            out = self.fn(to_sam_input(sam_view(x[todo])))
            for i, e in zip(todo, out):
                self.store[keys[i]] = e.to(torch.bfloat16).cpu()
        return torch.stack([self.store[k] for k in keys]).to(device=x.device, dtype=torch.float32)


def simulate_prompt(mask: np.ndarray, kind: str, rng: np.random.Generator):
    """(boxes (1, 4) or None, points ((1, n, 2), (1, n)) or None) in SAM's (x, y) = our (i, j)."""
    if kind == "both":
        kind = "box" if rng.random() < 0.5 else "point"
    if kind == "box":
        return torch.from_numpy(jittered_box(mask, rng))[None], None
    pts, lab = sample_points(mask, int(rng.integers(1, 4)), int(rng.integers(0, 2)), rng)
    return None, (torch.from_numpy(pts)[None], torch.from_numpy(lab)[None])


class SamModule(L.LightningModule):
    def __init__(self, sam, cfg: SamFinetuneConfig):
        super().__init__()
        self.sam, self.cfg = sam, cfg
        self.loss = DiceCELoss(sigmoid=True)
        self.rng = np.random.default_rng(cfg.seed)
        encoder = sam.image_encoder
        # the frozen part of the encoder (SAM input -> its output): all of it at rank 0, the stages
        # before the adapted ones with --lora-stages, nothing when every stage is adapted
        self.frozen, self.first_stage = None, 0
        if cfg.rank == 0:  # a function, not the module: an attribute module would be registered twice
            self.frozen = lambda inp: encoder(inp)
        elif cfg.lora_stages:  # TinyViT adapted from this stage on: everything before it is frozen
            self.first_stage = min(cfg.lora_stages)
            self.frozen = lambda inp: encoder.prefix(inp, self.first_stage)
        self.cache = FrozenCache(self.frozen) if self.frozen is not None else None

    def embed(self, x: torch.Tensor, cached: bool = True) -> torch.Tensor:  # (B, 1, S, S) -> (B, D, S/4, S/4)
        """The embedding of slices; the frozen part is cached per distinct slice unless ``cached`` is
        False (zoomed crops, each seen once)."""
        if self.frozen is None:
            return self.sam.image_encoder(to_sam_input(sam_view(x)))
        if cached:
            frozen = self.cache(x)
        else:
            with torch.no_grad():
                frozen = self.frozen(to_sam_input(sam_view(x)))
        return frozen if self.cfg.rank == 0 else self.sam.image_encoder.forward_from(frozen, self.first_stage)

    def zoomed(self, image: np.ndarray, mask: np.ndarray, box: np.ndarray):
        """(crop (box_size, box_size), its mask, the box in crop pixels (1, 4)) around a box on a bank
        slice (square pixels), as ``infer.sam_segment`` cuts it."""
        win = box_window(box, mask.shape, (1.0, 1.0), self.cfg.box_zoom)
        size = self.cfg.box_size or self.cfg.image_size
        crop, geom = to_square(win.cut(image), (1.0, 1.0), size)
        target, _ = to_square(win.cut(mask.astype(np.float32)), (1.0, 1.0), size, nearest=True)
        corners = square_coords(win.to_crop(box).reshape(2, 2), geom).reshape(1, 4)
        return crop, target > 0.5, torch.from_numpy(corners)

    def training_step(self, batch, _):
        x, masks = batch
        prompts = [simulate_prompt(masks[b].cpu().numpy(), self.cfg.prompt, self.rng) for b in range(x.shape[0])]
        # (input (1, 1, S, S) or None, mask, boxes, points) per sample; a zoomed box sample gets its crop
        samples = []
        for b, (boxes, points) in enumerate(prompts):
            if self.cfg.box_zoom and boxes is not None:
                crop, m, cbox = self.zoomed(x[b, 0].cpu().numpy(), masks[b].cpu().numpy(), boxes[0].numpy())
                samples.append((torch.from_numpy(crop)[None, None], m, cbox, points))
            else:
                samples.append((None, masks[b].cpu().numpy(), boxes, points))
        full = [b for b, s in enumerate(samples) if s[0] is None]
        crops = [b for b, s in enumerate(samples) if s[0] is not None]
        emb: dict[int, torch.Tensor] = {}
        if full:
            emb.update(zip(full, self.embed(x[full])))
        if crops:
            emb.update(zip(crops, self.embed(torch.cat([samples[b][0] for b in crops]).to(x.device), cached=False)))
        losses = []
        for b, (crop, m, boxes, points) in enumerate(samples):
            S = x.shape[-1] if crop is None else crop.shape[-1]
            boxes = boxes.to(x.device) if boxes is not None else None
            points = tuple(t.to(x.device) for t in points) if points is not None else None
            e = emb[b][None]
            logits = sam_view(decode(self.sam, e, boxes, points, S))
            target = torch.from_numpy(m)[None, None].float().to(x.device)
            losses.append(self.loss(logits, target))
            if self.rng.random() < 0.5:  # one interactive correction round
                click = correction_point((logits[0, 0] > 0).detach().cpu().numpy(), m, self.rng)
                if click is not None:
                    pts = append_point(points, click[0], click[1], x.device)
                    logits2 = sam_view(decode(self.sam, e, boxes, pts, S))
                    losses.append(self.loss(logits2, target))
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.sam.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cfg.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _dataset_slices(dataset, cfg: SamFinetuneConfig, rng) -> tuple[StructureSlices, dict, list[str], list[str]]:
    """One dataset's training samples: its non-held-out, non-excluded structures on its training cases."""
    ds = NnUNetDataset.open(dataset)
    excluded = {n.lower() for n in cfg.exclude_labels}
    classes = {v: n for v, n in training_classes(ds).items() if n.lower() not in excluded}
    if not classes:
        raise InputError(ds.root, "every label is held out or excluded")
    if cfg.val_fraction > 0:
        train_cases, val_cases = split_cases(ds.cases(), 1.0, cfg.val_fraction, cfg.seed)
    else:
        train_cases, val_cases = ds.cases(), []
    lut = label_lut(ds, classes)
    slices = [case_slices(ds, c, cfg.image_size, lut, keep_empty=0.0, rng=rng) for c in train_cases]
    return StructureSlices(slices, len(classes)), {"dataset": str(ds.root), "classes": classes,
                                                   "heldout": ds.heldout}, train_cases, val_cases


def _start_from(sam, run: str, base_info: dict) -> None:
    """Load a finished run's trained parts (its decoder, its adapters) into ``sam`` before training.
    Everything in that run must fit here; parts new here (adapters on other modules) start fresh."""
    from safetensors.torch import load_file

    from medfound.models.sam import read_sam_run, sam_run_folder

    path = sam_run_folder(run)
    init_base = read_sam_run(path).get("base", {}).get("base")
    if init_base != base_info["base"]:
        raise InputError(path, f"--init was trained on base {init_base!r}, not {base_info['base']!r}")
    unexpected = sam.load_state_dict(load_file(str(path / ADAPTER_FILE)), strict=False).unexpected_keys
    if unexpected:
        raise InputError(path / ADAPTER_FILE, f"--init holds {len(unexpected)} tensors this model lacks "
                                              f"(first: {unexpected[0]}); give the same --lora-targets/--lora-stages")


def run_sam_finetune(dataset: str | os.PathLike | list, base: str, out: str | os.PathLike, cfg: SamFinetuneConfig,
                     resume: bool = False) -> dict:
    """Adapt ``base`` on one dataset or several (a list); returns the run's config (an empty dict on
    the other ranks of a distributed run)."""
    from torch.utils.data import ConcatDataset

    out = Path(out)
    if cfg.prompt not in ("box", "point", "both"):
        raise InputError(None, f"--prompt must be box, point or both, got {cfg.prompt!r}")
    if cfg.box_zoom is not None and not (cfg.box_zoom >= 1 and (cfg.box_size or 16) % 16 == 0):
        raise InputError(None, "--box-zoom must be at least 1 and --box-size a multiple of 16")
    if cfg.box_size is not None and cfg.box_zoom is None:
        raise InputError(None, "--box-size sets the side of the box's crop: give --box-zoom with it")
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise InputError(last, "nothing to resume from (no last checkpoint in the run folder)")
    datasets = [dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset)
    if len(datasets) > 1 and cfg.val_fraction > 0:
        cfg.val_fraction = 0.0  # several datasets: all cases train; validate on --exclude-label structures
    sam, base_info = load_sam(base, cfg.image_size)
    if cfg.box_size not in (None, cfg.image_size) and base != "litemedsam":
        raise InputError(None, "--box-size other than --image-size needs an encoder that runs at any size (--base litemedsam)")
    add_sam_lora(sam, cfg.rank, tuple(cfg.targets), train_prompt_encoder=cfg.train_prompt_encoder,
                 stages=tuple(cfg.lora_stages))
    if cfg.init:
        _start_from(sam, cfg.init, base_info)
    rng = np.random.default_rng(cfg.seed)
    parts = [_dataset_slices(d, cfg, rng) for d in datasets]
    data = ConcatDataset([p[0] for p in parts])
    first, train_cases, val_cases = parts[0][1], parts[0][2], parts[0][3]
    classes = first["classes"]
    L.seed_everything(cfg.seed, verbose=False)
    dl = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=len(data) > cfg.batch_size)
    module = SamModule(sam, cfg)
    precision = lightning_precision(cfg.precision, cfg.accelerator)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
                           every_n_train_steps=cfg.checkpoint_every, save_last=True, save_top_k=1)
    trainer = L.Trainer(max_steps=cfg.max_steps, max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
                        accelerator=cfg.accelerator, devices=cfg.devices,
                        num_nodes=cfg.num_nodes, strategy=allow_unused_parameters(cfg.strategy), precision=precision, callbacks=[ckpt],
                        logger=CSVLogger(str(out), name="logs", version=""), plugins=[AtomicCheckpointIO()],
                        enable_progress_bar=cfg.progress, enable_model_summary=False, log_every_n_steps=1)
    t0 = time.time()
    trainer.fit(module, dl, ckpt_path=str(last) if resume else None)
    trainable, total = count_parameters(sam)
    config = {"kind": "sam-lora", "base": base_info, "image_size": cfg.image_size, "rank": cfg.rank,
              "targets": list(cfg.targets),
              "lora_stages": list(cfg.lora_stages), "init": cfg.init, "train_prompt_encoder": cfg.train_prompt_encoder, "prompt": cfg.prompt,
              "classes": {str(c): {"label": v, "name": n} for c, (v, n) in enumerate(sorted(classes.items()), start=1)},
              "data": {"dataset": first["dataset"], "train_cases": train_cases, "val_cases": val_cases,
                       "samples": len(data), "heldout_labels_excluded": first["heldout"],
                       "datasets": [{"dataset": p[1]["dataset"], "structures": len(p[1]["classes"]),
                                     "samples": len(p[0]), "cases": p[2]} for p in parts],
                       "excluded_labels": list(cfg.exclude_labels)},
              "training": {"steps": int(trainer.global_step), "trainable_parameters": trainable,
                           "world_size": trainer.world_size, "global_batch": cfg.batch_size * trainer.world_size,
                           "total_parameters": total, "seconds": round(time.time() - t0, 1)}}
    if cfg.box_zoom:  # answered as trained: a box on its zoomed crop
        config["inference"] = {"box_zoom": cfg.box_zoom, "box_size": cfg.box_size or cfg.image_size}
    if not trainer.is_global_zero:
        return {}  # rank 0 alone exports and reports
    with atomic_file(out / ADAPTER_FILE) as tmp:
        save_file(trained_state(sam), str(tmp), metadata={"producer": "medfound", "kind": "sam-lora"})
    write_text(out / "config.json", json.dumps(config, indent=2))
    return config

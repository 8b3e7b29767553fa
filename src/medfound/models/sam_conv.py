"""A small promptable SAM for CPUs: segment-anything's prompt encoder and mask decoder on a
convolutional image encoder (the idea of MobileSAM / LiteMedSAM: keep SAM's prompt interface, swap
the heavy ViT for an encoder that runs in milliseconds).

Why a conv pyramid and not SAM's ViT: trained from scratch on the few thousand real slices here, a
conv net learns useful features in minutes on two cores, and its stride-4 output gives the mask
decoder a 1/1-resolution mask (SAM's 1/16 grid gives 1/4) - what small brain nuclei need. The
encoder returns a (B, C, S/4, S/4) embedding, exactly what ``Sam.mask_decoder`` expects, so every
SAM code path (sessions, propagation, the viewer) runs unchanged.

Run folders hold ``model.safetensors`` (all weights) + ``config.json`` (kind ``sam-conv``). The
default model ships in the package (``medfound/weights/sam``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.errors import InputError
from medfound.models.run_folder import load_run, run_kind, save_run
from medfound.models.sam_import import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

KIND = "sam-conv"
DEFAULT_SAM_DIR = Path(__file__).resolve().parent.parent / "weights" / "sam"


@dataclass(frozen=True)
class SamConvConfig:
    image_size: int = 128
    widths: tuple[int, ...] = (32, 48, 64, 96, 128)  # strides 2, 4, 8, 16, 32
    prompt_dim: int = 64
    decoder_mlp: int = 256

    def as_dict(self) -> dict:
        return asdict(self) | {"widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict) -> SamConvConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


class MapNorm(nn.Module):
    """Normalises each (C, H, W) map over channels and positions together (one-group GroupNorm).
    Not SAM's per-pixel LayerNorm2d, which the neck mirrors otherwise: the shipped weights were
    trained with this one."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResBlock(nn.Module):
    """Two 3x3 convs with a residual path; ``stride`` 2 halves the map."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        groups = 8 if cout % 8 == 0 else 1
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(y)) + self.skip(x))


class ConvImageEncoder(nn.Module):
    """(B, 3, S, S) SAM-normalised image -> (B, prompt_dim, S/4, S/4) embedding.

    A five-level residual pyramid (down to S/32 for context) and a top-down path back to S/4
    (feature-pyramid style), then SAM's neck (1x1 conv, norm, 3x3 conv, norm)."""

    def __init__(self, cfg: SamConvConfig):
        super().__init__()
        self.img_size = cfg.image_size
        w = cfg.widths
        self.stages = nn.ModuleList()
        cin = 3
        for c in w:
            self.stages.append(nn.Sequential(ResBlock(cin, c, stride=2), ResBlock(c, c)))
            cin = c
        # lateral 1x1 projections of the stride-4 .. stride-32 maps to a common width
        self.lateral = nn.ModuleList([nn.Conv2d(c, cfg.prompt_dim, 1) for c in w[1:]])
        self.smooth = ResBlock(cfg.prompt_dim, cfg.prompt_dim)
        self.neck = nn.Sequential(nn.Conv2d(cfg.prompt_dim, cfg.prompt_dim, 1, bias=False), MapNorm(cfg.prompt_dim),
                                  nn.Conv2d(cfg.prompt_dim, cfg.prompt_dim, 3, padding=1, bias=False),
                                  MapNorm(cfg.prompt_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        y = self.lateral[-1](feats[-1])  # (B, D, S/32, S/32)
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[1:-1])):
            y = F.interpolate(y, size=f.shape[-2:], mode="nearest") + lat(f)
        return self.neck(self.smooth(y))  # (B, D, S/4, S/4)


def build_sam_conv(cfg: SamConvConfig = SamConvConfig()) -> Sam:
    if cfg.image_size % 32:
        raise InputError(None, f"image size must be a multiple of 32, got {cfg.image_size}")
    grid = cfg.image_size // 4
    return Sam(
        image_encoder=ConvImageEncoder(cfg),
        prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=cfg.prompt_dim,
                                                               mlp_dim=cfg.decoder_mlp, num_heads=4),
                                 transformer_dim=cfg.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.prompt_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def save_sam_conv(sam: Sam, cfg: SamConvConfig, run: str | os.PathLike, info: dict) -> Path:
    return save_run(sam, run, KIND, {"image_size": cfg.image_size, "model": cfg.as_dict(), **info})


def is_sam_conv_run(path: str | os.PathLike) -> bool:
    return run_kind(path) == KIND


def load_sam_conv(run: str | os.PathLike | None = None) -> tuple[Sam, dict]:
    """A trained conv SAM run folder; ``None`` = the model shipped with medfound."""
    return load_run(Path(run) if run is not None else DEFAULT_SAM_DIR, KIND,
                    lambda c: build_sam_conv(SamConvConfig.from_dict(c.get("model", {}))), DEFAULT_SAM_DIR,
                    "conv SAM", "medfound sam train")

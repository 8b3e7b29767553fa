"""A convolutional U-Net trained from scratch: the segmenter a user already has, as a floor.

With few labels the question is whether a pretrained encoder beats what a user would train anyway,
and that is a plain CNN (nnU-Net, a ResNet U-Net), not a ViT from random weights. This is MONAI's
``FlexibleUNet`` on a ResNet-18 encoder (2D, one input channel, random weights), split into the
encoder and decoder parts medfound's fine-tuning addresses by name: ``model.encoder`` (its learning
rate, its parameter count, its architecture in ``config.json``) and the rest. Only that split is
written here; the network is MONAI's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from monai.networks.nets import FlexibleUNet

#: input sides must divide by this (the ResNet's five stride-2 steps)
SIZE_MULTIPLE = 32

#: ``--encoder`` names that give this network
CNN_ENCODERS = ("scratch:unet",)


@dataclass(frozen=True)
class CNNConfig:
    backbone: str = "resnet18"
    in_channels: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


class CNNEncoder(nn.Module):
    """The ResNet contracting path: slices (B, 1, S, S) -> five maps at 1/2, 1/4, ..., 1/32 of the side
    (64, 64, 128, 256, 512 channels for ResNet-18)."""

    def __init__(self, cfg: CNNConfig = CNNConfig()):
        super().__init__()
        self.config = cfg
        self.net = _flexible_unet(cfg, 2).encoder

    def architecture(self) -> dict:
        return {"type": "cnn", **self.config.as_dict()}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)


class CNNUNet(nn.Module):
    """Encoder + U-Net decoder + 1x1 head: (B, 1, S, S) -> class logits (B, n_classes, S, S)."""

    def __init__(self, encoder: CNNEncoder, n_classes: int):
        super().__init__()
        net = _flexible_unet(encoder.config, n_classes)  # its decoder and head; the encoder is the one given
        self.encoder = encoder
        self.decoder, self.head, self.skips = net.decoder, net.segmentation_head, net.skip_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x), self.skips))


def _flexible_unet(cfg: CNNConfig, n_classes: int) -> FlexibleUNet:
    return FlexibleUNet(cfg.in_channels, n_classes, backbone=cfg.backbone, pretrained=False, spatial_dims=2)


def build_cnn_encoder(arch: dict) -> CNNEncoder:
    """The encoder ``config.json``'s ``architecture`` records (random weights)."""
    return CNNEncoder(CNNConfig(**{k: v for k, v in arch.items() if k != "type"}))

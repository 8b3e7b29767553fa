"""Low-rank adapters (LoRA) on a ViT's attention projections, through peft.

``add_lora`` injects trainable rank-r updates next to the frozen ``qkv`` (and optionally ``proj``)
linear layers; everything else in the encoder is frozen. The adapted module keeps its class and
forward, so the segmenter and the exporter treat it like any encoder.
"""

from __future__ import annotations

import torch.nn as nn


def add_lora(encoder: nn.Module, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] = ("qkv",),
             dropout: float = 0.0) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), lora_dropout=dropout,
                        bias="none")
    encoder = inject_adapter_in_model(config, encoder)
    for name, p in encoder.named_parameters():
        p.requires_grad = "lora_" in name
    return encoder


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total

"""Low-rank adapters (LoRA) on a ViT's attention projections, through peft.

``add_lora`` injects trainable rank-r updates next to the frozen ``qkv`` (and optionally ``proj``)
linear layers; everything else in the encoder is frozen. The adapted module keeps its class and
forward, so the segmenter and the exporter treat it like any encoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def add_lora(encoder: nn.Module, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] | str = ("qkv",),
             dropout: float = 0.0) -> nn.Module:
    """LoRA on the modules named in ``targets`` (names matched at their end), or on those whose whole
    name matches ``targets`` when it is one string (a regular expression, as peft takes it)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets if isinstance(targets, str) else list(targets),
                        lora_dropout=dropout,
                        bias="none")
    encoder = inject_adapter_in_model(config, encoder)
    for name, p in encoder.named_parameters():
        p.requires_grad = "lora_" in name
    return encoder


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every peft adapter into the weight it adapts, for inference: the adapted model then costs
    what the base costs (the adapters stay, marked merged, so the weights can still be told apart)."""
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer) and not m.merged:
            m.merge()
    return module


def plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a module whose adapters are merged (:func:`merge_lora`), under the names the
    module has without adapters: it loads into the unadapted architecture."""
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) and not m.merged for m in module.modules()):
        raise ValueError("merge the adapters first (merge_lora)")
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total


class QVLoRA(nn.Module):
    """LoRA on the query and value parts of a fused ``qkv`` linear layer (as SAMed adapts SAM).

    Written by hand because peft adapts whole modules: on a fused qkv projection it cannot leave
    the keys untouched. ``out = qkv(x) + [B_q A_q x, 0, B_v A_v x] * alpha / r``; B starts at zero,
    so the adapted model starts as the base model.
    """

    def __init__(self, qkv: nn.Linear, rank: int = 4, alpha: float | None = None):
        super().__init__()
        self.qkv = qkv
        d = qkv.in_features
        self.dim = qkv.out_features // 3
        self.scale = (alpha or rank) / rank
        self.lora_q_A = nn.Linear(d, rank, bias=False)
        self.lora_q_B = nn.Linear(rank, self.dim, bias=False)
        self.lora_v_A = nn.Linear(d, rank, bias=False)
        self.lora_v_B = nn.Linear(rank, self.dim, bias=False)
        for a in (self.lora_q_A, self.lora_v_A):
            nn.init.kaiming_uniform_(a.weight, a=5 ** 0.5)
        for b in (self.lora_q_B, self.lora_v_B):
            nn.init.zeros_(b.weight)

    def forward(self, x):
        out = self.qkv(x)
        q = self.lora_q_B(self.lora_q_A(x)) * self.scale
        v = self.lora_v_B(self.lora_v_A(x)) * self.scale
        return out + torch.cat([q, torch.zeros_like(q), v], dim=-1)


def add_qv_lora(encoder: nn.Module, rank: int = 4) -> nn.Module:
    """Wrap every attention ``qkv`` of ``encoder`` in :class:`QVLoRA`; freeze everything else."""
    for p in encoder.parameters():
        p.requires_grad = False
    for module in list(encoder.modules()):
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear):
            module.qkv = QVLoRA(qkv, rank)
    return encoder

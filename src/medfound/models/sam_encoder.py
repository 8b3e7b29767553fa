"""SAM's image encoder behind the ViT-encoder interface, so UNETR fine-tuning can start from SAM.

``--encoder sam:PATH.pth`` (or ``sam:vit_b`` for random weights) in ``medfound finetune`` gives the
segmenter SAM's patch embedding and blocks (window and global attention, relative positions); the
neck is not used, UNETR reads the blocks' hidden states. A zero class token is prepended so the
token layout matches :class:`medfound.models.vit.ViTEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.models.sam import SAM_VARIANTS, build_sam, load_sam, to_sam_input
from medfound.models.vit import ViTConfig


class SamEncoderAdapter(nn.Module):
    def __init__(self, image_encoder: nn.Module, variant: str, image_size: int):
        super().__init__()
        v = SAM_VARIANTS[variant]
        self.sam_encoder = image_encoder
        self.variant, self.image_size = variant, image_size
        self.config = ViTConfig(width=v.embed_dim, depth=v.depth, heads=v.heads, patch_size=16, in_chans=1)

    def architecture(self) -> dict:
        return {"type": "sam", "variant": self.variant, "image_size": self.image_size}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> patch tokens with position, (B, N, C)."""
        enc = self.sam_encoder
        t = enc.patch_embed(to_sam_input(x))  # (B, h, w, C)
        pos = enc.pos_embed
        if pos.shape[1:3] != t.shape[1:3]:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=t.shape[1:3], mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        t = t + pos
        self._grid = t.shape[1:3]
        return t.flatten(1, 2)

    def forward_tokens(self, tokens: torch.Tensor, return_layers: tuple[int, ...] = ()):
        B, N, C = tokens.shape
        h, w = self._grid
        x = tokens.reshape(B, h, w, C)
        kept = {}
        for i, blk in enumerate(self.sam_encoder.blocks, start=1):
            x = blk(x)
            if i in return_layers:
                kept[i] = x
        zero = tokens.new_zeros(B, 1, C)
        as_tokens = lambda y: torch.cat([zero, y.reshape(B, h * w, C)], dim=1)  # noqa: E731
        return as_tokens(x), [as_tokens(kept[i]) for i in return_layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed(x))[0]


def sam_encoder(spec: str, image_size: int) -> tuple[SamEncoderAdapter, dict]:
    """``spec`` is an official checkpoint path or a variant name."""
    sam, info = load_sam(spec, image_size)
    return SamEncoderAdapter(sam.image_encoder, info["variant"], info["image_size"]), \
        {"kind": f"sam-{info['weights']}", "image_size": info["image_size"]}


def build_sam_encoder(arch: dict) -> SamEncoderAdapter:
    return SamEncoderAdapter(build_sam(arch["variant"], arch["image_size"]).image_encoder, arch["variant"],
                             arch["image_size"])

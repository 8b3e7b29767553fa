"""UNETR-style segmenter on a ViT encoder (Hatamizadeh et al., 2022), in 2D.

Hidden states from four depths of the encoder are reshaped to feature maps at 1/16 resolution and
brought up to 1/8, 1/4 and 1/2 by transposed convolutions; a convolutional path at full resolution
carries the edges. The blocks are MONAI's (UnetrBasicBlock / UnetrPrUpBlock / UnetrUpBlock); only the
wiring to our encoder is written here, because MONAI's UNETR builds its own ViT.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from medfound.models.vit import ViTEncoder


def tap_layers(depth: int) -> tuple[int, int, int, int]:
    """Four evenly spaced blocks to take features from (3, 6, 9, 12 for depth 12)."""
    return tuple(max(1, round(depth * k / 4)) for k in (1, 2, 3, 4))


class ViTUNETR(nn.Module):
    """(B, 1, H, W) -> class logits (B, n_classes, H, W); H, W multiples of the patch size (16)."""

    def __init__(self, encoder: ViTEncoder, n_classes: int, feature_size: int = 16, norm: str = "instance"):
        super().__init__()
        self.encoder = encoder
        self.n_classes = n_classes
        D, f = encoder.config.width, feature_size
        self.layers = tap_layers(encoder.config.depth)
        kw = dict(spatial_dims=2, kernel_size=3, norm_name=norm, res_block=True)
        self.enc1 = UnetrBasicBlock(in_channels=encoder.config.in_chans, out_channels=f, stride=1, **kw)
        self.enc2 = UnetrPrUpBlock(in_channels=D, out_channels=f * 2, num_layer=2, stride=1, upsample_kernel_size=2,
                                   conv_block=True, **kw)
        self.enc3 = UnetrPrUpBlock(in_channels=D, out_channels=f * 4, num_layer=1, stride=1, upsample_kernel_size=2,
                                   conv_block=True, **kw)
        self.enc4 = UnetrPrUpBlock(in_channels=D, out_channels=f * 8, num_layer=0, stride=1, upsample_kernel_size=2,
                                   conv_block=True, **kw)
        self.dec5 = UnetrUpBlock(in_channels=D, out_channels=f * 8, upsample_kernel_size=2, **kw)
        self.dec4 = UnetrUpBlock(in_channels=f * 8, out_channels=f * 4, upsample_kernel_size=2, **kw)
        self.dec3 = UnetrUpBlock(in_channels=f * 4, out_channels=f * 2, upsample_kernel_size=2, **kw)
        self.dec2 = UnetrUpBlock(in_channels=f * 2, out_channels=f, upsample_kernel_size=2, **kw)
        self.out = UnetOutBlock(spatial_dims=2, in_channels=f, out_channels=n_classes)

    def _grid(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        # (B, 1 + N, D) -> (B, D, h, w), class token dropped
        B, _, D = tokens.shape
        return tokens[:, 1:].transpose(1, 2).reshape(B, D, *hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.encoder.config.patch_size
        hw = (x.shape[-2] // p, x.shape[-1] // p)
        last, hidden = self.encoder.forward_tokens(self.encoder.embed(x), return_layers=self.layers[:3])
        z3, z6, z9 = (self._grid(h, hw) for h in hidden)
        z12 = self._grid(last, hw)
        d = self.dec5(z12, self.enc4(z9))
        d = self.dec4(d, self.enc3(z6))
        d = self.dec3(d, self.enc2(z3))
        d = self.dec2(d, self.enc1(x))
        return self.out(d)

"""LiteMedSAM's TinyViT encoder under a segmentation decoder and a classification head.

TinyViT is hierarchical (four stages at 1, 1/2, 1/4 and 1/4 of the input side in LiteMedSAM's
variant), so it does not fit UNETR, which reads one token grid from several depths. Its stages are
used as a feature pyramid instead, as in a U-Net: the two 1/4 stages are joined at the bottom, the
1/2 stage is the next skip, and a small convolutional stem on the slice itself carries the edges at
full resolution. The full-resolution first stage is not read (it is two inverted residuals on
per-pixel embeddings, and skipping it keeps cached features small when the encoder is frozen).
The blocks are MONAI's; only the wiring is written here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock, UnetResBlock

from medfound.models.sam import to_sam_input
from medfound.models.tinyvit import TinyViT, TinyViTConfig

#: input sides must divide by this (two stride-2 merges, and the decoder's two upsamplings)
SIZE_MULTIPLE = 16

#: TinyViT stages whose attention a segmenter's LoRA adapts, as LiteMedSAM's shipped SAM adapter does:
#: the stages before them stay as released, so fine-tuning runs them once per slice (see ``train.finetune``)
LORA_STAGES = (2, 3)


class TinyViTEncoder(nn.Module):
    """A TinyViT as medfound's segmenters and classifiers use an encoder:
    normalised slices (B, 1, S, S) -> stages 1-3 as maps [(B, 128, S/2, S/2), (B, 160, S/4, S/4),
    (B, 320, S/4, S/4)] (widths of LiteMedSAM's TinyViT-5M)."""

    def __init__(self, tinyvit: TinyViT):
        super().__init__()
        self.tinyvit = tinyvit
        for p in tinyvit.neck.parameters():  # SAM's neck feeds the mask decoder, not the pyramid
            p.requires_grad = False
        self.config = tinyvit.cfg
        self.dims = tuple(tinyvit.cfg.embed_dims[1:])

    def architecture(self) -> dict:
        return {"type": "tinyvit", **self.config.as_dict()}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.features_from(self.frozen_part(x, 0), 0)

    def frozen_part(self, x: torch.Tensor, first: int) -> list[torch.Tensor]:
        """What does not change while only stages ``first``.. train: the pyramid levels before stage
        ``first`` (maps) and stage ``first``'s input (tokens (B, N, C)); :meth:`features_from` goes on."""
        t = self.tinyvit
        # to_sam_input gives what TinyViT takes; it rescales each image to MedSAM's [0, 1] itself
        h, levels = t.stem(to_sam_input(x)), []
        for i in range(first):
            out, h = t.run_stage(i, h)
            if i >= 1:  # stage 0 is not a pyramid level (see the module docstring)
                levels.append(out)
        return [*levels, h]

    def features_from(self, part: list[torch.Tensor], first: int) -> list[torch.Tensor]:
        """:meth:`features` from what :meth:`frozen_part` returned for the same ``first``."""
        *levels, h = part
        for i in range(first, len(self.tinyvit.layers)):
            out, h = self.tinyvit.run_stage(i, h)
            if i >= 1:
                levels.append(out)
        return levels

    @property
    def pooled_dim(self) -> int:
        return self.dims[-1] + self.dims[-2]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, 480): the two deepest stages averaged over space (a classifier's input)."""
        return self.pool(self.features(x))

    @staticmethod
    def pool(features: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`pooled` from the pyramid :meth:`features` returns."""
        return torch.cat([features[-1].mean(dim=(2, 3)), features[-2].mean(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.features(x)


def build_tinyvit_encoder(arch: dict) -> TinyViTEncoder:
    """A TinyViT of the recorded shape, random weights (a saved segmenter's weights load over it)."""
    return TinyViTEncoder(TinyViT(TinyViTConfig.from_dict(arch)))


class TinyViTUNet(nn.Module):
    """(B, 1, S, S) -> class logits (B, n_classes, S, S) on a TinyViT's feature pyramid.

    ``encode`` and ``decode`` are separate so that a frozen encoder's features can be computed once
    per training slice and the decoder trained on them (see ``train.finetune``).
    """

    def __init__(self, encoder: TinyViTEncoder, n_classes: int, feature_size: int = 16, norm: str = "instance"):
        super().__init__()
        self.encoder = encoder
        self.n_classes = n_classes
        d1, d2, d3 = encoder.dims
        f = feature_size
        kw = dict(spatial_dims=2, kernel_size=3, norm_name=norm)
        self.stem = UnetrBasicBlock(in_channels=1, out_channels=f, stride=1, res_block=True, **kw)  # edges, S
        self.bottom = UnetResBlock(in_channels=d2 + d3, out_channels=f * 8, stride=1, **kw)  # S/4
        self.lateral = UnetResBlock(in_channels=d1, out_channels=f * 4, stride=1, **kw)  # S/2
        self.up1 = UnetrUpBlock(in_channels=f * 8, out_channels=f * 4, upsample_kernel_size=2, res_block=True, **kw)
        self.up2 = UnetrUpBlock(in_channels=f * 4, out_channels=f, upsample_kernel_size=2, res_block=True, **kw)
        self.out = UnetOutBlock(spatial_dims=2, in_channels=f, out_channels=n_classes)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.features(x)

    @property
    def first_adapted(self) -> int | None:
        """The first stage LoRA adapts when it was given stages (``LORA_STAGES``), else None."""
        stages = getattr(self.encoder, "lora_stages", None)
        return min(stages) if stages else None

    def encode_frozen(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's part before :attr:`first_adapted`, computed once per slice in fine-tuning."""
        return self.encoder.frozen_part(x, self.first_adapted)

    def decode_frozen(self, x: torch.Tensor, part: list[torch.Tensor]) -> torch.Tensor:
        """Logits from :meth:`encode_frozen`'s output: the adapted stages, then the decoder."""
        return self.decode(x, self.encoder.features_from([t.to(x.dtype) for t in part], self.first_adapted))

    def decode(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        s2, s4a, s4b = (t.to(x.dtype) for t in feats)
        d = self.bottom(torch.cat([s4b, s4a], dim=1))  # (B, 8f, S/4, S/4)
        d = self.up1(d, self.lateral(s2))  # (B, 4f, S/2, S/2)
        d = self.up2(d, self.stem(x))  # (B, f, S, S)
        return self.out(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x, self.encode(x))


def litemedsam_encoder(image_size: int | None = None, pretrained: bool = True) -> tuple[TinyViTEncoder, dict]:
    """LiteMedSAM's image encoder with its released weights (``pretrained``) or random ones, built for
    ``image_size`` (default its native 256): its convolutions and windowed attention take any side
    that divides by 16, so a smaller side trades detail for speed without changing a weight."""
    from medfound.errors import InputError
    from medfound.models.litemedsam import IMAGE_SIZE, check_weights

    size = int(image_size or IMAGE_SIZE)
    if size % SIZE_MULTIPLE or size < 2 * SIZE_MULTIPLE:
        raise InputError(None, f"--image-size {size} must be a multiple of {SIZE_MULTIPLE} (at least 32) for TinyViT")
    tinyvit = TinyViT(TinyViTConfig(image_size=size))
    info = {"kind": "scratch", "image_size": size}
    if pretrained:
        path = check_weights()
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        prefix = "image_encoder."
        tinyvit.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        info = {"kind": "litemedsam", "image_size": size, "weights": str(path)}
    return TinyViTEncoder(tinyvit), info

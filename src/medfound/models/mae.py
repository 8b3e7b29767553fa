"""Masked autoencoder (He et al., 2022) on a :class:`ViTEncoder`, for 1-channel medical slices.

The encoder sees only the visible patches (25 % at the default ratio 0.75); a light decoder gets
them back in place among shared mask tokens and predicts the pixels of every patch; the loss is the
mean squared error on the masked patches, against per-patch normalised targets by default. Every
tensor that meets an activation is cast to the activation dtype, so the model runs under bf16
autocast (MONAI 1.6.1's MaskedAutoEncoderViT fails there on its mask tokens) and compiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from medfound.models.vit import VIT_CONFIGS, Block, ViTConfig, ViTEncoder, _init_linear_and_norm, sincos_pos_embed


@dataclass(frozen=True)
class MAEConfig:
    encoder: str = "vit-tiny"
    decoder_width: int = 192
    decoder_depth: int = 4
    decoder_heads: int = 3
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class MAE(nn.Module):
    def __init__(self, config: MAEConfig = MAEConfig(), encoder_config: ViTConfig | None = None):
        super().__init__()
        self.config = config
        enc = encoder_config or VIT_CONFIGS[config.encoder]
        self.encoder = ViTEncoder(enc)
        p, Dd = enc.patch_size, config.decoder_width
        self.decoder_embed = nn.Linear(enc.width, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_blocks = nn.ModuleList([Block(Dd, config.decoder_heads, 4.0) for _ in range(config.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, p * p * enc.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(_init_linear_and_norm)

    @property
    def patch_size(self) -> int:
        return self.encoder.config.patch_size

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order."""
        B, C, H, W = imgs.shape
        p = self.patch_size
        x = imgs.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, (h, w) = self.patch_size, grid
        C = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    @staticmethod
    def random_masking(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random (1 - ratio) of the tokens per sample, by sorting uniform noise.

        Returns the kept tokens (B, K, D), the mask (B, N: 1 = masked) and the permutation that
        restores the original order.
        """
        B, N, D = x.shape
        keep = max(1, int(N * (1 - ratio)))
        noise = torch.rand(B, N, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
        mask = torch.ones(B, N, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, ratio: float):
        tokens = self.encoder.embed(imgs)
        kept, mask, ids_restore = self.random_masking(tokens, ratio)
        latent, _ = self.encoder.forward_tokens(kept)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, K1, Dd = x.shape
        N = ids_restore.shape[1]
        masks = self.mask_token.to(x.dtype).expand(B, N + 1 - K1, -1)  # cast: the bf16 fix
        x_ = torch.cat([x[:, 1:], masks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, Dd))  # back to patch order
        pos = sincos_pos_embed(Dd, *grid)[None].to(device=x.device, dtype=x.dtype)
        x = torch.cat([x[:, :1], x_ + pos], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*C)

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None):
        """Returns (loss, predicted patches (B, N, p*p*C), mask (B, N))."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        p = self.patch_size
        grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return self.loss(imgs, pred, mask), pred, mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted image in input units (undoing the per-patch normalisation with the visible
        statistics of each patch's target), with visible patches copied from the input."""
        p = self.patch_size
        grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
        target = self.patchify(imgs)
        pred = pred.float()
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        m = mask[..., None]
        return self.unpatchify(pred * m + target * (1 - m), grid)

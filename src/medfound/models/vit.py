"""Vision Transformer encoder for 1-channel medical slices (the MAE and segmentation backbone).

In the style of facebookresearch/mae: patch embedding, a class token, fixed 2D sin-cos position
embeddings, pre-norm transformer blocks. Attention goes through ``scaled_dot_product_attention`` so
PyTorch picks the fused kernel for the device and dtype (flash / memory-efficient on GPU); on CPU
the explicit softmax(QK^T)V product measured faster for ViT shapes and is used instead. Position embeddings are computed for any grid, so one encoder runs at any
image size that is a multiple of the patch size.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    in_chans: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


#: Named encoder sizes. ``vit-micro`` is for tests and quick checks only.
VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit-micro": ViTConfig(width=64, depth=2, heads=2),
    "vit-tiny": ViTConfig(width=192, depth=12, heads=3),
    "vit-small": ViTConfig(width=384, depth=12, heads=6),
    "vit-base": ViTConfig(width=768, depth=12, heads=12),
}


@functools.lru_cache(maxsize=64)
def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding, (grid_h * grid_w, dim): half the channels encode rows, half columns."""
    assert dim % 4 == 0, "embedding width must be divisible by 4"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    out = []
    for pos in (gh.reshape(-1), gw.reshape(-1)):
        ang = np.einsum("m,d->md", pos, omega)  # (M, dim/4)
        out += [np.sin(ang), np.cos(ang)]
    return torch.from_numpy(np.concatenate(out, axis=1)).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with N = (H/p) * (W/p): one linear map per non-overlapping patch."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, D/heads)
        if x.device.type == "cpu":
            # Measured on CPU (bf16, head dim 64, 50-200 tokens): the explicit product runs 3x faster
            # forward+backward than SDPA's fused CPU kernel, whose backward dominated the MAE step.
            x = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """ViT over 1-channel images; ``forward`` returns tokens (B, 1 + N, D) with the class token first.

    ``forward_tokens`` runs the blocks on an already-embedded (and possibly masked) token set, which
    is how the MAE feeds it only the visible patches.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D = config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList([Block(D, config.heads, config.mlp_ratio) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(_init_linear_and_norm)
        _init_linear_and_norm(self.norm)

    def pos_embed(self, grid: tuple[int, int], device, dtype) -> torch.Tensor:
        """(1, N, D) fixed position embedding for a patch grid."""
        return sincos_pos_embed(self.config.width, *grid)[None].to(device=device, dtype=dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens with position, (B, N, D), no class token."""
        p = self.config.patch_size
        tokens = self.patch_embed(x)
        return tokens + self.pos_embed((x.shape[-2] // p, x.shape[-1] // p), tokens.device, tokens.dtype)

    def forward_tokens(self, tokens: torch.Tensor, return_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prepend the class token, run the blocks; also return hidden states after ``return_layers``
        (1-based block indices) for multi-scale decoders."""
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        kept = {}
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if i in return_layers:
                kept[i] = x
        return self.norm(x), [kept[i] for i in return_layers]  # in the order asked, repeats allowed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed(x))[0]


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

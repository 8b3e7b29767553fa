"""TinyViT, the image encoder of LiteMedSAM, written for medfound.

LiteMedSAM's own package imports ``timm`` for this encoder, and timm needs torchvision, which does
not import beside the CPU torch medfound pins; so the architecture is written here, one class per
idea, in segment-anything's style. Parameter names follow the released state dict exactly
(``patch_embed.seq.0.c``, ``layers.N.blocks.M.attn.qkv``, ``neck.0`` ...), so the weights load strictly.

The LiteMedSAM variant (256x256 input, 256x64x64 embedding) differs from the TinyViT paper in two
ways that its weights depend on: the patch embedding is two 1x1 convolutions at full resolution (no
stride), and the last merge keeps the resolution, so the stages run at 256, 128, 64 and 64 pixels.
No weight depends on the input side (attention biases are per offset inside a window), so the same
network runs on any square input whose side divides by 4: each block reads its map's side from its
token count. A 128 px input costs about a quarter of a 256 px one (``infer.sam_segment``'s box crops).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.errors import InputError
from medfound.models.onednn import conv2d_act, linear_act


#: ``--encoder`` names of LiteMedSAM's TinyViT: with its released weights, and the same network random
TINYVIT_ENCODERS = ("litemedsam", "scratch:tinyvit")


@dataclass(frozen=True)
class TinyViTConfig:
    image_size: int = 256
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand: float = 4.0
    out_chans: int = 256

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyViTConfig:
        """Back from :meth:`as_dict` as stored in a config.json (lists -> tuples; a ``type`` key ignored)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__})


def stage_attention(stages: tuple[int, ...], names: tuple[str, ...] = ("qkv",)) -> str:
    """The modules ``names`` of the attention of every block in ``stages``, as a pattern of names
    inside a TinyViT (peft's ``target_modules`` as one regular expression): where LoRA goes when only
    some stages are adapted."""
    return rf"layers\.({'|'.join(map(str, stages))})\.blocks\.\d+\.attn\.({'|'.join(names)})"


def check_attention_stages(stages: tuple[int, ...], n_stages: int) -> None:
    """An InputError unless every stage in ``stages`` has attention (1..n-1: stage 0 is convolutional),
    so that LoRA on them adapts something."""
    if not stages or any(s < 1 or s >= n_stages for s in stages):
        raise InputError(None, f"--lora-stages must lie in 1..{n_stages - 1} (TinyViT's attention stages), got "
                               f"{','.join(map(str, stages)) or 'none'}")


def token_side(x: torch.Tensor) -> int:
    """The side of the square map that tokens (B, side*side, C) come from."""
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"TinyViT runs on square maps; got {x.shape[1]} tokens")
    return side


def to_map(x: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """Tokens (B, side*side, C) -> map (B, C, side, side), a channels-last view (no copy)."""
    side = side or token_side(x)
    return x.view(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Map (B, C, H, W) -> tokens (B, H*W, C); no copy for a channels-last map."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class ConvBN(nn.Sequential):
    """Convolution without bias followed by batch norm (named ``c`` and ``bn`` as released).

    With the batch norm in eval mode (always, in TinyViT: see :meth:`TinyViT.train`) it runs as one
    convolution whose weights carry the norm: the same function, one pass over the map instead of two;
    ``act="gelu"`` applies the GELU that follows inside that pass too (on a CPU, see ``models.onednn``).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        c, bn = self.c, self.bn
        if bn.training:
            y = bn(c(x))
            return F.gelu(y) if act else y
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
        weight = c.weight * scale.view(-1, 1, 1, 1)
        return conv2d_act(x, weight, bn.bias - bn.running_mean * scale, c.stride, c.padding, c.groups, act)


class PatchEmbed(nn.Module):
    """Pixels -> stage-0 features at full resolution: two 1x1 conv-BN with a GELU between."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(cin, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](self.seq[0](x, act="gelu"))  # seq[1] is that GELU


class MBConv(nn.Module):
    """Inverted residual (expand 1x1, depthwise 3x3, project 1x1) of the convolutional first stage."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.conv2(self.conv1(x, act="gelu"), act="gelu")
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Between stages: 1x1 to the next width, depthwise 3x3 (stride 2, or 1 before the last stage),
    1x1. Takes (B, C, H, W) or tokens (B, H*W, C); returns tokens (B, H'*W', C')."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = to_map(x)
        return to_tokens(self.conv3(self.conv2(self.conv1(x, act="gelu"), act="gelu")))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned bias per head for each (|dy|, |dx|)
    offset between two positions. ``qkv`` packs, per head, the query, key and value side by side."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idx = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(offsets)))
        self.register_buffer("bias_index", torch.tensor(idx).view(len(points), len(points)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B', N, C) with N = window * window
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.head_dim).permute(0, 2, 1, 3).chunk(3, dim=-1)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)  # (heads, N, N)
        # the bias expanded over the windows: CPU attention then takes its fused kernel, not the
        # unfused fallback a broadcast mask gets (2-3x slower)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(b, -1, -1, -1))  # (B', heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_act(self.norm(x), self.fc1, "gelu"))


class TinyViTBlock(nn.Module):
    """Window attention (zero-padded to whole windows), a depthwise 3x3 conv-BN, an MLP; residuals
    around the attention and the MLP."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windows(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, n, c = x.shape
        h = w = side
        ws = self.window
        x = x.view(b, h, w, c)
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        nh, nw = (h + ph) // ws, (w + pw) // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, h + ph, w + pw, c)
        return x[:, :h, :w].reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H*W, C)
        side = token_side(x)
        x = x + (self.attn(x) if side == self.window else self._windows(x, side))
        x = to_tokens(self.local_conv(to_map(x, side)))
        return x + self.mlp(x)


class Stage(nn.Module):
    """One stage: its blocks, then the merge into the next stage (none after the last); run by
    :meth:`TinyViT.run_stage`, which keeps the stage's output before the merge."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (as in segment-anything's necks)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + self.bias[:, None, None]


#: SAM's input normalisation (RGB 0-255, ImageNet statistics), which every medfound SAM encoder receives
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: (B, 3, 256, 256) -> (B, 256, 64, 64).

    It takes what every SAM encoder in medfound is given (SAM-normalised RGB, see
    ``models.sam.to_sam_input``) and turns it into MedSAM's own input - intensities min-max scaled to
    [0, 1] per image, three equal channels - so that sessions, propagation, the viewer and LoRA
    fine-tuning run on it unchanged.
    """

    def __init__(self, cfg: TinyViTConfig = TinyViTConfig()):
        super().__init__()
        self.cfg = cfg
        self.img_size = cfg.image_size
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(3, dims[0])
        layers = []
        for i, (dim, depth) in enumerate(zip(dims, cfg.depths)):
            last = i == len(dims) - 1
            down = None if last else PatchMerging(dim, dims[i + 1], stride=1 if i == len(dims) - 2 else 2)
            if i == 0:
                blocks = [MBConv(dim, cfg.mbconv_expand) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(dim, cfg.num_heads[i], cfg.window_sizes[i], cfg.mlp_ratio)
                          for _ in range(depth)]
            layers.append(Stage(blocks, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(nn.Conv2d(dims[-1], cfg.out_chans, 1, bias=False), LayerNorm2d(cfg.out_chans),
                                  nn.Conv2d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False),
                                  LayerNorm2d(cfg.out_chans))
        self.register_buffer("sam_mean", torch.tensor(SAM_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sam_std", torch.tensor(SAM_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> TinyViT:
        """Batch norms keep the released statistics in training too: LoRA fine-tuning saves only the
        adapters and trained parts, so statistics that drifted in training would be lost on reload.
        Also where a distributed run has made them SyncBatchNorm (Lightning's ``sync_batchnorm``)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def medsam_input(self, x: torch.Tensor) -> torch.Tensor:
        """SAM-normalised RGB -> MedSAM's [0, 1] input, min-max scaled per image."""
        x = (x * self.sam_std + self.sam_mean) / 255.0
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def stem(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) SAM-normalised -> (B, C0, S, S)
        # channels last: the convolutions' native layout, and tokens are a view of it
        return self.patch_embed(self.medsam_input(x).contiguous(memory_format=torch.channels_last))

    def run_stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage ``i`` on its input: (its output as a map (B, C_i, H_i, W_i), the next stage's input)."""
        layer = self.layers[i]
        for blk in layer.blocks:
            x = blk(x)
        out = x if x.ndim == 4 else to_map(x)
        return out, (layer.downsample(x) if layer.downsample is not None else x)

    def prefix(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The stem and the first ``stages`` stages: the input of stage ``stages``. When only later
        stages are adapted this part is frozen, so fine-tuning computes it once per slice."""
        x = self.stem(x)
        for i in range(stages):
            x = self.run_stage(i, x)[1]
        return x

    def forward_from(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """The embedding (B, 256, 64, 64) from stage ``stage``'s input (what :meth:`prefix` returns)."""
        for i in range(stage, len(self.layers)):
            out, x = self.run_stage(i, x)
        return self.neck(out)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' outputs as maps (B, C_i, H_i, W_i) for SAM-normalised input (as ``forward``):
        the feature pyramid a segmentation decoder can stand on."""
        x, out = self.stem(x), []
        for i in range(len(self.layers)):
            o, x = self.run_stage(i, x)
            out.append(o)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) SAM-normalised
        return self.forward_from(self.stem(x), 0)  # (B, 256, S/4, S/4)

"""In-context segmentation: segment a query slice from a support set of (image, mask) pairs.

The idea, in the spirit of UniverSeg/GMISeg but shaped by what DESIGN.md's prototype taught us:

* one shared convolutional encoder turns query and support images into multi-scale features;
* at 1/4 and 1/8 resolution every query pixel attends to a *window* of pixels around the same
  position in every support (local cross-attention = learned patch-based label fusion). Keys are image
  features only (matching is about appearance), values carry the support mask (the first value channel
  of each head is the raw mask, so the attention output is a label vote) plus mask-aware features;
* a support-level bias added to the attention logits lets the query favour supports that look like it
  (pooled-feature similarity) and that lie at the same relative position in their volume (when known);
* a U-Net decoder refines the votes with the query's own features into the query mask.

The attention is a softmax jointly over supports and window positions, so the output is invariant to the
order of the support set and accepts any support size. Support features can be computed once
(:meth:`InContextSegmenter.encode_support`) and reused for every query slice of a volume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class InContextConfig:
    size: int = 128                             # working resolution (square slices)
    widths: tuple[int, ...] = (16, 32, 48, 64)  # encoder widths at 1, 1/2, 1/4, 1/8
    key_dim: int = 32                           # attention key width (all heads)
    value_dim: int = 32                         # attention value width (all heads, incl. the mask votes)
    heads: int = 4
    windows: tuple[int, int] = (7, 9)           # local window at 1/4 and at 1/8
    encoder: str = "conv"                       # "conv", "mae" (a ViT with LoRA, ViTPyramid) or "litemedsam"
    vit: dict | None = None                     # the ViT's (or TinyViT's) architecture when not "conv"
    lora_rank: int = 4
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["windows"] = list(self.widths), list(self.windows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InContextConfig:
        d = dict(d)
        d["widths"] = tuple(d.get("widths", cls.widths))
        d["windows"] = tuple(d.get("windows", cls.windows))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ConvBlock(nn.Module):
    """conv3x3 (stride s) -> GN -> GELU -> conv3x3 -> GN -> GELU, with a projected residual."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, cout // 4), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, cout // 4), cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(y)) + self.skip(x))


class Encoder(nn.Module):
    """(B, 1, S, S) -> features at S, S/2, S/4, S/8."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        chans = (1, *widths)
        self.stages = nn.ModuleList(ConvBlock(chans[i], chans[i + 1], 1 if i == 0 else 2) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ViTPyramid(nn.Module):
    """A pretrained MAE encoder (frozen, LoRA on its attention) as the in-context encoder.

    The ViT sees 16-px patches, so its tokens (S/16) are brought to the two attention scales with
    transposed convolutions (ViTDet's simple feature pyramid); the full- and half-resolution levels
    that the decoder's skip connections need come from a small convolutional stem on the image, as in
    UNETR. Output: the same four maps as :class:`Encoder`, (B, w_i, S / 2^i, S / 2^i)."""

    def __init__(self, widths: tuple[int, ...], vit: nn.Module):
        super().__init__()
        self.vit = vit
        d = vit.config.width
        self.stem = nn.ModuleList([ConvBlock(1, widths[0]), ConvBlock(widths[0], widths[1], 2)])
        self.up8 = nn.Sequential(nn.ConvTranspose2d(d, widths[3], 2, 2), nn.GroupNorm(min(8, widths[3] // 4), widths[3]), nn.GELU())
        self.up4 = nn.Sequential(nn.ConvTranspose2d(widths[3], widths[2], 2, 2), nn.GroupNorm(min(8, widths[2] // 4), widths[2]), nn.GELU())
        self.fuse8 = ConvBlock(widths[3], widths[3])
        self.fuse4 = ConvBlock(widths[2], widths[2])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        p = self.vit.config.patch_size
        tokens = self.vit(x)[:, 1:]                                    # (B, HW/p^2, D), class token dropped
        grid = tokens.transpose(1, 2).reshape(b, -1, h // p, w // p)    # (B, D, S/16, S/16)
        f8 = self.fuse8(self.up8(grid))                                  # (B, w3, S/8, S/8)
        f4 = self.fuse4(self.up4(f8))                                    # (B, w2, S/4, S/4)
        f1 = self.stem[0](x)
        return [f1, self.stem[1](f1), f4, f8]


def _project(cin: int, cout: int) -> nn.Module:
    """1x1 conv -> GN -> GELU: a stage's channels to the decoder's width."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(min(8, cout // 4), cout), nn.GELU())


class TinyViTPyramid(nn.Module):
    """LiteMedSAM's TinyViT (frozen, LoRA on its attention) as the in-context encoder, as GMISeg
    adapts SAM's encoder for in-context segmentation.

    The TinyViT reads the slice at half the working side, so its four stages land at S/2, S/4, S/8
    and S/8 (64, 128, 160, 320 channels): the two attention levels read its second stage and its two
    deepest stages joined, 1x1 projections bring each to the decoder's width, and a convolutional
    block on the slice itself carries the edges at full resolution (as the conv encoder's first
    stage, so a conv model's weights can start it). Half the side is a quarter of the encoder's cost,
    whose first stage runs at the resolution it is given. Output: the same four maps as :class:`Encoder`."""

    def __init__(self, widths: tuple[int, ...], tinyvit: nn.Module):
        super().__init__()
        self.tinyvit = tinyvit
        c0, c1, c2, c3 = tinyvit.cfg.embed_dims
        self.stem = ConvBlock(1, widths[0])
        self.p2, self.p4, self.p8 = _project(c0, widths[1]), _project(c1, widths[2]), _project(c2 + c3, widths[3])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        from medfound.models.sam import to_sam_input

        # TinyViT rescales each image to [0, 1] itself
        s2, s4, s8a, s8b = self.tinyvit.features(to_sam_input(F.avg_pool2d(x, 2)))
        return [self.stem(x), self.p2(s2), self.p4(s4), self.p8(torch.cat([s8a, s8b], dim=1))]


def build_encoder(cfg: InContextConfig, vit: nn.Module | None = None) -> nn.Module:
    """The convolutional encoder, or a ViT / TinyViT (``vit``: pretrained weights, else built from
    ``cfg.vit``) with LoRA adapters for ``encoder == "mae"`` / ``"litemedsam"``."""
    if cfg.encoder == "conv":
        return Encoder(cfg.widths)
    if cfg.encoder == "litemedsam":
        from medfound.models.lora import add_lora
        from medfound.models.tinyvit import TinyViT, TinyViTConfig

        if vit is None:
            vit = TinyViT(TinyViTConfig.from_dict(cfg.vit or {}))
        if cfg.size % 16:
            raise ValueError(f"the in-context TinyViT encoder needs a working size that is a multiple of 16 (got {cfg.size})")
        return TinyViTPyramid(cfg.widths, add_lora(vit, cfg.lora_rank))
    if cfg.encoder != "mae" or not cfg.vit:
        raise ValueError(f"unknown in-context encoder {cfg.encoder!r} (conv, litemedsam, or mae with a ViT architecture)")
    from medfound.models.lora import add_lora
    from medfound.models.vit import ViTConfig, ViTEncoder

    if vit is None:
        vit = ViTEncoder(ViTConfig(**{k: v for k, v in cfg.vit.items() if k != "type"}))
    if vit.config.patch_size != 16 or cfg.size % 16:
        raise ValueError(f"the in-context MAE encoder needs 16-px patches and a working size that is a multiple of "
                         f"16 (patch {vit.config.patch_size}, size {cfg.size})")
    return ViTPyramid(cfg.widths, add_lora(vit, cfg.lora_rank))


class LocalCrossAttention(nn.Module):
    """Each query pixel attends to a ``window x window`` neighbourhood at the same position in every
    support; softmax jointly over (support, window offset). Written by hand because no library op
    does windowed attention *across* a set of other images (NATTEN-style kernels attend within one)."""

    def __init__(self, dim: int, key_dim: int, value_dim: int, heads: int, window: int):
        super().__init__()
        assert key_dim % heads == 0 and value_dim % heads == 0 and value_dim // heads >= 2
        self.heads, self.window = heads, window
        self.dk, self.dv = key_dim // heads, value_dim // heads
        self.to_q = nn.Conv2d(dim, key_dim, 1)
        self.to_k = nn.Conv2d(dim, key_dim, 1)
        self.to_v = nn.Conv2d(dim + 1, heads * (self.dv - 1), 1)  # + the raw mask vote per head
        self.rel_bias = nn.Parameter(torch.zeros(heads, window * window))  # prefer the same position
        # a learned "none of the supports" sink with a zero value: when every support is far (in position
        # or appearance) the softmax mass goes here and the votes fall to 0 — without it, a constant bias
        # on all supports cancels in the softmax and the query always copies *some* support's mask
        self.null_logit = nn.Parameter(torch.full((heads,), -8.0))
        self.out = nn.Conv2d(value_dim, dim, 1)
        with torch.no_grad():  # start with a mild preference for the centre of the window
            c = window // 2
            yy, xx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
            self.rel_bias.copy_((-((yy - c) ** 2 + (xx - c) ** 2).float() / (window * window / 4)).flatten()[None]
                                .expand(heads, -1))

    def _windows(self, t: torch.Tensor, g: int, n: int) -> torch.Tensor:
        """(G*N, h*d, H, W) support maps -> (G, h*H*W, N*w2 + 1, d): for every (head, pixel) its window
        in every support, zero outside the image, plus a zero last row (the null sink). Windows are a
        strided view of the padded maps written out by one copy (``F.unfold`` and a permute would
        write them twice more — at 64 supports that is most of the encoding time)."""
        m, hd, h, w = t.shape
        win, d = self.window, hd // self.heads
        r = win // 2
        # channels last first, so that the copy below reads each window's d channels contiguously
        view = F.pad(t.permute(0, 2, 3, 1), (0, 0, r, r, r, r)).unfold(1, win, 1).unfold(2, win, 1)
        view = view.view(g, n, h, w, self.heads, d, win, win).permute(0, 4, 2, 3, 1, 6, 7, 5)  # (G, h, H, W, N, win, win, d)
        out = t.new_empty(g, self.heads * h * w, n * win * win + 1, d)
        out[:, :, -1] = 0
        out[:, :, :-1].unflatten(2, (n, win, win)).unflatten(1, (self.heads, h, w)).copy_(view)
        return out

    def support_kv(self, feat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """feat (G, N, C, H, W), mask (G, N, 1, H, W) -> keys (G, h*HW, N*w2 + 1, dk), values
        (G, h*HW, N*w2 + 1, dv) and the query-independent logit bias (1, h*HW, 1, N*w2 + 1).

        Every (head, pixel) pair is one attention "batch" of the query rows against its N*w2 window
        keys, the layout :func:`F.scaled_dot_product_attention` takes, so the fused kernel never writes
        the logits out. The last key is the null sink: a zero key and a zero value whose logit is the
        bias ``null_logit``; the bias also holds the window-position preference and -inf for the zero
        padding at the border. All of it is paid once per support set."""
        g, n, c, h, w = feat.shape
        w2, p, heads = self.window ** 2, h * w, self.heads
        flat, m = feat.flatten(0, 1), mask.flatten(0, 1)
        k = self._windows(self.to_k(flat), g, n)
        v = self.to_v(torch.cat([flat, m * 2 - 1], 1)).view(g * n, heads, self.dv - 1, h, w)
        v = self._windows(torch.cat([m[:, None].expand(-1, heads, -1, -1, -1), v], 2).flatten(1, 2), g, n)
        r = self.window // 2
        inside = F.pad(feat.new_ones(1, 1, h, w), (r, r, r, r)).unfold(2, self.window, 1).unfold(3, self.window, 1)
        outside = inside.reshape(1, p, 1, w2) < 0.5  # (1, HW, 1, w2): window positions beyond the border
        bias = self.rel_bias.new_empty(heads, p, n * w2 + 1)
        bias[..., -1] = self.null_logit[:, None]
        bias[..., :-1].unflatten(-1, (n, w2)).copy_(self.rel_bias[:, None, None, :].masked_fill(outside, float("-inf")))
        return k, v, bias.view(1, heads * p, 1, n * w2 + 1)

    def forward(self, q_feat: torch.Tensor, kv: tuple, support_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_feat (B, C, H, W); support_bias (B, N) -> (features (B, C, H, W), votes (B, heads, H, W)).
        The support batch G is either B (one support set per query, training) or 1 (shared, inference)."""
        k, v, bias = kv
        b, c, h, w = q_feat.shape
        g, p, w2 = k.shape[0], h * w, self.window ** 2
        r, n = b // g, support_bias.shape[-1]
        q = self.to_q(q_feat).view(g, r, self.heads, self.dk, p).permute(0, 2, 4, 1, 3)  # (G, h, HW, R, dk)
        q = q.reshape(g, self.heads * p, r, self.dk)
        sb = support_bias.view(g, 1, r, n, 1).expand(-1, -1, -1, -1, w2).reshape(g, 1, r, n * w2)
        mask = (bias + F.pad(sb, (0, 1))).to(q.dtype)  # (G, h*HW, R, N*w2 + 1); the sink has no support bias
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)  # (G, h*HW, R, dv)
        out = out.view(g, self.heads, p, r, self.dv).permute(0, 3, 1, 4, 2).reshape(b, self.heads, self.dv, h, w)
        votes = out[:, :, 0]
        return self.out(out.reshape(b, self.heads * self.dv, h, w)), votes


@dataclass
class SupportCache:
    """Support-set features computed once and reused for every query (batch dim 1 broadcasts)."""

    kv: list[tuple]           # per attention level: (keys, values, logit bias)
    pooled: torch.Tensor      # (B, N, key_dim) global descriptors
    positions: torch.Tensor   # (B, N) relative slice positions in [0, 1]
    has_position: torch.Tensor  # (B, N) 1 where the position is known


class InContextSegmenter(nn.Module):
    def __init__(self, config: InContextConfig | None = None, vit: nn.Module | None = None):
        super().__init__()
        self.config = cfg = config or InContextConfig()
        w = cfg.widths
        self.encoder = build_encoder(cfg, vit)
        self.attn = nn.ModuleList([LocalCrossAttention(w[2], cfg.key_dim, cfg.value_dim, cfg.heads, cfg.windows[0]),
                                   LocalCrossAttention(w[3], cfg.key_dim, cfg.value_dim, cfg.heads, cfg.windows[1])])
        self.pool_q = nn.Linear(w[3], cfg.key_dim)
        self.pool_k = nn.Linear(w[3], cfg.key_dim)
        self.position_weight = nn.Parameter(torch.tensor(2.0))  # softplus -> penalty per unit of position gap
        h = cfg.heads
        self.dec3 = ConvBlock(2 * w[3] + h, w[3])
        self.dec2 = ConvBlock(w[3] + 2 * w[2] + h + h, w[2])
        self.dec1 = ConvBlock(w[2] + w[1], w[1])
        self.dec0 = ConvBlock(w[1] + w[0], w[0])
        self.head = nn.Conv2d(w[0], 1, 1)

    def encode_support(self, images: torch.Tensor, masks: torch.Tensor,
                       positions: torch.Tensor | None = None) -> SupportCache:
        """images, masks: (B, N, 1, S, S); positions (B, N) or None -> a :class:`SupportCache`."""
        b, n = images.shape[:2]
        feats = self.encoder(images.flatten(0, 1))
        kv = []
        for attn, f in zip(self.attn, feats[2:]):
            m = F.adaptive_avg_pool2d(masks.flatten(0, 1).to(f.dtype), f.shape[-2:])
            kv.append(attn.support_kv(f.view(b, n, *f.shape[1:]), m.view(b, n, *m.shape[1:])))
        pooled = self.pool_k(feats[3].mean((-2, -1))).view(b, n, -1)
        if positions is None:
            pos = torch.zeros(b, n, device=images.device)
            has = torch.zeros(b, n, device=images.device)
        else:
            pos = positions.to(images.device).float()
            has = torch.isfinite(pos).float()
            pos = torch.nan_to_num(pos, nan=0.0)
        return SupportCache(kv, pooled, pos, has)

    def decode(self, query: torch.Tensor, support: SupportCache, query_positions: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, 1, S, S) -> mask logits (B, 1, S, S)."""
        b = query.shape[0]
        q0, q1, q2, q3 = self.encoder(query)
        # support-level bias (B, N): looks alike (pooled features) and lies at the same relative position
        sim = torch.einsum("bd,bnd->bn", self.pool_q(q3.mean((-2, -1))), support.pooled.expand(b, -1, -1))
        bias = sim / math.sqrt(sim.new_tensor(self.config.key_dim))
        if query_positions is not None:
            qp = query_positions.to(query.device).float()
            known = torch.isfinite(qp).float()[:, None] * support.has_position
            gap = (torch.nan_to_num(qp, nan=0.0)[:, None] - support.positions).abs()
            bias = bias - F.softplus(self.position_weight) * 10.0 * gap * known
        a2, v2 = self.attn[0](q2, support.kv[0], bias)
        a3, v3 = self.attn[1](q3, support.kv[1], bias)
        x = self.dec3(torch.cat([q3, a3, v3], 1))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        v3_up = F.interpolate(v3, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.dec2(torch.cat([x, q2, a2, v2, v3_up], 1))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.dec1(torch.cat([x, q1], 1))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.dec0(torch.cat([x, q0], 1))
        return self.head(x)

    def forward(self, query: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_positions: torch.Tensor | None = None, support_positions: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, 1, S, S); support_* (B, N, 1, S, S); positions (B,), (B, N) -> logits (B, 1, S, S)."""
        cache = self.encode_support(support_images, support_masks, support_positions)
        return self.decode(query, cache, query_positions)


def load_shared_weights(dst: InContextSegmenter, src: InContextSegmenter) -> int:
    """Start ``dst`` from an in-context model with another encoder: the cross-attention, the pooled
    similarity and the decoder are read on the same widths whatever the encoder, and the conv
    encoder's full-resolution stage is the TinyViT pyramid's stem; everything else keeps its own
    weights. Returns how many tensors were copied."""
    def shared(cfg: InContextConfig) -> dict:  # what the non-encoder modules' shapes depend on
        return {k: v for k, v in cfg.as_dict().items() if k not in ("encoder", "vit", "lora_rank", "extra")}

    if shared(src.config) != shared(dst.config):
        raise ValueError("the two in-context models differ in more than their encoder (size, widths, attention)")
    conv_stage = "encoder.stages.0."
    mine, copied = dst.state_dict(), {}
    for key, value in src.state_dict().items():
        if src.config.encoder == "conv" and key.startswith(conv_stage):
            key = "encoder.stem." + key[len(conv_stage):]
        if (not key.startswith("encoder.") or key.startswith("encoder.stem.")) and key in mine \
                and mine[key].shape == value.shape:
            copied[key] = value
    dst.load_state_dict(copied, strict=False)
    return len(copied)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

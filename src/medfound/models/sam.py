"""Segment Anything for medical slices: build at any input size, load official checkpoints, LoRA.

The modules are segment-anything's own (image encoder, prompt encoder, mask decoder). What is added:

* an input size other than 1024: the absolute position embedding and the relative position tables
  of the global-attention blocks are interpolated when loading released weights (SAM-Med2D, SAMed);
* loading official SAM ViT-B/L/H and MedSAM ``.pth`` files with ``torch.load(weights_only=True)``,
  inferring the variant from the weights;
* LoRA on the image encoder's ``qkv`` projections (peft); saving only adapters and trained parts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfound.errors import InputError
from medfound.models.sam_import import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


ADAPTER_FILE = "adapters.safetensors"
#: the LiteMedSAM whose mask decoder medfound adapted on the sample datasets (shipped in weights/litemedsam_decoder)
ADAPTED_LITEMEDSAM = "litemedsam-adapted"
#: LiteMedSAM with LoRA on its TinyViT's stages 2 and 3 and its decoder trained, whole slices then box crops
#: (shipped in weights/litemedsam_lora)
LORA_LITEMEDSAM = "litemedsam-lora"
#: ``--model`` names of the adapted SAMs shipped inside the package -> their run folders under weights/
SHIPPED_SAM_RUNS = {ADAPTED_LITEMEDSAM: "litemedsam_decoder", LORA_LITEMEDSAM: "litemedsam_lora"}


@dataclass(frozen=True)
class SamVariant:
    embed_dim: int
    depth: int
    heads: int
    global_attn: tuple[int, ...]
    window: int = 14
    prompt_dim: int = 256
    decoder_mlp: int = 2048

    def as_dict(self) -> dict:
        return asdict(self)


#: Released sizes, and a tiny one with the same structure for tests.
SAM_VARIANTS = {
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
    "tiny": SamVariant(64, 2, 2, (1,), window=4, prompt_dim=32, decoder_mlp=64),
}


def build_sam(variant: str | SamVariant = "vit_b", image_size: int = 1024) -> Sam:
    """A SAM with random weights at ``image_size`` (a multiple of 16)."""
    v = SAM_VARIANTS[variant] if isinstance(variant, str) else variant
    if image_size % 16:
        raise InputError(None, f"SAM image size must be a multiple of 16, got {image_size}")
    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=v.depth, embed_dim=v.embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=v.heads, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=list(v.global_attn), window_size=v.window, out_chans=v.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=v.prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=v.prompt_dim,
                                                               mlp_dim=v.decoder_mlp, num_heads=8 if v.prompt_dim >= 64 else 4),
                                 transformer_dim=v.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=v.prompt_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam


def variant_of(state: dict) -> SamVariant:
    """Infer the variant of an official-layout state dict from its shapes."""
    try:
        embed = state["image_encoder.patch_embed.proj.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
        prompt_dim = state["prompt_encoder.no_mask_embed.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise InputError(None, f"not a SAM checkpoint in the official key layout ({e})") from None
    for v in SAM_VARIANTS.values():
        if (v.embed_dim, v.depth, v.prompt_dim) == (embed, depth, prompt_dim):
            return v
    raise InputError(None, f"unknown SAM size: embed {embed}, depth {depth}")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """An official SAM / MedSAM ``.pth`` (a state dict, or one under ``model``/``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(path, f"cannot load as a PyTorch checkpoint (weights only): {' '.join(str(e).split())[:160]}") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(k.startswith("image_encoder.") for k in obj):
        raise InputError(path, "not a SAM checkpoint (no image_encoder.* weights)")
    return obj


def resize_for(state: dict, sam: Sam) -> dict:
    """Interpolate position embeddings and global rel-pos tables of ``state`` to ``sam``'s size."""
    target = sam.state_dict()
    out = dict(state)
    pe = "image_encoder.pos_embed"
    if pe in state and state[pe].shape != target[pe].shape:
        g = target[pe].shape[1]
        out[pe] = F.interpolate(state[pe].permute(0, 3, 1, 2).float(), size=(g, g), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
    for k, v in state.items():
        if ("rel_pos_h" in k or "rel_pos_w" in k) and k in target and v.shape != target[k].shape:
            n = target[k].shape[0]
            out[k] = F.interpolate(v.float().T[None], size=n, mode="linear", align_corners=False)[0].T
    return out


def load_sam(base: str | os.PathLike, image_size: int | None = None) -> tuple[Sam, dict]:
    """A SAM from an official checkpoint path, or random weights from a variant name (``vit_b``,
    ``tiny`` ...). Returns the model and a description for configs."""
    base = str(base)
    if base == "litemedsam":
        from medfound.models.litemedsam import load_litemedsam

        return load_litemedsam(image_size=image_size)
    if base.startswith("mae:"):
        return sam_from_mae(base[4:], image_size or 256)
    if base in SAM_VARIANTS:
        size = image_size or 1024
        torch.manual_seed(0)
        return build_sam(base, size), {"base": base, "variant": base, "image_size": size, "weights": "random"}
    state = read_checkpoint(base)
    v = variant_of(state)
    name = next(n for n, x in SAM_VARIANTS.items() if x == v)
    size = image_size or 16 * state["image_encoder.pos_embed"].shape[1]
    sam = build_sam(v, size)
    missing, unexpected = sam.load_state_dict(resize_for(state, sam), strict=False)
    if missing or unexpected:
        raise InputError(base, f"checkpoint does not fit SAM {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return sam, {"base": str(Path(base).resolve()), "variant": name, "image_size": size, "weights": "checkpoint"}


def sam_from_mae(run: str | os.PathLike, image_size: int) -> tuple[Sam, dict]:
    """A SAM whose image encoder starts from a medfound MAE encoder (same width, depth, heads;
    patch 16). Blocks, norms and the patch embedding transfer (the one input channel is spread over
    SAM's three); the sin-cos positions seed SAM's learned ones; relative positions, the neck, the
    prompt encoder and the mask decoder start fresh and are trained by fine-tuning."""
    from medfound.models.export import load_encoder

    enc, cfg = load_encoder(run)
    c = enc.config
    if c.patch_size != 16 or c.width % 4:
        raise InputError(run, "MAE encoder must use 16-pixel patches to serve as SAM's image encoder")
    depth = c.depth
    glob = tuple(sorted({max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)}))
    variant = SamVariant(c.width, depth, c.heads, glob, window=14, prompt_dim=256, decoder_mlp=2048)
    torch.manual_seed(0)
    sam = build_sam(variant, image_size)
    src = enc.state_dict()
    dst = sam.image_encoder.state_dict()
    mapped = {"patch_embed.proj.weight": src["patch_embed.proj.weight"].repeat(1, 3, 1, 1) / 3,
              "patch_embed.proj.bias": src["patch_embed.proj.bias"]}
    grid = image_size // 16
    mapped["pos_embed"] = enc.pos_embed((grid, grid), "cpu", torch.float32).reshape(1, grid, grid, c.width)
    for k, v in src.items():
        if k.startswith("blocks."):
            name = k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2")
            if name in dst and dst[name].shape == v.shape:
                mapped[name] = v
    missing = [k for k in dst if k not in mapped and "rel_pos" not in k and not k.startswith("neck.")]
    if missing:
        raise InputError(run, f"MAE encoder does not map onto SAM's image encoder (missing {missing[:3]})")
    sam.image_encoder.load_state_dict(mapped, strict=False)
    info = {"base": f"mae:{Path(run).resolve()}", "variant": "mae", "image_size": image_size, "weights": "mae-encoder",
            "encoder": c.as_dict()}
    return sam, info


def add_sam_lora(sam: Sam, rank: int = 4, targets: tuple[str, ...] = ("q", "v"), train_prompt_encoder: bool = False,
                 stages: tuple[int, ...] = ()) -> Sam:
    """LoRA on the image encoder's attention — on the query and value parts of the fused ``qkv``
    by default (SAMed), or on whole modules named in ``targets`` (e.g. ``qkv``, ``proj``) through
    peft — the mask decoder trains; the prompt encoder on request. ``stages`` (TinyViT only) limits
    the adapters to those stages' attention (1-3; stage 0 is convolutional); empty: every stage."""
    from medfound.models.lora import add_lora, add_qv_lora
    from medfound.models.tinyvit import TinyViT, check_attention_stages, stage_attention

    tinyvit = isinstance(sam.image_encoder, TinyViT)
    if stages and not tinyvit:
        raise InputError(None, "--lora-stages applies to LiteMedSAM's TinyViT encoder only")
    if stages and rank > 0:
        check_attention_stages(stages, len(sam.image_encoder.layers))
    if rank == 0:  # the mask decoder alone adapts; the encoder stays as released
        for p in sam.image_encoder.parameters():
            p.requires_grad = False
    else:
        if tinyvit and tuple(targets) == ("q", "v"):
            targets = ("qkv",)  # TinyViT packs q, k, v per head: adapt the whole projection (peft)
        if tuple(targets) == ("q", "v"):
            add_qv_lora(sam.image_encoder, rank)
        elif stages:
            add_lora(sam.image_encoder, rank=rank, targets=stage_attention(stages, tuple(targets)))
        else:
            add_lora(sam.image_encoder, rank=rank, targets=targets)
    for p in sam.prompt_encoder.parameters():
        p.requires_grad = train_prompt_encoder
    for p in sam.mask_decoder.parameters():
        p.requires_grad = True
    return sam


def trained_state(sam: Sam) -> dict[str, torch.Tensor]:
    """Only what fine-tuning changed: LoRA adapters and the parameters that were trained."""
    names = {n for n, p in sam.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()
            if k in names or "lora_" in k or (k.startswith("mask_decoder.") and not k.endswith("num_batches_tracked"))}


def sam_view(x: torch.Tensor) -> torch.Tensor:
    """Our (i, j) slices <-> SAM's (rows, cols) images: a transpose, so SAM's x is our i and y our j
    (the same call maps SAM's mask logits back)."""
    return x.transpose(-1, -2)


def append_point(points: tuple[torch.Tensor, torch.Tensor] | None, xy, label: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """``points`` ((1, n, 2) coordinates, (1, n) labels) or None, with one more click appended."""
    prev = points or (torch.zeros(1, 0, 2, device=device), torch.zeros(1, 0, dtype=torch.long, device=device))
    return (torch.cat([prev[0], torch.as_tensor(xy, dtype=torch.float32, device=device).view(1, 1, 2)], 1),
            torch.cat([prev[1], torch.tensor([[label]], device=device)], 1))


def to_sam_input(slices: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, 3, S, S) normalised as SAM was trained (RGB 0-255, ImageNet stats)."""
    x = slices.repeat(1, 3, 1, 1) * 255.0
    mean = torch.tensor([123.675, 116.28, 103.53], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def dense_pe(prompt_encoder, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The prompt encoder's positional encoding of an embedding grid (1, C, h, w) (its own grid by
    default), kept between prompts: it depends only on a fixed random buffer, and recomputing it is
    a sizeable part of a click's cost on a CPU. Recomputed when that buffer changes (a load, a move to
    another device). Always computed in fp32, so that a bf16 session's autocast never decides what
    every later caller gets."""
    grid = tuple(grid or prompt_encoder.image_embedding_size)
    gauss = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    key = (gauss.data_ptr(), gauss._version, gauss.device)
    cache = prompt_encoder.__dict__.setdefault("_medfound_dense_pe", {})
    if cache.get(grid, (None,))[0] != key:
        with torch.no_grad(), torch.autocast(gauss.device.type, enabled=False):
            cache[grid] = (key, prompt_encoder.pe_layer(grid).unsqueeze(0))
    return cache[grid][1]


def decode(sam: Sam, embedding: torch.Tensor, boxes: torch.Tensor | None = None,
           points: tuple[torch.Tensor, torch.Tensor] | None = None, size: int | None = None) -> torch.Tensor:
    """Mask logits (1, 1, S, S) for one image embedding (1, C, h, w) and its prompts (in pixels).
    Clicks alone are ambiguous (a part, the structure, its surroundings): a model whose decoder was
    trained with three outputs (``sam.multimask_clicks``) answers them with the one its IoU head scores best."""
    pe = sam.prompt_encoder
    size = size or sam.image_encoder.img_size
    grid = tuple(embedding.shape[-2:])
    scale = pe.input_image_size[0] / size
    if scale != 1:  # an input of another size (an encoder that runs at any size): pixel centres to the prompt encoder's
        boxes = None if boxes is None else (boxes + 0.5) * scale - 0.5
        points = None if points is None else ((points[0] + 0.5) * scale - 0.5, points[1])
    sparse, dense = pe(points=points, boxes=boxes, masks=None)
    if grid != tuple(dense.shape[-2:]):  # no mask prompt: the same learned vector at every position
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(dense.shape[0], -1, *grid)
    multi = boxes is None and points is not None and getattr(sam, "multimask_clicks", False)
    low, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=dense_pe(pe, grid),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multi)
    if multi:  # (B, 3, h, w) -> the best-scoring of the three, (B, 1, h, w)
        low = low[torch.arange(low.shape[0]), iou.argmax(dim=1)][:, None]
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def sam_run_folder(model: str | os.PathLike) -> Path:
    """Where a SAM run is: the package's own folder for a shipped name (``SHIPPED_SAM_RUNS``), else the path."""
    name = SHIPPED_SAM_RUNS.get(str(model))
    return Path(__file__).parent.parent / "weights" / name if name else Path(str(model))


def read_sam_run(path: Path) -> dict:
    """The config of a ``sam finetune`` run folder (config.json + adapters.safetensors); InputError otherwise."""
    import json

    cfg_path = path / "config.json"
    if not cfg_path.is_file() or not (path / ADAPTER_FILE).is_file():
        raise InputError(path, "not a SAM run folder (config.json + adapters.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kind") != "sam-lora":
        raise InputError(cfg_path, f"not a SAM LoRA run (kind={cfg.get('kind')!r})")
    return cfg


def load_sam_model(model: str | os.PathLike | None = None, base: str | None = None, image_size: int | None = None):
    """A SAM ready for prompting: ``None`` (the small conv SAM shipped with medfound), a conv SAM run
    from ``medfound sam train``, a LoRA run folder (its base + adapters; ``base`` overrides where the
    base checkpoint is now), an official checkpoint, or a variant name."""
    from safetensors.torch import load_file

    from medfound.models.sam_conv import is_sam_conv_run, load_sam_conv

    if model is None or is_sam_conv_run(model):
        sam, cfg = load_sam_conv(model)
        return sam, {**cfg, "adapted": False}
    path = sam_run_folder(model)
    if path.is_dir():
        cfg = read_sam_run(path)
        sam, info = load_sam(base or cfg["base"]["base"], cfg["image_size"])
        add_sam_lora(sam, cfg["rank"], tuple(cfg.get("targets", ["q", "v"])), cfg.get("train_prompt_encoder", False),
                     tuple(cfg.get("lora_stages", ())))
        adapters = load_file(str(path / ADAPTER_FILE))
        missing, unexpected = sam.load_state_dict(adapters, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise InputError(path / ADAPTER_FILE, "adapters do not fit this base model")
        from medfound.models.lora import merge_lora

        return merge_lora(sam).eval(), {**cfg, "adapted": True}
    sam, info = load_sam(str(model), image_size)
    return sam.eval(), {"kind": "sam", "base": info, "image_size": info["image_size"], "adapted": False}

"""Build, save and load fine-tuned segmenters: ``RUN/model.safetensors`` + ``RUN/config.json``.

The config records everything needed to rebuild the network and to use it the way it was trained
(image size, slice axis, normalisation, class -> dataset label mapping) — no pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medfound.errors import InputError
from medfound.io.atomic import atomic_file, write_text
from medfound.models.lora import add_lora
from medfound.models.unetr import ViTUNETR
from medfound.models.vit import VIT_CONFIGS, ViTConfig, ViTEncoder

MODEL_FILE = "model.safetensors"


def build_encoder(arch: dict) -> torch.nn.Module:
    """An encoder of the recorded architecture (``vit``, ``sam``, ``tinyvit`` or ``cnn``), random weights."""
    if arch.get("type") == "sam":
        from medfound.models.sam_encoder import build_sam_encoder

        return build_sam_encoder(arch)
    if arch.get("type") == "tinyvit":
        from medfound.models.tinyvit_unet import build_tinyvit_encoder

        return build_tinyvit_encoder(arch)
    if arch.get("type") == "cnn":
        from medfound.models.cnn_unet import build_cnn_encoder

        return build_cnn_encoder(arch)
    return ViTEncoder(ViTConfig(**{k: v for k, v in arch.items() if k != "type"}))


def segmenter_for(encoder: torch.nn.Module, n_classes: int, feature_size: int = 16) -> torch.nn.Module:
    """The decoder that fits the encoder: UNETR on a plain ViT's token grid, a U-Net on TinyViT's pyramid
    or on a ResNet's."""
    from medfound.models.cnn_unet import CNNEncoder, CNNUNet
    from medfound.models.tinyvit_unet import TinyViTEncoder, TinyViTUNet

    if isinstance(encoder, CNNEncoder):
        return CNNUNet(encoder, n_classes)
    if isinstance(encoder, TinyViTEncoder):
        return TinyViTUNet(encoder, n_classes, feature_size=feature_size)
    return ViTUNETR(encoder, n_classes, feature_size=feature_size)


def size_multiple(encoder: torch.nn.Module) -> int:
    """What the slice side must divide by for this encoder."""
    from medfound.models import cnn_unet
    from medfound.models.tinyvit_unet import SIZE_MULTIPLE, TinyViTEncoder

    if isinstance(encoder, cnn_unet.CNNEncoder):
        return cnn_unet.SIZE_MULTIPLE
    return SIZE_MULTIPLE if isinstance(encoder, TinyViTEncoder) else encoder.config.patch_size


def add_encoder_lora(encoder: torch.nn.Module, rank: int, stages: tuple[int, ...] | None = None) -> torch.nn.Module:
    """LoRA of rank ``rank`` on the encoder's attention (``qkv``): every block of a ViT; a TinyViT's
    blocks in ``stages`` only, where given (recorded as ``encoder.lora_stages``), else all of them."""
    from medfound.models.tinyvit import check_attention_stages, stage_attention
    from medfound.models.tinyvit_unet import TinyViTEncoder

    if stages and isinstance(encoder, TinyViTEncoder):
        check_attention_stages(tuple(stages), len(encoder.tinyvit.layers))
        encoder = add_lora(encoder, rank=rank, targets=r"tinyvit\." + stage_attention(stages))
        encoder.lora_stages = tuple(stages)
        return encoder
    return add_lora(encoder, rank=rank)


def adapt_encoder(encoder: torch.nn.Module, mode: str, rank: int = 4,
                  lora_stages: tuple[int, ...] | None = None) -> torch.nn.Module:
    """The encoder as training in ``mode`` changes it: ``full`` as it is, ``linear`` frozen, ``lora``
    with adapters of ``rank`` (a ViT's every block; a TinyViT's ``lora_stages``, default
    ``LORA_STAGES``). InputError for another mode, for stages on an encoder that has none, or for a
    from-scratch CNN in any mode but ``full`` (nothing pretrained to freeze or adapt)."""
    from medfound.models.cnn_unet import CNNEncoder
    from medfound.models.tinyvit_unet import LORA_STAGES, TinyViTEncoder

    if isinstance(encoder, CNNEncoder) and mode != "full":
        raise InputError(None, f"--encoder scratch:unet is a CNN trained from scratch: --mode full, not {mode!r}")
    if mode == "linear":
        return encoder.requires_grad_(False)
    if mode == "lora":
        if lora_stages and not isinstance(encoder, TinyViTEncoder):
            raise InputError(None, "--lora-stages applies to a TinyViT encoder only (litemedsam, scratch:tinyvit)")
        return add_encoder_lora(encoder, rank, lora_stages or LORA_STAGES)
    if mode != "full":
        raise InputError(None, f"--mode must be full, linear or lora, got {mode!r}")
    return encoder


def build_segmenter(arch: dict, n_classes: int, mode: str = "full", rank: int = 4,
                    feature_size: int = 16, lora_stages: tuple[int, ...] | None = None) -> torch.nn.Module:
    encoder = build_encoder(arch)
    if mode == "lora":
        encoder = add_encoder_lora(encoder, rank, lora_stages)
    return segmenter_for(encoder, n_classes, feature_size=feature_size)


def encoder_for(name_or_run: str, image_size: int | None = None) -> tuple[torch.nn.Module, dict]:
    """``scratch`` / ``scratch:vit-small`` / ``scratch:RUN`` -> a fresh encoder (RUN's shape);
    ``litemedsam`` -> LiteMedSAM's TinyViT with its released weights (``scratch:tinyvit``: the same
    network, random); ``scratch:unet`` -> a ResNet-18 U-Net's encoder (the CNN a user would train
    instead, see ``models.cnn_unet``); ``sam:PATH.pth`` / ``sam:vit_b`` -> SAM's image encoder; anything else -> an
    exported MAE run."""
    from medfound.models.cnn_unet import CNN_ENCODERS, CNNEncoder
    from medfound.models.export import load_encoder
    from medfound.models.tinyvit import TINYVIT_ENCODERS

    if name_or_run in TINYVIT_ENCODERS:
        from medfound.models.tinyvit_unet import litemedsam_encoder

        return litemedsam_encoder(image_size, pretrained=name_or_run == "litemedsam")
    if name_or_run in CNN_ENCODERS:
        torch.manual_seed(0)
        return CNNEncoder(), {"kind": "scratch", "image_size": 128}
    if name_or_run.startswith("sam:"):
        from medfound.models.sam_encoder import sam_encoder

        return sam_encoder(name_or_run[4:], image_size or 256)

    if name_or_run.startswith("scratch"):
        size = name_or_run.partition(":")[2] or "vit-tiny"
        if (Path(size) / "config.json").is_file():  # scratch:RUN = a fresh encoder shaped like RUN's
            arch = json.loads((Path(size) / "config.json").read_text())["architecture"]
            torch.manual_seed(0)
            cfg = {"kind": "scratch", "image_size": json.loads((Path(size) / "config.json").read_text()).get("image_size", 224)}
            return ViTEncoder(ViTConfig(**{k: v for k, v in arch.items() if k != "type"})), cfg
        if size not in VIT_CONFIGS:
            raise InputError(None, f"unknown encoder size {size!r}; choose from {', '.join(VIT_CONFIGS)}")
        torch.manual_seed(0)
        return ViTEncoder(VIT_CONFIGS[size]), {"kind": "scratch", "image_size": 224}
    return load_encoder(name_or_run)


def save_segmenter(model: ViTUNETR, run: str | os.PathLike, config: dict) -> Path:
    run = Path(run)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(run / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata={"producer": "medfound", "kind": "segmenter"})
    write_text(run / "config.json", json.dumps(config, indent=2))
    return run / MODEL_FILE


def load_segmenter(run: str | os.PathLike) -> tuple[ViTUNETR, dict]:
    run = Path(run)
    cfg_path, w_path = run / "config.json", run / MODEL_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputError(p, "missing: not a fine-tuned medfound model run")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kind") != "segmenter":
        raise InputError(cfg_path, f"not a segmenter config (kind={cfg.get('kind')!r})")
    model = build_segmenter(cfg["architecture"], cfg["n_classes"], cfg["mode"], cfg.get("lora_rank", 4),
                            cfg.get("feature_size", 16), cfg.get("lora_stages"))
    missing, unexpected = model.load_state_dict(load_file(str(w_path)), strict=False)
    if missing or unexpected:
        raise InputError(w_path, f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), cfg


@torch.no_grad()
def predict_square(model: torch.nn.Module, batch: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """Class probabilities (B, C, S, S) for a batch of square slices (B, 1, S, S)."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(batch)
    return logits.float().softmax(dim=1)

"""Encoder artefacts: ``RUN/encoder.safetensors`` + ``RUN/config.json`` — never pickle.

This is what ``--encoder RUN`` loads in the adaptation, SAM and in-context commands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from medfound.errors import InputError
from medfound.io.atomic import atomic_file, write_text
from medfound.models.vit import ViTConfig, ViTEncoder

ENCODER_FILE = "encoder.safetensors"
CONFIG_FILE = "config.json"


def save_encoder(encoder: ViTEncoder, run: str | os.PathLike, config: dict) -> Path:
    """Write the encoder weights and a config (``architecture`` is filled in from the encoder)."""
    run = Path(run)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    with atomic_file(run / ENCODER_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "medfound"})
    cfg = {"architecture": {"type": "vit", **encoder.config.as_dict()}, **config}
    write_text(run / CONFIG_FILE, json.dumps(cfg, indent=2))
    return run / ENCODER_FILE


def load_encoder(run: str | os.PathLike, map_location: str = "cpu") -> tuple[ViTEncoder, dict]:
    """Rebuild the encoder from ``RUN/config.json`` and load ``RUN/encoder.safetensors``."""
    run = Path(run)
    cfg_path, w_path = run / CONFIG_FILE, run / ENCODER_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputError(p, "missing: not an exported medfound encoder run")
    try:
        cfg = json.loads(cfg_path.read_text())
        arch = {k: v for k, v in cfg["architecture"].items() if k != "type"}
        encoder = ViTEncoder(ViTConfig(**arch))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(cfg_path, f"invalid encoder config: {e}") from None
    try:
        state = load_file(str(w_path), device=map_location)
    except Exception as e:
        raise InputError(w_path, f"cannot read safetensors: {e}") from None
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(w_path, f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return encoder, cfg

"""Model run folders: ``RUN/model.safetensors`` (all weights) + ``RUN/config.json`` with a ``kind``.

Shared by the models whose whole state is saved (in-context segmenter, conv SAM); loading checks the
kind and that the weights fit the rebuilt module, and says which file is wrong (no pickle anywhere).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch.nn as nn
from safetensors.torch import load_file, save_file

from medfound.errors import InputError
from medfound.io.atomic import atomic_file, write_text
from medfound.io.json_file import read_json

MODEL_FILE = "model.safetensors"


def save_run(module: nn.Module, run: str | os.PathLike, kind: str, config: dict) -> Path:
    run = Path(run)
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_file(run / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata={"producer": "medfound", "kind": kind})
    write_text(run / "config.json", json.dumps({"kind": kind, **config}, indent=2))
    return run / MODEL_FILE


def run_kind(run: str | os.PathLike) -> str | None:
    """The ``kind`` in a folder's config.json, or None when it is not a run folder."""
    cfg = Path(run) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("kind")
    except (json.JSONDecodeError, AttributeError):
        return None


def load_run(run: Path, kind: str, build: Callable[[dict], nn.Module], default_dir: Path, what: str,
             train_hint: str) -> tuple[nn.Module, dict]:
    """Rebuild ``build(config)`` and load its weights from ``run`` (``what``: the model's name in errors)."""
    cfg_path, w_path = run / "config.json", run / MODEL_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            msg = f"the packaged default {what} is missing (reinstall medfound)" if run == default_dir \
                else f"missing: not a {what} run (train one with `{train_hint}`)"
            raise InputError(p, msg)
    cfg = read_json(cfg_path)
    if cfg.get("kind") != kind:
        raise InputError(cfg_path, f"not a {what} config (kind={cfg.get('kind')!r})")
    module = build(cfg)
    try:
        state = load_file(str(w_path))
    except Exception as e:
        raise InputError(w_path, f"cannot read safetensors: {e}") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(w_path, f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval(), cfg

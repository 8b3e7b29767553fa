"""Save and load in-context models: ``RUN/model.safetensors`` + ``RUN/config.json`` (no pickle).

``load_incontext(None)`` loads the default model whose weights ship inside the package
(``medfound/weights/incontext``), trained by the command recorded in its config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from medfound.errors import InputError
from medfound.io.atomic import atomic_file, write_text
from medfound.models.incontext import InContextConfig, InContextSegmenter

MODEL_FILE = "model.safetensors"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "incontext"


def save_incontext(model: InContextSegmenter, run: str | os.PathLike, config: dict) -> Path:
    run = Path(run)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(run / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata={"producer": "medfound", "kind": "incontext"})
    write_text(run / "config.json", json.dumps({"kind": "incontext", "model": model.config.as_dict(), **config}, indent=2))
    return run / MODEL_FILE


def load_incontext(run: str | os.PathLike | None = None) -> tuple[InContextSegmenter, dict]:
    """Rebuild and load an in-context model; ``None`` = the packaged default."""
    run = Path(run) if run is not None else DEFAULT_MODEL_DIR
    cfg_path, w_path = run / "config.json", run / MODEL_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            what = "the packaged default in-context model is missing (reinstall medfound)" if run == DEFAULT_MODEL_DIR \
                else "missing: not an in-context model run (train one with `medfound incontext train`)"
            raise InputError(p, what)
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(cfg_path, f"invalid JSON: {e}") from None
    if cfg.get("kind") != "incontext":
        raise InputError(cfg_path, f"not an in-context model config (kind={cfg.get('kind')!r})")
    model = InContextSegmenter(InContextConfig.from_dict(cfg.get("model", {})))
    try:
        state = load_file(str(w_path))
    except Exception as e:
        raise InputError(w_path, f"cannot read safetensors: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(w_path, f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for attn in model.attn:  # a calibrated "none of the supports" sink (see config "inference")
        if "null_logit" in cfg.get("inference", {}):
            attn.null_logit.data.fill_(float(cfg["inference"]["null_logit"]))
    model.eval()
    return model, cfg

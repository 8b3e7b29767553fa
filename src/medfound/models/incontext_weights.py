"""Save and load in-context models: ``RUN/model.safetensors`` + ``RUN/config.json`` (no pickle).

``load_incontext(None)`` loads the default model whose weights ship inside the package
(``medfound/weights/incontext``), trained by the command recorded in its config.
"""

from __future__ import annotations

import os
from pathlib import Path

from medfound.models.incontext import InContextConfig, InContextSegmenter
from medfound.models.run_folder import MODEL_FILE, load_run, save_run

__all__ = ["MODEL_FILE", "DEFAULT_MODEL_DIR", "save_incontext", "load_incontext"]
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "incontext"


def save_incontext(model: InContextSegmenter, run: str | os.PathLike, config: dict) -> Path:
    return save_run(model, run, "incontext", {"model": model.config.as_dict(), **config})


def load_incontext(run: str | os.PathLike | None = None) -> tuple[InContextSegmenter, dict]:
    """Rebuild and load an in-context model; ``None`` = the packaged default."""
    model, cfg = load_run(Path(run) if run is not None else DEFAULT_MODEL_DIR, "incontext",
                          lambda c: InContextSegmenter(InContextConfig.from_dict(c.get("model", {}))),
                          DEFAULT_MODEL_DIR, "in-context model", "medfound incontext train")
    for attn in model.attn:  # a calibrated "none of the supports" sink (see config "inference")
        if "null_logit" in cfg.get("inference", {}):
            attn.null_logit.data.fill_(float(cfg["inference"]["null_logit"]))
    return model, cfg

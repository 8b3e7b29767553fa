"""JSON files medfound reads (dataset.json, config.json, manifests, prompts): parsed, or bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medfound.errors import InputError


def read_json(path: str | os.PathLike):
    """The parsed file; InputError naming it when it is not valid UTF-8 JSON (existence is the caller's
    check, with its own message)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"invalid JSON: {e}") from None

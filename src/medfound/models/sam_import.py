"""Import segment-anything's model classes without its package ``__init__``.

``segment_anything/__init__.py`` imports the predictor, which imports torchvision for resizing; a
torchvision wheel beside the pinned CPU torch fails to import (DESIGN.md), and medfound does its own
resizing. Registering a bare parent package whose ``__path__`` is the installed folder lets
``segment_anything.modeling`` load on its own. This module is the one place that knows.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _register_bare_parent() -> None:
    if "segment_anything" in sys.modules:
        return
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed (pip install segment-anything)")
    pkg = types.ModuleType("segment_anything")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["segment_anything"] = pkg


_register_bare_parent()

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

__all__ = ["ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam", "TwoWayTransformer"]

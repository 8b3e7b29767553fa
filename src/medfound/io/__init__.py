"""Image I/O that keeps geometry: every format read into :class:`MedImage`, masks written back.

Names are imported lazily (PEP 562) so that light submodules (``medfound.io.atomic``) load without
the format readers — what lets training run where only torch is installed.
"""

import importlib

_EXPORTS = {"MODALITIES": "image", "MedImage": "image", "canonical_modality": "image", "read_image": "read",
            "write_image": "write", "write_mask": "write", "mask_extension": "write"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medfound.io.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medfound.io' has no attribute {name!r}")

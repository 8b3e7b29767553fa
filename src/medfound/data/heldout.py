"""The held-out rule: subcortical grey structures and the ventricles are never training labels.

They are the evaluation tasks for segmentation without retraining (DESIGN.md), in every dataset.
Every training command filters labels through :func:`is_heldout`; datasets record which of their
labels it matched under ``dataset.json["medfound"]["heldout_labels"]``.
"""

from __future__ import annotations

import re

#: Name fragments of held-out structures (any atlas's spelling: AAL ``Thalamus_L``, Harvard-Oxford
#: ``Left_Thalamus``, FreeSurfer ``Left-Lateral-Ventricle``, Neuromorphometrics ``3rd_Ventricle``).
HELDOUT_PATTERNS = (
    r"thalam", r"caudat", r"putam", r"pallid", r"hippocamp", r"amygdal", r"accumb",
    r"ventric", r"\binf[_ -]?lat[_ -]?vent", r"\bstriatum\b", r"lentiform",
)
_RX = re.compile("|".join(HELDOUT_PATTERNS), re.IGNORECASE)


def is_heldout(label_name: str) -> bool:
    """True if a label of this name must never be a training target."""
    return bool(_RX.search(label_name.replace("-", "_")))


def heldout_labels(labels: dict[str, int]) -> dict[str, int]:
    """The held-out subset of an nnU-Net ``labels`` mapping (name -> value)."""
    return {n: v for n, v in labels.items() if n != "background" and is_heldout(n)}

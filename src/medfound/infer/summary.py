"""What an inference command tells the user about each image it segmented: one line on stderr with
what was used and assumed and the volume of each label in ml, and a warning for an empty label."""

from __future__ import annotations

import sys

import numpy as np

from medfound.io import MedImage


def warn(text: str) -> None:
    print(f"medfound: warning: {text}", file=sys.stderr)


def label_volumes(mask: np.ndarray, image: MedImage, names: dict[int, str]) -> dict[int, float]:
    """Volume of each label in ml (a 2D image counts as one slice 1 mm thick: mm^2 / 1000)."""
    voxel_ml = float(np.prod(image.spacing[: mask.ndim])) / 1000.0
    return {v: int(np.count_nonzero(mask == v)) * voxel_ml for v in names}


def summary_lines(case: str, mask: np.ndarray, image: MedImage, names: dict[int, str], used: str,
                  empty_hint: str = "not in this image's field of view?") -> list[str]:
    """``medfound: CASE: USED; name 1.23 ml, ...`` and a warning per empty label."""
    vols = label_volumes(mask, image, names)
    lines = [f"medfound: {case}: {used}; " + ", ".join(f"{names[v]} {ml:.2f} ml" for v, ml in vols.items())]
    return lines + [f"medfound: warning: {case}: {names[v]} came out empty ({empty_hint})"
                    for v, ml in vols.items() if ml == 0]


def summarise(case: str, mask: np.ndarray, image: MedImage, names: dict[int, str], used: str,
              empty_hint: str = "not in this image's field of view?") -> None:
    """Print :func:`summary_lines` on stderr."""
    for line in summary_lines(case, mask, image, names, used, empty_hint):
        print(line, file=sys.stderr)

"""Modality-aware intensity normalisation to [0, 1].

CT values are Hounsfield units, comparable across scanners: clip to a window and scale. MR, PET and
NM have arbitrary units: robust percentiles of the foreground. X-ray and ultrasound are display
images: per-image percentiles. Window presets are the radiological ones (level, width in HU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfound.io.image import canonical_modality

#: CT window presets: name -> (level, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "wide": (0.0, 2000.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (80.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}


@dataclass(frozen=True)
class NormalizeSpec:
    """How one modality is normalised; recorded in shard manifests and model configs."""

    modality: str
    method: str  # "window" or "percentile"
    low: float
    high: float
    foreground_only: bool = False

    def as_dict(self) -> dict:
        return {"modality": self.modality, "method": self.method, "low": self.low, "high": self.high,
                "foreground_only": self.foreground_only}


def spec_for(modality: str, ct_window: str = "wide") -> NormalizeSpec:
    """The default normalisation of a modality (``ct_window`` picks a CT preset)."""
    m = canonical_modality(modality)
    if m == "CT":
        if ct_window not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {ct_window!r}; choose from {', '.join(CT_WINDOWS)}")
        level, width = CT_WINDOWS[ct_window]
        return NormalizeSpec("CT", "window", level - width / 2, level + width / 2)
    if m in ("MR", "PT", "NM"):
        return NormalizeSpec(m, "percentile", 0.5, 99.5, foreground_only=True)
    return NormalizeSpec(m, "percentile", 0.5, 99.5)


def _sample(a: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    """A strided view of at most ~``limit`` voxels: percentiles of a 500 MB volume need no copy of it."""
    if a.size <= limit:
        return a
    step = int(np.ceil((a.size / limit) ** (1.0 / a.ndim)))
    return a[(slice(None, None, step),) * a.ndim]


def intensity_bounds(array: np.ndarray, modality: str, ct_window: str = "wide") -> tuple[float, float]:
    """The (low, high) intensities that map to 0 and 1 for this image (see :func:`spec_for`)."""
    spec = spec_for(modality, ct_window)
    if spec.method == "window":
        return spec.low, spec.high
    values = np.asarray(_sample(array), dtype=np.float32)
    if spec.foreground_only:
        # MR/PET background is air at ~0; percentiles of the whole field of view would be
        # dominated by it, so take them over the voxels above the lowest 1 %.
        floor = np.percentile(values, 1.0)
        fg = values[values > floor]
        values = fg if fg.size > 0.05 * values.size else values
    lo, hi = (float(v) for v in np.percentile(values, [spec.low, spec.high]))
    return lo, hi


def apply_bounds(array: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Scale ``array`` (a whole image or one slice of it) to float32 in [0, 1] by ``bounds``."""
    lo, hi = bounds
    a = np.asarray(array, dtype=np.float32)
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def normalize(array: np.ndarray, modality: str, ct_window: str = "wide") -> np.ndarray:
    """Map intensities to float32 in [0, 1] by the modality's rule (see :func:`spec_for`)."""
    return apply_bounds(array, intensity_bounds(array, modality, ct_window))

"""One image type for every format: voxels plus the geometry that places them in the patient.

Conventions (the NIfTI/nibabel ones, so that an affine means the same thing everywhere):

* ``array`` is indexed ``[i, j]`` (2D) or ``[i, j, k]`` (3D). ``i`` runs along image columns and
  ``j`` along rows, as in DICOM's and ITK's index order, so a PNG of shape (rows, cols) becomes an
  array of shape (cols, rows).
* ``affine`` is a 4x4 matrix mapping the voxel index ``(i, j, k, 1)`` to world millimetres in
  nibabel's RAS+ frame: +x towards the patient's Right, +y Anterior, +z Superior. DICOM and ITK use
  LPS+; the two differ by ``ras = diag(-1, -1, 1, 1) @ lps`` (see :meth:`MedImage.lps_affine`).
* 2D images carry a 4x4 affine too: the third column is the unit normal of the image plane.

Keeping one convention means a mask written for an image read from any format lands on the same
voxels in world space; writers convert back to each format's own convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Flip between the RAS+ world used here (NIfTI) and the LPS+ world of DICOM and ITK.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Canonical modality codes (DICOM Modality values, X-ray kinds merged into XR).
MODALITIES = ("CT", "MR", "PT", "NM", "XR", "US", "OT")

_MODALITY_ALIASES = {
    "ct": "CT",
    "mr": "MR",
    "mri": "MR",
    "pt": "PT",
    "pet": "PT",
    "nm": "NM",
    "spect": "NM",
    "xr": "XR",
    "xray": "XR",
    "x-ray": "XR",
    "cr": "XR",
    "dx": "XR",
    "mg": "XR",
    "rf": "XR",
    "xa": "XR",
    "io": "XR",
    "px": "XR",
    "us": "US",
    "ultrasound": "US",
    "ot": "OT",
    "other": "OT",
    "unknown": "OT",
    "sc": "OT",
}


def canonical_modality(name: str | None) -> str:
    """Map a DICOM Modality value or a user alias (``ct``, ``mri``, ``xray``...) to a code of
    :data:`MODALITIES`; ``OT`` when unknown."""
    if not name:
        return "OT"
    return _MODALITY_ALIASES.get(str(name).strip().lower(), "OT")


def is_known_modality(name: str) -> bool:
    return str(name).strip().lower() in _MODALITY_ALIASES


@dataclass
class MedImage:
    """Voxels with their world geometry and modality.

    ``meta`` carries what a writer needs to reproduce the source format exactly (for example the
    NIfTI header or the sorted DICOM files of a series); it is never needed to interpret ``array``.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    modality: str = "OT"
    source: str | None = None
    format: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (2, 3):
            raise ValueError(f"image array must be 2D or 3D, got shape {self.array.shape}")

    # --- geometry, derived from the affine so that it can never disagree with it ---------------
    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        zooms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(z) for z in zooms[: self.ndim])

    @property
    def origin(self) -> tuple[float, float, float]:
        """World (RAS+) position of voxel (0, 0, 0) in mm."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit world (RAS+) directions of the array axes."""
        m = self.affine[:3, :3]
        return m / np.linalg.norm(m, axis=0, keepdims=True)

    @property
    def orientation(self) -> str:
        """Axis codes as nibabel gives them, e.g. ``RAS`` or ``LPS`` (2D: the first two)."""
        import nibabel as nib

        codes = "".join(nib.orientations.aff2axcodes(self.affine))
        return codes[: self.ndim]

    def lps_affine(self) -> np.ndarray:
        """The same affine in DICOM/ITK's LPS+ world."""
        return LPS_TO_RAS @ self.affine

    def with_array(self, array: np.ndarray, **changes: Any) -> MedImage:
        """A new image on the same grid (e.g. a mask or a normalised copy)."""
        if array.shape[: self.ndim] != self.shape:
            raise ValueError(f"array shape {array.shape} does not match image shape {self.shape}")
        kw = dict(affine=self.affine.copy(), modality=self.modality, source=self.source,
                  format=self.format, meta=dict(self.meta))
        kw.update(changes)
        return MedImage(array=array, **kw)

    def summary(self) -> dict[str, Any]:
        """What ``medfound data inspect`` prints: a JSON-friendly description."""
        finite = self.array[np.isfinite(self.array)] if self.array.dtype.kind == "f" else self.array
        return {
            "path": self.source,
            "format": self.format,
            "modality": self.modality,
            "shape": list(self.shape),
            "dtype": str(self.array.dtype),
            "spacing": [round(s, 6) for s in self.spacing],
            "origin": [round(o, 6) for o in self.origin],
            "orientation": self.orientation,
            "direction": np.round(self.direction, 6).tolist(),
            "range": [float(finite.min()), float(finite.max())] if finite.size else None,
            **({"series_uid": self.meta["series_uid"]} if "series_uid" in self.meta else {}),
        }


def affine_from_geometry(spacing, origin, direction) -> np.ndarray:
    """4x4 affine from spacing (per axis), origin (3) and direction (3x3, columns = axes)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    full = np.ones(3)
    full[: len(spacing)] = spacing
    aff[:3, :3] = direction * full[None, :]
    aff[:3, 3] = np.asarray(origin, dtype=np.float64)
    return aff

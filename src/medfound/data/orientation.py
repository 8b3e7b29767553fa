"""Reorient images to the closest canonical RAS+ layout (and back), through nibabel.orientations.

Slicing a canonical volume along its third axis always gives axial slices with the same in-plane
layout, whatever order the scanner stored them in; predictions are mapped back with the inverse.
"""

from __future__ import annotations

import nibabel.orientations as nio
import numpy as np

from medfound.io.image import MedImage


def to_canonical(image: MedImage) -> tuple[MedImage, np.ndarray]:
    """Image with axes permuted/flipped to closest RAS+, and the transform to undo it."""
    if image.ndim != 3:
        return image, nio.io_orientation(image.affine)[:2]
    ornt = nio.io_orientation(image.affine)
    arr = nio.apply_orientation(image.array, ornt)
    affine = image.affine @ nio.inv_ornt_aff(ornt, image.shape)
    out = MedImage(array=arr, affine=affine,  # a view when only flips/transposes are needed modality=image.modality,
                   source=image.source, format=image.format, meta=dict(image.meta))
    return out, ornt


def from_canonical(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical` on an array (e.g. a predicted mask) of the canonical shape."""
    if array.ndim != 3:
        return array
    return np.ascontiguousarray(nio.apply_orientation(array, nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt)))


def file_axis(image: MedImage, ras_axis: int) -> int:
    """The axis of the stored array that becomes RAS axis ``ras_axis`` in the canonical view: where
    slice numbers given "as the file counts them" run."""
    if image.ndim != 3:
        return ras_axis
    return int(np.flatnonzero(nio.io_orientation(image.affine)[:, 0] == ras_axis)[0])


def canonical_index(image: MedImage, index: np.ndarray) -> np.ndarray:
    """Voxel indices (..., 3) of the stored array -> the same voxels' indices in :func:`to_canonical`'s view."""
    to_file = nio.inv_ornt_aff(nio.io_orientation(image.affine), image.shape)  # canonical index -> stored index
    back = np.linalg.inv(to_file)
    return np.asarray(index, np.float64) @ back[:3, :3].T + back[:3, 3]


def canonical_shape(image: MedImage) -> tuple[int, int, int]:
    """The shape of :func:`to_canonical`'s view of a volume."""
    shape = [0, 0, 0]
    for d, (target, _) in enumerate(nio.io_orientation(image.affine)):
        shape[int(target)] = image.shape[d]
    return tuple(shape)

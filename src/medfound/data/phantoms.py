"""Synthetic phantoms: CT-, MR-, PET-, X-ray- and ultrasound-like images with labeled structures.

Each phantom is a body with an organ, a pair of kidney-like structures, a lesion inside the organ
and a spine-like bone, drawn with random sizes and positions; the modality decides intensities and
artefacts (HU with noise; MR bias field and Rician noise; PET blur and Poisson counts; X-ray as a
projection through the body; ultrasound sector with speckle). They test code paths and widen the task
distribution for many-task training — never the only evidence of quality.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from medfound.io.image import MedImage, affine_from_geometry

PHANTOM_LABELS = {"background": 0, "organ": 1, "kidney": 2, "lesion": 3, "bone": 4}
PHANTOM_MODALITIES = ("CT", "MR", "PT", "XR", "US")

# Intensity per region: outside, body, organ, kidney, lesion, bone.
_INTENSITY = {
    "CT": (-1000.0, 30.0, 65.0, 150.0, 15.0, 700.0),
    "MR": (0.0, 300.0, 520.0, 750.0, 950.0, 80.0),
    "PT": (0.0, 1.0, 2.2, 4.5, 9.0, 0.6),
    "US": (0.0, 0.35, 0.55, 0.25, 0.08, 0.95),
}
_SPACING = {"CT": (0.8, 0.8, 2.5), "MR": (1.0, 1.0, 3.0), "PT": (4.0, 4.0, 4.0)}


def _ellipsoid(grid: list[np.ndarray], center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _labels(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(body mask, label map) of a random phantom on a grid of ``shape`` (2D or 3D)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    nd = len(shape)
    j = lambda lo, hi, n=nd: rng.uniform(lo, hi, size=n)  # noqa: E731
    body = _ellipsoid(grid, j(-0.05, 0.05), np.r_[rng.uniform(0.75, 0.9), rng.uniform(0.55, 0.7), [0.95] * (nd - 2)])
    label = np.zeros(shape, np.uint8)
    organ_c = np.r_[rng.uniform(-0.45, -0.2), rng.uniform(-0.25, 0.05), [rng.uniform(-0.2, 0.2)] * (nd - 2)]
    organ_r = np.r_[rng.uniform(0.22, 0.32), rng.uniform(0.18, 0.28), [rng.uniform(0.4, 0.6)] * (nd - 2)]
    organ = _ellipsoid(grid, organ_c, organ_r) & body
    label[organ] = 1
    for side in (-1, 1):
        c = np.r_[side * rng.uniform(0.3, 0.42) + 0.15, rng.uniform(0.15, 0.3), [rng.uniform(-0.3, 0.0)] * (nd - 2)]
        r = np.r_[rng.uniform(0.07, 0.11), rng.uniform(0.1, 0.14), [rng.uniform(0.25, 0.35)] * (nd - 2)]
        label[_ellipsoid(grid, c, r) & body & (label == 0)] = 2
    lesion_c = organ_c + np.r_[rng.uniform(-0.4, 0.4, nd) * organ_r * 0.6]
    label[_ellipsoid(grid, lesion_c, [rng.uniform(0.04, 0.08)] * nd) & organ] = 3
    spine = _ellipsoid(grid[:2], (rng.uniform(-0.05, 0.05), rng.uniform(0.4, 0.48)), (0.09, 0.08))
    label[spine & body] = 4
    return body, label


def make_phantom(modality: str = "CT", shape: tuple[int, ...] | None = None, seed: int = 0,
                 oblique: bool = False) -> tuple[MedImage, np.ndarray]:
    """One phantom image and its label map (values of :data:`PHANTOM_LABELS`).

    CT, MR and PT are 3D volumes; XR and US are 2D. ``oblique`` gives the volume a rotated,
    non-axis-aligned affine (for geometry tests).
    """
    rng = np.random.default_rng(seed)
    m = modality.upper()
    if m in ("XR", "US"):
        shape = shape or (128, 128)
    else:
        shape = shape or (64, 64, 24)
    if m == "XR":
        return _xray(shape, rng)
    if m not in _INTENSITY:
        raise ValueError(f"no phantom for modality {modality!r}; choose from {', '.join(PHANTOM_MODALITIES)}")
    body, label = _labels(shape, rng)
    table = np.array(_INTENSITY[m], dtype=np.float32)
    img = np.where(body, table[1], table[0]).astype(np.float32)
    for v in range(1, 5):
        img[label == v] = table[v + 1] * rng.uniform(0.9, 1.1)
    if m == "CT":
        img = ndimage.gaussian_filter(img, 0.6) + rng.normal(0, 12, shape)
        array = np.round(img).astype(np.int16)
    elif m == "MR":
        grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        bias = np.exp(sum(rng.uniform(-0.3, 0.3) * g for g in grid))
        img = ndimage.gaussian_filter(img, 0.7) * bias
        sigma = 15.0
        img = np.hypot(img + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))  # Rician
        array = img.astype(np.float32)
    elif m == "PT":
        img = ndimage.gaussian_filter(img, 1.5)
        array = (rng.poisson(np.clip(img, 0, None) * 40.0) / 40.0).astype(np.float32)
    else:  # US: sector, depth attenuation, speckle
        ii, jj = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
        sector = (np.abs(np.arctan2(ii, jj + 0.15)) < 0.7) & (np.hypot(ii, jj + 0.15) < 1.1)
        speckle = rng.rayleigh(1.0, shape)
        img = ndimage.gaussian_filter(img, 0.8) * speckle * np.exp(-1.2 * jj)
        img = np.where(sector, img, 0.0)
        array = np.clip(img / max(np.percentile(img, 99.5), 1e-6) * 255, 0, 255).astype(np.uint8)
        label = np.where(sector, label, 0).astype(np.uint8)
    if len(shape) == 3:
        spacing = _SPACING[m]
        direction = _rotation(rng) if oblique else np.eye(3)
        extent = np.array(shape) * np.array(spacing)
        origin = -direction @ (extent / 2) + rng.uniform(-20, 20, 3)
    else:
        spacing, direction, origin = (0.3, 0.3), np.eye(3), np.zeros(3)
    affine = affine_from_geometry(spacing, origin, direction)
    return MedImage(array=array, affine=affine, modality=m, format="phantom"), label


def _xray(shape: tuple[int, int], rng: np.random.Generator) -> tuple[MedImage, np.ndarray]:
    # Project a 3D CT-like phantom along its second axis: an attenuation image and projected labels.
    vol_shape = (shape[0], 48, shape[1])
    body, label3 = _labels(vol_shape, rng)
    mu = np.where(body, 0.02, 0.0) + np.where(label3 == 4, 0.12, 0.0) + np.where(label3 == 1, 0.01, 0.0)
    path = mu.sum(axis=1)
    img = 1.0 - np.exp(-path * 2.0)
    img = ndimage.gaussian_filter(img, 0.8) + rng.normal(0, 0.01, shape)
    array = np.clip(img * 4000, 0, 4095).astype(np.uint16)
    label = np.zeros(shape, np.uint8)
    for v in (1, 2, 3, 4):  # later labels drawn on top, as they would be seen
        label[(label3 == v).any(axis=1)] = v
    affine = affine_from_geometry((0.5, 0.5), (0, 0, 0), np.eye(3))
    return MedImage(array=array, affine=affine, modality="XR", format="phantom"), label


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def write_phantom_dataset(out: str | os.PathLike, modalities=PHANTOM_MODALITIES, cases_per_modality: int = 4,
                          seed: int = 0, overwrite: bool = True):
    """An nnU-Net v2 dataset of phantoms of several modalities (modality per case in dataset.json)."""
    from medfound.data.nnunet import write_dataset

    case_modalities = {}

    def cases():
        for mi, m in enumerate(modalities):
            for c in range(cases_per_modality):
                image, label = make_phantom(m, seed=seed + 1000 * mi + c)
                image.format = "nifti"
                case = f"phantom_{m.lower()}_{c:03d}"
                case_modalities[case] = m
                yield case, image, label

    items = list(cases())
    return write_dataset(Path(out), items, PHANTOM_LABELS, {"0": "mixed" if len(modalities) > 1 else modalities[0]},
                         description="medfound synthetic phantoms (CT/MR/PET/X-ray/US-like)",
                         extra={"case_modalities": case_modalities, "synthetic": True}, overwrite=overwrite)

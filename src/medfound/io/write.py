"""Write images and masks in the geometry of the image they belong to, atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfound.io.atomic import atomic_file
from medfound.io.formats import extension_format
from medfound.io.image import MedImage


def write_image(image: MedImage, path: str | os.PathLike) -> Path:
    """Write ``image`` in the format named by the extension of ``path`` (NIfTI, MGZ, NRRD, MHA,
    PNG, TIFF). DICOM output is DICOM-SEG only (:func:`medfound.io.dicomseg.write_dicom_seg`)."""
    path = Path(path)
    fmt = extension_format(path)
    if fmt is None or fmt in ("dicom",):
        raise ValueError(f"{path}: cannot write this format; use .nii.gz, .mgz, .nrrd, .mha, .png or .tif")
    with atomic_file(path) as tmp:
        if fmt in ("nifti", "mgz"):
            from medfound.io.nifti import write_nibabel

            write_nibabel(image, tmp, fmt)
        elif fmt in ("nrrd", "mha"):
            from medfound.io.itk import write_itk

            write_itk(image, tmp)
        else:
            from medfound.io.raster import write_raster

            write_raster(image, tmp, fmt)
    return path


def mask_like(mask: np.ndarray, reference: MedImage) -> MedImage:
    """A label map on the grid of ``reference`` (shape must match), stored as the smallest uint."""
    mask = np.asarray(mask)
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {reference.shape}")
    dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
    meta = {k: v for k, v in reference.meta.items() if k != "header"}
    header = reference.meta.get("header")
    if header is not None:
        header = header.copy()
        meta["header"] = header
    return reference.with_array(mask.astype(dtype), meta=meta)


def mask_extension(reference: MedImage) -> str:
    """The file extension a mask for ``reference`` is written with: its own format when that can
    hold a label map, otherwise NIfTI (DICOM inputs get NIfTI, plus DICOM-SEG on request)."""
    return {"nifti": ".nii.gz", "mgz": ".mgz", "nrrd": ".nrrd", "mha": ".mha", "png": ".png",
            "tiff": ".tif", "bmp": ".png"}.get(reference.format, ".nii.gz")


def write_mask(mask: np.ndarray, reference: MedImage, path: str | os.PathLike) -> Path:
    """Write a label map in the exact geometry of ``reference``."""
    return write_image(mask_like(mask, reference), path)

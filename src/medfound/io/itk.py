"""NRRD and MetaImage (.mha/.mhd) through SimpleITK, converting its LPS frame to our RAS affine."""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from medfound.errors import InputError
from medfound.io.image import LPS_TO_RAS, MedImage, affine_from_geometry


def sitk_to_medimage(img: sitk.Image, source: str | None, fmt: str) -> MedImage:
    """SimpleITK image -> MedImage: array axes reversed to (i, j, k), direction and origin to RAS."""
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        arr = _luminance(arr)
    else:
        arr = sitk.GetArrayFromImage(img)
    arr = np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1]))
    dim = img.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.array(img.GetDirection()).reshape(dim, dim)
    origin = np.zeros(3)
    origin[:dim] = img.GetOrigin()
    lps = affine_from_geometry(img.GetSpacing(), origin, direction)
    if arr.ndim == 3 and arr.shape[2] == 1 and dim == 3:
        pass  # keep single-slice volumes 3D: their third spacing is real geometry
    return MedImage(array=arr, affine=LPS_TO_RAS @ lps, source=source, format=fmt)


def medimage_to_sitk(image: MedImage) -> sitk.Image:
    arr = image.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1])))
    lps = image.lps_affine()
    nd = image.ndim
    img.SetSpacing([float(s) for s in image.spacing])
    img.SetOrigin([float(v) for v in lps[:nd, 3]])
    direction = lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0, keepdims=True)
    img.SetDirection([float(v) for v in direction[:nd, :nd].ravel()])
    return img


def read_itk(path: str | os.PathLike, fmt: str) -> MedImage:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        raise InputError(path, f"cannot read as {fmt.upper()}: {msg[-1] if msg else e}") from None
    if img.GetDimension() not in (2, 3):
        raise InputError(path, f"{img.GetDimension()}D image; medfound reads 2D or 3D images")
    return sitk_to_medimage(img, str(path), fmt)


def write_itk(image: MedImage, path: str | os.PathLike) -> None:
    sitk.WriteImage(medimage_to_sitk(image), str(path), useCompression=True)


def _luminance(arr: np.ndarray) -> np.ndarray:
    """RGB(A) -> grey (ITU-R BT.601 weights), the way scanners' secondary captures are viewed."""
    w = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return arr[..., :3] @ w

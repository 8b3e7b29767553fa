"""NIfTI (.nii, .nii.gz) and FreeSurfer MGH/MGZ through nibabel, whose affine convention we share."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from medfound.errors import InputError
from medfound.io.image import MedImage


def read_nibabel(path: str | os.PathLike, fmt: str) -> MedImage:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies scl_slope/inter, keeps integer types otherwise
    except Exception as e:  # nibabel raises many kinds for damaged files
        if _truncated_gzip(path):
            raise InputError(path, "file is truncated (incomplete gzip stream)") from None
        raise InputError(path, f"cannot read as {fmt.upper()}: {_short(e)}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[2] == 1 and fmt == "nifti" and img.header["dim"][0] == 2:
        data = data[..., 0]
    if 0 in data.shape or 0 in tuple(img.shape):
        raise InputError(path, f"image has no voxels (shape {tuple(img.shape)})")
    if data.ndim not in (2, 3):
        raise InputError(path, f"{data.ndim}D image of shape {data.shape}; medfound reads 2D or 3D "
                               "images (split multi-channel or time series into one file each)")
    affine = np.array(img.affine, dtype=np.float64)
    meta = {"header": img.header.copy()}
    return MedImage(array=np.ascontiguousarray(data), affine=affine, source=str(path), format=fmt,
                    meta=meta)


def write_nibabel(image: MedImage, path: str | os.PathLike, fmt: str) -> None:
    """Write ``image`` exactly on its grid. A header from the source keeps its qform/sform codes."""
    arr = image.array
    if fmt == "mgz":
        out = nib.MGHImage(_mgh_dtype(arr), image.affine)
    else:
        header = image.meta.get("header")
        header = header.copy() if isinstance(header, nib.Nifti1Header) else None
        out = nib.Nifti1Image(arr, image.affine, header=header)
        out.set_data_dtype(arr.dtype)
        out.header.set_slope_inter(1.0, 0.0) if arr.dtype.kind in "iub" else None
        out.set_qform(image.affine, code=int(header["qform_code"]) if header is not None and header["qform_code"] > 0 else 1)
        out.set_sform(image.affine, code=int(header["sform_code"]) if header is not None and header["sform_code"] > 0 else 1)
    nib.save(out, str(path))


def _mgh_dtype(arr: np.ndarray) -> np.ndarray:
    # MGH stores only uint8, int16, int32 and float32.
    if arr.dtype in (np.uint8, np.int16, np.int32, np.float32):
        return arr
    if arr.dtype.kind in "iub" and arr.min() >= 0 and arr.max() < 256:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int32)
    return arr.astype(np.float32)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _truncated_gzip(path: str | os.PathLike) -> bool:
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (EOFError, zlib.error):
        return True
    except OSError:
        return False
    return False

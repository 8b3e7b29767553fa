"""PNG, JPEG, BMP (Pillow) and TIFF stacks (tifffile): 2D images, or 3D for multi-page TIFF.

These formats carry no patient geometry: spacing is 1 mm (or the TIFF resolution when given in
cm or inch) and the direction is the identity. Colour is reduced to luminance.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from medfound.errors import InputError
from medfound.io.image import MedImage, affine_from_geometry

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_raster(path: str | os.PathLike, fmt: str) -> MedImage:
    try:
        if fmt == "tiff":
            import tifffile

            arr = tifffile.imread(str(path))
        else:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "LA", "PA"):
                    im = im.convert("RGBA" if "A" in im.mode else "RGB")
                arr = np.asarray(im)
    except Exception as e:
        raise InputError(path, f"cannot read as {fmt.upper()}: {' '.join(str(e).split())[:200]}") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and (fmt != "tiff" or arr.shape[0] > 4):
        arr = (arr[..., :3].astype(np.float32) @ _LUMA)
    if arr.ndim == 2:
        arr = arr.T  # (rows, cols) -> (i=cols, j=rows)
    elif arr.ndim == 3:
        arr = arr.transpose(2, 1, 0)  # (pages, rows, cols) -> (i, j, k)
    else:
        raise InputError(path, f"unsupported {fmt.upper()} layout of shape {arr.shape}")
    spacing = [1.0] * arr.ndim
    return MedImage(array=np.ascontiguousarray(arr), affine=affine_from_geometry(spacing, (0, 0, 0), np.eye(3)),
                    source=str(path), format=fmt)


def write_raster(image: MedImage, path: str | os.PathLike, fmt: str) -> None:
    if image.ndim != 2:
        raise ValueError(f"{fmt.upper()} holds 2D images; got shape {image.shape}")
    arr = image.array.T
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if fmt == "tiff":
        import tifffile

        tifffile.imwrite(str(path), arr)
        return
    if arr.dtype.kind == "f":
        raise ValueError("write float images as NIfTI/NRRD; PNG keeps integers only")
    if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
        arr = arr.astype(np.uint16)  # 16-bit PNG
    else:
        arr = arr.astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(arr)).save(str(path), format={"jpeg": "JPEG", "bmp": "BMP"}.get(fmt, "PNG"))

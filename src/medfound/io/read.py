"""``read_image``: any supported file or DICOM folder -> :class:`MedImage`, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfound.errors import InputError
from medfound.io.formats import case_name, sniff_format
from medfound.io.image import MedImage, canonical_modality


def read_image(path: str | os.PathLike, modality: str | None = None, series_uid: str | None = None,
               check_finite: bool = True) -> MedImage:
    """Read an image with its geometry.

    ``path`` is a NIfTI/MGZ/NRRD/MHA/DICOM/PNG/JPEG/TIFF file or a folder of DICOM files (one
    series, or the one named by ``series_uid``). ``modality`` overrides what the file says (needed
    for formats that do not record it). Raises :class:`InputError` for anything unusable.
    """
    from medfound.io.dicomweb import is_dicomweb

    image = _read_dicomweb(path) if is_dicomweb(path) else _read_local(Path(path), series_uid)
    if modality:
        image.modality = canonical_modality(modality)
    if check_finite and image.array.dtype.kind in "fc":
        bad = int(np.size(image.array) - np.count_nonzero(np.isfinite(image.array)))
        if bad:
            raise InputError(path, f"{bad} voxel(s) are NaN or infinite")
    return image


def _read_local(p: Path, series_uid: str | None) -> MedImage:
    if not p.exists():
        raise InputError(p, "no such file or folder")
    if p.is_dir():
        from medfound.io.dicom import read_dicom

        try:
            image = read_dicom(p, series_uid=series_uid)
        except InputError:
            raise
        except Exception as e:
            raise InputError(p, f"malformed DICOM series: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    else:
        if p.stat().st_size == 0:
            raise InputError(p, "file is empty")
        fmt = sniff_format(p)
        if fmt is None:
            raise InputError(p, "not an image file medfound can read (NIfTI, MGZ, NRRD, MHA, DICOM, PNG, JPEG, TIFF)")
        try:
            image = _read_file(p, fmt, series_uid)
        except InputError:
            raise
        except Exception as e:  # a malformed file that a library choked on is the file's problem
            raise InputError(p, f"malformed {fmt.upper()} file: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    return image


def _read_dicomweb(source: str | os.PathLike) -> MedImage:
    """The one series a DICOMweb address names (a study of several series is refused, with their UIDs)."""
    from medfound.io.dicom import read_dicom
    from medfound.io.dicomweb import localise, parse

    ref = parse(source)
    fetched = localise(source, images_only=True)
    if len(fetched) > 1:
        listing = ", ".join(f"{uid} [{remote.modality}]" for uid, _, remote in fetched[:5])
        raise InputError(ref.url, f"names {len(fetched)} series; add /series/UID for one of: {listing}")
    _, folder, remote = fetched[0]
    try:
        image = read_dicom(folder)
    except InputError as e:
        raise InputError(ref.url, e.problem) from None
    image.meta["dicomweb"] = remote.url(ref)
    return image


def _read_file(p: Path, fmt: str, series_uid: str | None) -> MedImage:
    if fmt in ("nifti", "mgz"):
        from medfound.io.nifti import read_nibabel

        return read_nibabel(p, fmt)
    if fmt in ("nrrd", "mha"):
        from medfound.io.itk import read_itk

        return read_itk(p, fmt)
    if fmt == "dicom":
        from medfound.io.dicom import read_dicom

        return read_dicom(p, series_uid=series_uid)
    from medfound.io.raster import read_raster

    return read_raster(p, fmt)


def inputs_of(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(case name, path) of each image to segment: a file, a DICOM series folder, or a folder of
    images (nnU-Net ``_0000`` suffixes dropped from the case names), or every series of a DICOMweb
    study or query (case names: SeriesInstanceUIDs)."""
    from medfound.io.dicomweb import is_dicomweb, localise

    if is_dicomweb(path):
        return [(uid, folder) for uid, folder, _ in localise(path, images_only=True)]
    if not path.exists():
        raise InputError(path, "no such file or folder")
    path = Path(path)
    if path.is_file():
        return [(case_name(path, strip_channel=True), path)]
    files = [f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")]
    kinds = {f: sniff_format(f) for f in files}
    if files and all(k == "dicom" for k in kinds.values() if k):
        return [(path.name, path)]
    items = [(case_name(f, strip_channel=True), f) for f, k in kinds.items() if k and k != "dicom"]
    if not items:
        raise InputError(path, "folder holds no images")
    return items

"""DICOM: single images, multi-frame objects and folders of one or more series, through pydicom.

Slices are ordered by their position along the slice normal (never by file name or InstanceNumber)
and the affine is built from ImageOrientationPatient / ImagePositionPatient / PixelSpacing, as
nibabel's ``dicom`` wrappers and dcm2niix do. Pixel values go through the modality LUT (CT in HU);
MONOCHROME1 is inverted so that high values are bright; colour becomes luminance.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medfound.errors import InputError
from medfound.io.image import LPS_TO_RAS, MedImage, canonical_modality

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class DicomSeries:
    """The files of one series (sorted later by position) and what identifies it."""

    uid: str
    files: list[str]
    modality: str
    description: str = ""
    positioned: bool = True  # every file has ImagePositionPatient: the series can form a volume


def _dcmread(path: str | os.PathLike, header_only: bool) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(str(path), stop_before_pixels=header_only)
        except InvalidDicomError:
            return pydicom.dcmread(str(path), stop_before_pixels=header_only, force=True)


def find_series(files: list[str | os.PathLike]) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """Group DICOM files into series by SeriesInstanceUID. Returns (series, [(file, reason)])."""
    groups: dict[str, list[str]] = defaultdict(list)
    info: dict[str, tuple[str, str]] = {}
    positioned: dict[str, bool] = {}
    errors: list[tuple[str, str]] = []
    for f in sorted(map(str, files)):
        try:
            ds = _dcmread(f, header_only=True)
        except Exception as e:
            errors.append((f, f"not a readable DICOM file: {_short(e)}"))
            continue
        if "SOPClassUID" not in ds and "Modality" not in ds:
            from medfound.io.formats import extension_format

            ext = extension_format(f)
            errors.append((f, f"unreadable {ext.upper()} file" if ext and ext != "dicom"
                           else "not a DICOM image (no SOPClassUID or Modality)"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or f"file:{f}"
        groups[uid].append(f)
        info.setdefault(uid, (str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))))
        positioned[uid] = positioned.get(uid, True) and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
    series = [DicomSeries(uid=u, files=fs, modality=info[u][0], description=info[u][1], positioned=positioned[u])
              for u, fs in groups.items()]
    return series, errors


def read_dicom(path: str | os.PathLike, series_uid: str | None = None) -> MedImage:
    """Read one DICOM file, or a folder holding exactly one series (or the one named by
    ``series_uid``)."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
        series, errors = find_series(files)
        if series_uid is not None:
            series = [s for s in series if s.uid == series_uid]
        if not series:
            why = f" ({errors[0][0]}: {errors[0][1]})" if errors else ""
            raise InputError(path, f"no DICOM series found{why}")
        if len(series) > 1:
            listing = ", ".join(f"{s.uid} [{s.modality} {len(s.files)} files]" for s in series[:5])
            raise InputError(path, f"folder holds {len(series)} DICOM series; choose one: {listing}")
        # Files that look like DICOM but cannot be read are damaged slices, not strangers: name them.
        from medfound.io.formats import extension_format

        damaged = [(f, why) for f, why in errors if extension_format(f) in (None, "dicom")]
        try:
            image = read_dicom_series(series[0].files)
        except InputError as e:
            if damaged:
                raise InputError(damaged[0][0], f"{damaged[0][1]} (its series is incomplete without it)") from None
            raise e from None
        return _skipped(image, damaged) if damaged else image
    return read_dicom_series([str(p)])


def read_dicom_series(files: list[str]) -> MedImage:
    """Read the files of one series into a volume sorted by slice position (or one 2D image)."""
    if len(files) == 1:
        return _read_single(files[0])
    headers, bad = [], []
    for f in files:
        try:
            headers.append((f, _dcmread(f, header_only=True)))
        except Exception as e:
            bad.append((f, f"not a readable DICOM file: {_short(e)}"))
    if bad and len(headers) < 2:
        raise InputError(bad[0][0], bad[0][1])
    if bad:  # the rest may still be a whole series: then the bad files are skipped, and named
        try:
            image = read_dicom_series([f for f, _ in headers])
        except InputError:
            raise InputError(bad[0][0], f"{bad[0][1]} (the rest of its series is incomplete without it)") from None
        return _skipped(image, bad)
    ref = headers[0][1]
    if "ImageOrientationPatient" not in ref or any("ImagePositionPatient" not in h for _, h in headers):
        raise InputError(files[0], "series has no ImagePositionPatient/ImageOrientationPatient; "
                                   "cannot order its slices by position")
    iop = np.array(ref.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    for f, h in headers:
        if not np.allclose(np.array(h.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise InputError(f, "slice orientation differs from the rest of its series")
        if (h.Rows, h.Columns) != (ref.Rows, ref.Columns):
            raise InputError(f, f"slice size {h.Rows}x{h.Columns} differs from the series' {ref.Rows}x{ref.Columns}")
    positions = np.array([np.array(h.ImagePositionPatient, dtype=np.float64) for _, h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    dist = (positions @ normal)[order]
    if np.any(np.diff(dist) < 1e-4):
        dup = headers[order[int(np.argmin(np.diff(dist))) + 1]][0]
        # A damaged copy of a good slice (a truncated transfer) is skipped; real duplicates are an error.
        close = np.abs(dist[:, None] - dist[None, :]) < 1e-4
        shared = {int(order[i]) for i in range(len(order)) if close[i].sum() > 1}
        bad = [(headers[i][0], why) for i in sorted(shared) if (why := _pixel_problem(headers[i][0]))]
        if bad and len(bad) < len(headers):
            try:
                return _skipped(read_dicom_series([f for f, _ in headers if f not in dict(bad)]), bad)
            except InputError:
                pass
        raise InputError(dup, "two slices of the series share one position (mixed acquisitions?)")
    gaps = np.diff(dist)
    if gaps.max() - gaps.min() > max(0.01, 0.01 * gaps.mean()):
        raise InputError(files[0], f"slice spacing is not uniform ({gaps.min():.3f}-{gaps.max():.3f} mm); "
                                   "resample or split the series")
    slices, sorted_files = [], []
    for idx in order:
        f = headers[idx][0]
        ds = _dcmread(f, header_only=False)
        slices.append(_pixels(ds, f))
        sorted_files.append(f)
    vol = np.stack(slices, axis=-1)  # (cols, rows, slices) after _pixels' transpose
    step = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    lps = _plane_affine(ref, positions[order[0]], step)
    return _image(vol, LPS_TO_RAS @ lps, ref, files=sorted_files)


def _pixel_problem(f: str) -> str | None:
    """Why the pixels of ``f`` cannot be decoded, or None when they can."""
    try:
        _pixels(_dcmread(f, header_only=False), f)
    except InputError as e:
        return e.problem
    except Exception as e:
        return f"not a readable DICOM file: {_short(e)}"
    return None


def _skipped(image: MedImage, bad: list[tuple[str, str]]) -> MedImage:
    """``image`` read without the damaged files ``bad``, which are recorded and named on stderr."""
    import sys

    image.meta["skipped_files"] = [{"path": f, "reason": why} for f, why in bad]
    for f, why in bad:
        print(f"medfound: skipped {f}: {why}", file=sys.stderr)
    return image


def _read_single(f: str) -> MedImage:
    try:
        ds = _dcmread(f, header_only=False)
    except Exception as e:
        raise InputError(f, f"not a readable DICOM file: {_short(e)}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f, "DICOM file has no pixel data")
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes == 1:
        arr = _pixels(ds, f)
        pos = np.array(ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]), dtype=np.float64)
        thick = float(ds.get("SliceThickness", 0) or 0) or 1.0
        lps = _plane_affine(ds, pos, None, thickness=thick)
        if arr.ndim == 3:  # single-frame object stored with a trailing frame axis
            arr = arr[..., 0]
        return _image(arr, LPS_TO_RAS @ lps, ds, files=[f])
    frames = _pixels(ds, f)  # (cols, rows, frames)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    positions = _frame_positions(ds) if per_frame is not None else None
    if positions is not None:
        iop = _frame_orientation(ds)
        normal = np.cross(iop[:3], iop[3:])
        order = np.argsort(positions @ normal, kind="stable")
        frames = frames[..., order]
        step = (positions[order[-1]] - positions[order[0]]) / max(len(order) - 1, 1)
        if len(order) > 1 and np.linalg.norm(step) < 1e-6:
            positions = None  # all frames at one position: a time series, not a volume
        else:
            spacing = _frame_pixel_spacing(ds)
            lps = _affine_from(iop, spacing, positions[order[0]], step)
            img = _image(frames, LPS_TO_RAS @ lps, ds, files=[f])
            img.meta["frame_order"] = order.tolist()
            return img
    # Cine (ultrasound, NM dynamic) or frames without positions: frames along k, unit spacing.
    spacing_k = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
    lps = _plane_affine(ds, np.zeros(3), None, thickness=spacing_k)
    img = _image(frames, LPS_TO_RAS @ lps, ds, files=[f])
    img.meta["frame_order"] = list(range(frames.shape[-1]))
    img.meta["frames_are_time"] = canonical_modality(ds.get("Modality")) in ("US", "XR") or "FrameTime" in ds
    return img


def _pixels(ds: pydicom.Dataset, f: str) -> np.ndarray:
    """Stored pixels -> modality values, array axes (cols, rows[, frames])."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f, "DICOM file has no pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as e:
        raise InputError(f, f"cannot decode DICOM pixel data: {_short(e)}") from None
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp > 1:
        arr = arr[..., :3].astype(np.float32) @ _LUMA  # colour -> luminance
    else:
        from pydicom.pixels import apply_modality_lut

        if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
            rescaled = apply_modality_lut(arr, ds)
        elif "PerFrameFunctionalGroupsSequence" in ds:  # enhanced objects keep it in functional groups
            slope = _functional(ds, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _functional(ds, "PixelValueTransformationSequence", "RescaleIntercept")
            rescaled = arr * float(slope if slope is not None else 1.0) + float(intercept or 0.0)
            if slope is None and intercept is None:
                rescaled = arr
        else:
            rescaled = arr
        if rescaled.dtype.kind == "f" and np.all(np.mod(rescaled, 1) == 0) and np.abs(rescaled).max(initial=0) < 2**31:
            rescaled = rescaled.astype(np.int32 if np.abs(rescaled).max(initial=0) >= 2**15 else np.int16)
        arr = rescaled
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = arr.max() + arr.min() - arr
    if nframes > 1:
        return np.ascontiguousarray(arr.transpose(2, 1, 0))  # (frames, rows, cols) -> (cols, rows, frames)
    return np.ascontiguousarray(arr.T)


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float]:
    """(row spacing, column spacing) in mm: PixelSpacing, else the detector's ImagerPixelSpacing."""
    for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if key in ds and ds.get(key):
            v = [float(x) for x in ds.get(key)]
            if len(v) == 2 and v[0] > 0 and v[1] > 0:
                return v[0], v[1]
    us = ds.get("SequenceOfUltrasoundRegions")
    if us:  # ultrasound: physical deltas in cm per pixel, when the unit is cm (code 3)
        r = us[0]
        if int(r.get("PhysicalUnitsXDirection", 0)) == 3 and float(r.get("PhysicalDeltaX", 0)) > 0:
            return abs(float(r.PhysicalDeltaY)) * 10, abs(float(r.PhysicalDeltaX)) * 10
    return 1.0, 1.0


def _affine_from(iop: np.ndarray, spacing: tuple[float, float], origin: np.ndarray,
                 step: np.ndarray | None, thickness: float = 1.0) -> np.ndarray:
    """LPS affine: column i along the row direction cosine (IOP[:3]) times the column spacing."""
    row_cos, col_cos = iop[:3], iop[3:]
    aff = np.eye(4)
    aff[:3, 0] = row_cos * spacing[1]
    aff[:3, 1] = col_cos * spacing[0]
    aff[:3, 2] = step if step is not None else np.cross(row_cos, col_cos) * thickness
    aff[:3, 3] = origin
    return aff


def _plane_affine(ds: pydicom.Dataset, origin: np.ndarray, step: np.ndarray | None,
                  thickness: float = 1.0) -> np.ndarray:
    iop = np.array(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    return _affine_from(iop, _pixel_spacing(ds), origin, step, thickness)


def _frame_positions(ds: pydicom.Dataset) -> np.ndarray | None:
    out = []
    for fg in ds.PerFrameFunctionalGroupsSequence:
        pps = fg.get("PlanePositionSequence")
        if not pps or "ImagePositionPatient" not in pps[0]:
            return None
        out.append(np.array(pps[0].ImagePositionPatient, dtype=np.float64))
    return np.array(out)


def _functional(ds: pydicom.Dataset, seq: str, attr: str):
    shared = ds.get("SharedFunctionalGroupsSequence")
    for source in ([shared[0]] if shared else []) + [ds.PerFrameFunctionalGroupsSequence[0]]:
        item = source.get(seq)
        if item and attr in item[0]:
            return item[0].get(attr)
    return None


def _frame_orientation(ds: pydicom.Dataset) -> np.ndarray:
    iop = _functional(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    return np.array(iop if iop is not None else [1, 0, 0, 0, 1, 0], dtype=np.float64)


def _frame_pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float]:
    ps = _functional(ds, "PixelMeasuresSequence", "PixelSpacing")
    return (float(ps[0]), float(ps[1])) if ps is not None else _pixel_spacing(ds)


def _image(arr: np.ndarray, affine: np.ndarray, ds: pydicom.Dataset, files: list[str]) -> MedImage:
    meta = {"dicom_files": files, "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "study_uid": str(ds.get("StudyInstanceUID", ""))}
    return MedImage(array=arr, affine=affine, modality=canonical_modality(ds.get("Modality")),
                    source=files[0] if len(files) == 1 else str(Path(files[0]).parent), format="dicom", meta=meta)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__

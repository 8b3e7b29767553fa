"""RT Structure Sets: planar contours in patient coordinates <-> label maps on an image series' grid.

Radiotherapy keeps structures as RTSTRUCT (closed polygons per slice, in LPS millimetres) rather than
label maps. Reading rasterises each ROI's polygons onto the referenced series (pixel centres inside;
polygons of one ROI on one slice are combined by even-odd, so holes drawn as inner contours stay
holes). Writing traces each label's outline on each slice (marching squares at the 0.5 level, which
reads back to the same pixels) and references every contour's source image by SOP Instance UID.
No library on PyPI does both on today's pydicom without a GUI OpenCV (rt-utils needs one), so the
geometry is written here, on pydicom and scikit-image.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from medfound.errors import InputError
from medfound.io.atomic import atomic_file
from medfound.io.image import MedImage

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def _series_headers(reference: MedImage, path) -> list:
    import pydicom

    files = reference.meta.get("dicom_files") or []
    if reference.format != "dicom" or reference.ndim != 3 or len(files) != reference.shape[2]:
        raise InputError(path, "an RTSTRUCT goes with a 3D DICOM series of single-frame slices (a CT or MR series)")
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def check_rtstruct_source(reference: MedImage, path: str | os.PathLike | None = None) -> None:
    """Before any work: an RTSTRUCT can be written over ``reference`` (a 3D DICOM series with a Frame of
    Reference); images not read from DICOM pass (they get none)."""
    if reference.format != "dicom":
        return
    headers = _series_headers(reference, path or reference.source)
    if not str(headers[0].get("FrameOfReferenceUID", "")):
        raise InputError(path or reference.source, "the series has no FrameOfReferenceUID; an RTSTRUCT cannot reference it")


def read_rtstruct(path: str | os.PathLike, reference: MedImage) -> dict[str, np.ndarray]:
    """ROI name -> boolean mask on ``reference``'s grid, for every ROI of the structure set that has
    contours. Raises InputError when the file is not an RTSTRUCT of this series' Frame of Reference."""
    import pydicom
    from skimage.draw import polygon

    headers = _series_headers(reference, path)
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as e:
        raise InputError(path, f"not a readable DICOM file: {' '.join(str(e).split())[:160]}") from None
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_STORAGE or "ROIContourSequence" not in ds:
        raise InputError(path, "not an RT Structure Set (RTSTRUCT)")
    frame = str(headers[0].get("FrameOfReferenceUID", ""))
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    frames = {int(r.ROINumber): str(r.get("ReferencedFrameOfReferenceUID", "")) for r in ds.get("StructureSetROISequence", [])}
    to_voxel = np.linalg.inv(reference.lps_affine())
    by_uid = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    ni, nj, nk = reference.shape
    thickness = 1.0  # contour planes must fall on a slice, within half a slice
    masks: dict[str, np.ndarray] = {}
    for roi in ds.ROIContourSequence:
        number = int(roi.ReferencedROINumber)
        name = names.get(number, f"roi_{number}")
        if frame and frames.get(number) and frames[number] != frame:
            raise InputError(path, f"ROI {name!r} is on another Frame of Reference than the series")
        mask = np.zeros(reference.shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            if len(points) < 3:
                continue  # a point or a line marks, it encloses nothing
            ijk = (to_voxel @ np.c_[points, np.ones(len(points))].T)[:3].T
            refs = [str(c.ReferencedSOPInstanceUID) for c in contour.get("ContourImageSequence", [])]
            k = by_uid.get(refs[0]) if refs and refs[0] in by_uid else int(round(float(ijk[:, 2].mean())))
            if not 0 <= k < nk or np.abs(ijk[:, 2] - k).max() > thickness / 2 + 1e-3:
                raise InputError(path, f"a contour of ROI {name!r} does not lie on a slice of the series")
            rr, cc = polygon(ijk[:, 0], ijk[:, 1], shape=(ni, nj))
            plane = np.zeros((ni, nj), dtype=bool)
            plane[rr, cc] = True
            mask[:, :, k] ^= plane  # even-odd: an inner contour is a hole
        if mask.any():
            masks[name] = masks[name] | mask if name in masks else mask
    if not masks:
        raise InputError(path, "the structure set holds no closed contours")
    return masks


def _outlines(plane: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2D boolean mask, (n, 2) in (i, j) pixel coordinates."""
    from skimage.measure import find_contours

    padded = np.pad(plane.astype(np.float32), 1)
    return [c[:-1] - 1 for c in find_contours(padded, 0.5) if len(c) > 3]


def write_rtstruct(mask: np.ndarray, reference: MedImage, path: str | os.PathLike,
                   labels: dict[int, str] | None = None, algorithm: str = "medfound") -> Path:
    """A label map on ``reference``'s grid (a DICOM series) as one RT Structure Set: one ROI per label
    value, one closed planar contour per outline per slice, each pointing to its slice's image."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    import medfound

    headers = _series_headers(reference, path)
    mask = np.asarray(mask)
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {reference.shape}")
    first = headers[0]
    lps = reference.lps_affine()
    now = datetime.datetime.now()
    sop = generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTSTRUCT_STORAGE, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, sop
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
        setattr(ds, key, first.get(key, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 901
    ds.SeriesDescription = algorithm[:64]
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "medfound", algorithm[:64], medfound.__version__
    ds.InstanceNumber = 1
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "medfound"
    ds.StructureSetName = algorithm[:64]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"

    def image_ref(h) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = Sequence([image_ref(h) for h in headers])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as the standard asks)
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    values = sorted(int(v) for v in np.unique(mask) if v)
    rois, contours, observations = [], [], []
    for n, v in enumerate(values, start=1):
        name = (labels or {}).get(v, f"label_{v}")
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = n, first.FrameOfReferenceUID
        roi.ROIName, roi.ROIGenerationAlgorithm = name[:64], "AUTOMATIC"
        roi.ROIGenerationDescription = algorithm[:64]
        rois.append(roi)
        items = []
        for k in range(mask.shape[2]):
            plane = mask[:, :, k] == v
            if not plane.any():
                continue
            for outline in _outlines(plane):
                ijk = np.c_[outline, np.full(len(outline), k), np.ones(len(outline))]
                xyz = (lps @ ijk.T)[:3].T
                c = Dataset()
                c.ContourImageSequence = Sequence([image_ref(headers[k])])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(xyz)
                c.ContourData = [f"{x:.4f}" for x in xyz.ravel()]
                items.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = [int(x) for x in (np.array([230, 80, 60]) * (1 + n) % 256)]
        rc.ContourSequence = Sequence(items)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = n, n
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    path = Path(path)
    with atomic_file(path) as tmp:
        pydicom.dcmwrite(str(tmp), ds, enforce_file_format=True)
    return path

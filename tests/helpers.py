"""Test helpers: write real DICOM files from arrays (for series-ordering and SEG tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medfound.io.image import MedImage


def _ds(v: float) -> str:
    return f"{v:.10g}"[:16]


def write_dicom_series(image: MedImage, folder: Path, names=None, series_uid: str | None = None,
                       study_uid: str | None = None, frame_uid: str | None = None) -> list[Path]:
    """Write a 3D int16 CT-like MedImage as one DICOM file per k-slice. ``names`` maps slice
    index -> file name (to test that order comes from positions, not names)."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = image.lps_affine()
    col = lps[:3, 0] / np.linalg.norm(lps[:3, 0])  # direction of increasing column index (i)
    row = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    sx, sy, sz = image.spacing
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    paths = []
    for k in range(image.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = "TEST001", "Test^Phantom", "O", "19700101"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, k + 1
        ds.Manufacturer = "medfound-tests"
        ds.ImageOrientationPatient = [_ds(v) for v in (*col, *row)]
        pos = lps[:3, :3] @ np.array([0, 0, k]) + lps[:3, 3]
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing, column spacing
        ds.SliceThickness = _ds(sz)
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        stored = (image.array[:, :, k].T.astype(np.int32) + 1024).astype(np.int16)
        ds.PixelData = stored.tobytes()
        name = names[k] if names else f"slice{k:03d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

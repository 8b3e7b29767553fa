"""DICOM-SEG output through highdicom, referencing the source series so PACS and viewers overlay it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfound.io.atomic import atomic_file
from medfound.io.image import MedImage


#: what highdicom needs of every source image to reference it from a DICOM-SEG
SEG_SOURCE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")


def check_dicom_seg_source(reference: MedImage, path: str | os.PathLike | None = None) -> None:
    """Raise InputError (before any output is written) unless a DICOM-SEG can reference ``reference``'s
    files: each must carry the UIDs a SEG points to, a Frame of Reference among them. Images not read
    from DICOM pass (they get no DICOM-SEG)."""
    import pydicom

    from medfound.errors import InputError

    for f in reference.meta.get("dicom_files") or []:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        missing = [k for k in SEG_SOURCE_KEYS if not str(ds.get(k, "") or "")]
        if missing:
            raise InputError(f, f"has no {', '.join(missing)}; a DICOM-SEG must reference it, so --dicom-seg "
                                "cannot be written for this series (run without --dicom-seg for the NIfTI mask)")


def write_dicom_seg(mask: np.ndarray, reference: MedImage, path: str | os.PathLike,
                    labels: dict[int, str] | None = None, algorithm: str = "medfound",
                    version: str | None = None) -> Path:
    """Write a label map (values 0..N on the grid of ``reference``) as one DICOM-SEG object.

    ``reference`` must have been read from DICOM (its files are the SEG's source images). Each label
    value becomes a segment; ``labels`` names them (default ``label_<n>``). ``algorithm`` and
    ``version`` (default: medfound's) identify what made it, in every segment's Algorithm Identification.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    import medfound

    files = reference.meta.get("dicom_files")
    if reference.format != "dicom" or not files:
        raise ValueError("DICOM-SEG needs an image read from DICOM")
    mask = np.asarray(mask)
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {reference.shape}")
    values = sorted(int(v) for v in np.unique(mask) if v != 0)
    if labels:
        values = sorted(set(values) | {int(k) for k in labels if int(k) != 0})
    if not values:
        values = [1]  # an empty mask is still a valid one-segment SEG
    # Segment numbers must run 1..N: remap label values in order.
    remap = np.zeros(int(max(values, default=0)) + 1, dtype=np.uint16)
    for n, v in enumerate(values, start=1):
        remap[v] = n
    seg = remap[np.clip(mask.astype(np.int64), 0, len(remap) - 1)]
    sources = [pydicom.dcmread(f) for f in files]
    if seg.ndim == 2:
        frames = seg.T[None]  # (1, rows, cols)
    elif len(sources) == 1:  # multi-frame source: back to the stored frame order
        order = reference.meta.get("frame_order", list(range(seg.shape[2])))
        frames = np.empty((seg.shape[2], seg.shape[1], seg.shape[0]), dtype=seg.dtype)
        for k_sorted, k_orig in enumerate(order):
            frames[k_orig] = seg[:, :, k_sorted].T
    else:
        frames = seg.transpose(2, 1, 0)  # (slices, rows, cols), slices in ``files`` order
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=(labels or {}).get(v, f"label_{v}"),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm, version=version or medfound.__version__, family=codes.cid7162.ArtificialIntelligence),
        )
        for n, v in enumerate(values, start=1)
    ]
    out = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint16 if len(values) > 255 else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfound",
        manufacturer_model_name=algorithm,
        software_versions=medfound.__version__,
        series_description=f"{algorithm}"[:64],
        device_serial_number="0",
        omit_empty_frames=False,
    )
    path = Path(path)
    with atomic_file(path) as tmp:
        out.save_as(str(tmp))
    return path


def read_dicom_seg(path: str | os.PathLike, reference: MedImage) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG as a label map on ``reference``'s grid (the series it references, read from DICOM)
    and segment number -> segment label; frames are matched to the source images by SOP Instance UID
    (highdicom), never by order. Where segments overlap, the higher number wins."""
    import highdicom as hd
    import pydicom

    from medfound.errors import InputError

    files = reference.meta.get("dicom_files") or []
    if reference.format != "dicom" or len(files) != (1 if reference.ndim == 2 else reference.shape[2]):
        raise InputError(path, "a DICOM-SEG is read onto the single-frame DICOM series it references")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:
        raise InputError(path, f"not a readable DICOM-SEG: {type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    try:
        frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise InputError(path, f"does not reference the series it was given: {' '.join(str(e).split())[:160]}") from None
    mask = np.asarray(frames).transpose(2, 1, 0)  # (frames, rows, cols) -> (i, j, k)
    if reference.ndim == 2:
        mask = mask[:, :, 0]
    names = {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}
    return mask.astype(np.uint16), names

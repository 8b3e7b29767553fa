"""``medfound data make-support``: an example set (nnU-Net v2 folder) from image/mask pairs a user has.

Each pair becomes one case; masks are checked as ``data check`` checks them (same grid as the image,
integer values >= 0). Sparse labelling is allowed: a 3D mask may label only some slices, and those are
the slices ``segment`` takes as examples. Label names come from ``--labels`` (``{"1": "tumour"}`` or
``{"tumour": 1}``) or default to ``label_<value>``.
An example set can also come from a PACS: image series and their DICOM-SEG (:func:`dicomweb_support_set`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom

from medfound.data.nnunet import NnUNetDataset, check_label, write_dataset
from medfound.errors import InputError
from medfound.io import read_image
from medfound.io.formats import case_name
from medfound.io.image import canonical_modality


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Label value -> name from a JSON file in either direction (``{"1": "x"}`` or ``{"x": 1}``)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read label names as JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, 'label names must be a JSON object such as {"1": "tumour"}')
    out: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and str(k).strip():
            value, name = int(v), str(k)
        elif str(k).strip().isdigit() and isinstance(v, str):
            value, name = int(k), v
        else:
            raise InputError(path, f"entry {k!r}: {v!r} is neither value -> name nor name -> value")
        if value <= 0:
            raise InputError(path, f"label values start at 1 (0 is background), got {value}")
        out[value] = name
    return out


def make_support(pairs: list[tuple[str | os.PathLike, str | os.PathLike]], out: str | os.PathLike,
                 names: dict[int, str] | None = None, modality: str | None = None) -> NnUNetDataset:
    """Write the example set; every pair is read and checked before anything is written."""
    cases, values, seen = [], set(), set()
    for img_path, mask_path in pairs:
        image = read_image(img_path, modality=modality)
        mask = read_image(mask_path)
        check_label(mask, image, mask_path)
        arr = np.asarray(mask.array).astype(np.uint16)
        present = {int(v) for v in np.unique(arr) if v}
        if not present:
            raise InputError(mask_path, "mask is empty: an example needs at least one labelled voxel")
        values |= present
        case = case_name(Path(img_path), strip_channel=True)
        base, n = case, 1
        while case in seen:
            n += 1
            case = f"{base}_{n}"
        seen.add(case)
        cases.append((case, image, arr))
    names = names or {}
    unnamed = sorted(values - set(names))
    labels = {"background": 0} | {names.get(v, f"label_{v}"): v for v in sorted(values | set(names))}
    if len(labels) != len(values | set(names)) + 1:
        raise InputError(None, "two label values share one name")
    mods = sorted({c[1].modality for c in cases})
    channel = mods[0] if len(mods) == 1 else "OT"
    extra = {"made_by": "medfound data make-support", "unnamed_labels": unnamed}
    if len(mods) > 1:
        extra["case_modalities"] = {c[0]: c[1].modality for c in cases}
    return write_dataset(out, cases, labels, {"0": canonical_modality(channel) if channel != "OT" else "OT"},
                         description="example set made from image/mask pairs", extra=extra, overwrite=False)


@contextlib.contextmanager
def dicomweb_support_set(source: str) -> Iterator[Path]:
    """An example set from a PACS: every DICOM-SEG that the DICOMweb study, series or query names,
    each read onto the image series it references (fetched too), as a temporary nnU-Net folder.
    Segments with the same label are one structure across cases."""
    import tempfile

    from medfound.data.nnunet import write_dataset
    from medfound.io.dicom import read_dicom
    from medfound.io.dicomseg import read_dicom_seg
    from medfound.io.dicomweb import RemoteSeries, fetch_series, localise, parse, series_in

    ref = parse(source)
    fetched = localise(source)
    segs = [(uid, folder, remote) for uid, folder, remote in fetched if remote.modality == "SEG"]
    if not segs:
        raise InputError(ref.url, "holds no DICOM-SEG; an example set from a PACS is an image series plus a "
                                  "DICOM-SEG of it")
    folders = {uid: folder for uid, folder, remote in fetched if remote.modality != "SEG"}
    values: dict[str, int] = {}
    cases = []
    for uid, folder, remote in segs:
        seg_file = next(f for f in sorted(folder.iterdir()) if not f.name.startswith("."))
        ds = pydicom.dcmread(seg_file, stop_before_pixels=True)
        try:
            source_uid = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        except (AttributeError, IndexError):
            raise InputError(remote.url(ref), "the DICOM-SEG references no source series") from None
        if source_uid not in folders:  # the referenced series, with the instance count QIDO-RS reports
            (found,) = series_in(parse(RemoteSeries(remote.study, source_uid).url(ref)))
            folders[source_uid] = fetch_series(ref, found)
        image = read_dicom(folders[source_uid])
        mask, names = read_dicom_seg(seg_file, image)
        remap = np.zeros(int(mask.max()) + 1, dtype=np.uint16)
        for n, name in names.items():
            if n < len(remap):
                remap[n] = values.setdefault(name, len(values) + 1)
        cases.append((uid, image, remap[mask]))
    modalities = sorted({c[1].modality for c in cases})
    with tempfile.TemporaryDirectory(prefix="medfound-pacs-examples-") as tmp:
        root = Path(tmp) / "examples"
        write_dataset(root, cases, {"background": 0} | values,
                      {"0": modalities[0] if len(modalities) == 1 else "OT"},
                      description=f"example set from {ref.url}", extra={"made_by": "medfound (DICOMweb example set)"})
        yield root

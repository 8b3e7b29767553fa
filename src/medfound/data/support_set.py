"""``medfound data make-support``: an example set (nnU-Net v2 folder) from image/mask pairs a user has.

Each pair becomes one case; masks are checked as ``data check`` checks them (same grid as the image,
integer values >= 0). Sparse labelling is allowed: a 3D mask may label only some slices, and those are
the slices ``segment`` takes as examples. Label names come from ``--labels`` (``{"1": "tumour"}`` or
``{"tumour": 1}``) or default to ``label_<value>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

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

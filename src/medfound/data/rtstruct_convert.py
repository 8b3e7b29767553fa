"""``medfound data convert-rtstruct``: a CT (or MR) series and its RT Structure Set -> an nnU-Net
dataset with one label per ROI on the series' grid, so radiotherapy contours become example sets and
training labels."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from medfound.data.nnunet import NnUNetDataset, write_dataset
from medfound.errors import InputError


def convert_rtstruct(series: str | os.PathLike, rtstruct: str | os.PathLike, out: str | os.PathLike,
                     rois: list[str] | None = None, case: str | None = None) -> tuple[NnUNetDataset, list[str]]:
    """Write the dataset; returns it and the ROIs that another ROI partly covers (where ROIs overlap,
    the later one in ``rois`` order, else in the structure set's order, keeps the voxel)."""
    from medfound.io.read import read_image
    from medfound.io.rtstruct import read_rtstruct

    image = read_image(series)
    masks = read_rtstruct(rtstruct, image)
    if rois:
        missing = [r for r in rois if r not in masks]
        if missing:
            raise InputError(rtstruct, f"no contoured ROI {missing[0]!r}; it has: {', '.join(masks)}")
        masks = {r: masks[r] for r in rois}
    label = np.zeros(image.shape, dtype=np.uint16)
    covered = []
    for value, (name, mask) in enumerate(masks.items(), start=1):
        if (label[mask] > 0).any():
            covered.append(name)
        label[mask] = value
    names = {"background": 0} | {name: v for v, name in enumerate(masks, start=1)}
    case = case or re.sub(r"[^A-Za-z0-9]+", "_", Path(str(series)).name).strip("_") or "case"
    ds = write_dataset(out, [(case, image, label)], names, {"0": image.modality},
                       description=f"converted from the RT Structure Set {Path(rtstruct).name}",
                       extra={"made_by": "medfound data convert-rtstruct", "rtstruct": str(rtstruct)}, overwrite=False)
    return ds, covered

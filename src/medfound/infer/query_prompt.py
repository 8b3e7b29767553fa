"""In-context segmentation told *where* to look: a box on one slice of the query.

For targets whose position differs between patients (lesions, nodules) the example set can say what
the target looks like but not where it is: the model's local attention windows look for it near the
place the examples show it. A box on one query slice says where. Every example slice is then cut to a
window centred on its own mask, and every query slice near the boxed one to a window centred on the
box, both ``context`` times the target's size, so that target and examples meet at the same place
and scale of the frame (the first pass's whole-slice view is skipped). On the boxed slice the piece
touching the box is kept; from there the answer is carried slice by slice, each window centred on the
previous slice's answer, as ``sam segment`` propagates a box.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medfound.data.orientation import (
    canonical_index,
    canonical_shape,
    file_axis,
    from_canonical,
)
from medfound.data.slicing import (
    crop_windows,
    paste_windows,
    plane_spacing,
    put_slice,
    take_slice,
)
from medfound.errors import InputError
from medfound.infer.incontext import (
    PreparedSlices,
    SupportEncodings,
    SupportPool,
    native_supports,
    prepare_slices,
)
from medfound.io import MedImage
from medfound.io.result_files import ResultFormats
from medfound.models.incontext import InContextSegmenter


def box_in_canonical(image: MedImage, axis: int, k: int, box: list[float]) -> tuple[int, np.ndarray]:
    """A box ``x0, y0, x1, y1`` on file slice ``k`` (voxel indices of the stored array along the
    axis that becomes RAS ``axis``, :func:`~medfound.data.orientation.file_axis`; x along the first
    remaining array axis, as ``sam segment`` takes boxes) -> (the canonical slice index, the box's
    corners (2, 2) in the canonical slice's in-plane indices)."""
    b = np.asarray(box, np.float64).ravel()
    if b.size != 4 or not np.isfinite(b).all() or b[2] < b[0] or b[3] < b[1]:
        raise InputError(None, f"--query-box takes four numbers x0,y0,x1,y1 with x0 <= x1, y0 <= y1; got {box}")
    if image.ndim == 2:
        if not (b[2] >= 0 and b[3] >= 0 and b[0] <= image.shape[0] - 1 and b[1] <= image.shape[1] - 1):
            raise InputError(image.source, f"--query-box {b.tolist()} lies outside the image {image.shape}")
        return 0, b.reshape(2, 2)
    along = file_axis(image, axis)
    in_plane = [d for d in range(3) if d != along]
    if not 0 <= k < image.shape[along]:
        raise InputError(image.source, f"--slice {k} is outside the study (0..{image.shape[along] - 1} along file axis {along})")
    index = np.empty((2, 3))
    index[:, along], index[:, in_plane[0]], index[:, in_plane[1]] = k, b[[0, 2]], b[[1, 3]]
    corners = canonical_index(image, index)                     # (2, 3) the box's corners, canonical
    kc = int(round(corners[0, axis]))
    plane = np.delete(corners, axis, axis=1)                     # (2, 2) in-plane canonical corners
    lo, hi = plane.min(0), plane.max(0)
    shape = [n for d, n in enumerate(canonical_shape(image)) if d != axis]
    if (hi < 0).any() or lo[0] > shape[0] - 1 or lo[1] > shape[1] - 1:
        raise InputError(image.source, f"--query-box {b.tolist()} lies outside slice {k}")
    return kc, np.stack([np.maximum(lo, 0), np.minimum(hi, np.asarray(shape) - 1)])


def centred_pool(pool: SupportPool, size: int, context: float, min_side_mm: float = 20.0) -> SupportPool:
    """Every example slice cut to a ``size``-px window centred on its mask, ``context`` times the
    mask's longer side (at least ``min_side_mm``); positions dropped (another patient's heights say
    nothing about where a lesion is)."""
    images, masks = [], []
    for img, mask, sp in native_supports(pool):
        idx = np.argwhere(mask)
        lo, hi = idx.min(0), idx.max(0)
        side = max(context * float(((hi - lo + 1) * np.asarray(sp)).max()), min_side_mm)
        centre = ((lo + hi) / 2.0)[None]
        images.append(crop_windows(img[None].astype(np.float32), sp, centre, side, size)[0])
        masks.append(crop_windows(mask[None].astype(np.float32), sp, centre, side, size)[0] > 0.5)
    return replace(pool, images=np.stack(images).astype(np.float32), masks=np.stack(masks).astype(np.float32),
                   positions=np.full(len(pool), np.nan, np.float32), planes=None)


#: how far from the boxed slice the answer reaches (see :func:`segment_in_box`)
EXTENTS = ("reach", "propagate", "both")


def segment_in_box(model: InContextSegmenter, prep: PreparedSlices, pool: SupportPool, kc: int, corners: np.ndarray,
                   context: float = 3.0, flip: bool = False, min_side_mm: float = 20.0, extent: str = "both") -> np.ndarray:
    """The examples' target on the canonical grid (bool): on slice ``kc`` inside a window centred on
    the box (``corners`` (2, 2), canonical in-plane indices), the piece touching the box; then slice by
    slice outwards, each in a window centred on the previous slice's answer and kept where it overlaps
    that answer's box. ``extent``: until the answer shrinks below a fifth of the previous one (the rule
    ``sam segment`` propagates by; ``propagate``), at most as many millimetres from the boxed slice as
    the box is wide (a target about as tall as wide; ``reach``), or whichever comes first (``both``)."""
    size = int(model.config.size)
    sp = np.asarray(plane_spacing(prep.view, prep.axis))
    device = next(model.parameters()).device
    enc = SupportEncodings(model, {0: [centred_pool(pool, size, context, min_side_mm)]}, device, flip)
    three_d = prep.view.ndim == 3
    out = np.zeros(prep.view.shape, bool)

    def answer(k: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Slice ``k``'s answer in a window around the box lo..hi, the pieces that overlap the box."""
        from scipy import ndimage

        native = take_slice(prep.view.array, prep.axis, k) if three_d else prep.view.array
        centre = ((lo + hi) / 2.0)[None]
        side_mm = max(context * float(((hi - lo + 1) * sp).max()), min_side_mm)
        with torch.inference_mode():
            x = torch.from_numpy(crop_windows(native[None], tuple(sp), centre, side_mm, size))[:, None].to(device)
            p = enc.probability(0, x, None)[0, 0].float().cpu()
        mask = paste_windows(p[None], tuple(sp), native.shape, centre, side_mm)[0] > 0.5
        lab, n = ndimage.label(mask)
        a, b = np.floor(lo).astype(int), np.ceil(hi).astype(int) + 1
        hits = np.unique(lab[a[0]:b[0], a[1]:b[1]])
        return np.isin(lab, hits[hits > 0]) if n else mask

    first = answer(kc, corners[0], corners[1])
    if not three_d:
        return first
    put_slice(out, prep.axis, kc, first)
    width_mm = float(((corners[1] - corners[0] + 1) * sp).max())
    reach = int(np.ceil(width_mm / float(prep.view.spacing[prep.axis]))) if extent != "propagate" else prep.view.shape[prep.axis]
    for step in (1, -1):
        prev, j = first, kc + step
        while prev.any() and 0 <= j < prep.view.shape[prep.axis] and abs(j - kc) <= reach:
            idx = np.argwhere(prev)
            m = answer(j, idx.min(0).astype(float), idx.max(0).astype(float))
            if extent != "reach" and m.sum() < 0.2 * prev.sum():
                break
            put_slice(out, prep.axis, j, m)
            prev, j = m, j + step
    return out


def segment_with_query_box(model: InContextSegmenter, image: MedImage, pool: SupportPool, k: int, box: list[float],
                           axis: int = 2, modality: str | None = None, context: float = 3.0,
                           flip: bool = False, extent: str = "both") -> np.ndarray:
    """Binary mask on ``image``'s own grid of the examples' target inside the box on file slice ``k``."""
    prep = prepare_slices(image, int(model.config.size), axis, modality)
    kc, corners = box_in_canonical(image, axis, k, box)
    mask = segment_in_box(model, prep, pool, kc, corners, context, flip, extent=extent)
    return from_canonical(mask.astype(np.uint8), prep.ornt) if prep.ornt is not None else mask.astype(np.uint8)


def query_box_path(support: str | os.PathLike, input_path: str | os.PathLike, output: str | os.PathLike,
                   box: list[float], k: int | None, model_run: str | os.PathLike | None = None,
                   labels: list[str] | None = None, support_size: int = 16, axis: int = 2,
                   modality: str | None = None, device: torch.device | str = "cpu",
                   formats: ResultFormats | None = None) -> list[Path]:
    """What ``medfound segment --query-box`` does: one image, one label of the example set, the
    target inside the box -> ``output/<case>.<ext>`` and ``labels.json``, with the DICOM objects
    ``formats`` asks for."""
    from medfound.data.nnunet import NnUNetDataset
    from medfound.infer.incontext import (
        inference_settings,
        resolve_labels,
        support_pools,
    )
    from medfound.infer.summary import summarise
    from medfound.io import read_image
    from medfound.io.outputs import (
        check_output_dir,
        final_paths,
        staged_dir,
        write_label_names,
    )
    from medfound.io.read import inputs_of
    from medfound.models.incontext_weights import load_incontext

    formats = formats or ResultFormats(algorithm="medfound segment --query-box")
    items = inputs_of(input_path)
    if len(items) != 1:
        raise InputError(input_path, f"--query-box points into one image; this folder holds {len(items)}")
    case, path = items[0]
    ds = NnUNetDataset.open(support)
    chosen = resolve_labels(ds, labels)
    if len(chosen) != 1:
        raise InputError(ds.root / "dataset.json", f"--query-box segments one label; the example set has {len(chosen)} "
                         f"({', '.join(list(chosen.values())[:6])}...): choose one with --label")
    output = check_output_dir(output, [input_path, support, model_run])
    image = read_image(path)
    if image.ndim == 3 and k is None:
        raise InputError(None, "--query-box on a 3D image needs --slice")
    formats.check(image, path)
    model, cfg = load_incontext(model_run)
    model = model.to(device)
    value = next(iter(chosen))
    box_in_canonical(image, axis, k or 0, box)  # a box outside the image fails before the examples are read
    pool = support_pools(support, chosen, int(cfg["model"]["size"]), axis)[value].evenly(support_size)
    mod = modality or (image.modality if image.modality != "OT" else ds.case_modality(ds.cases()[0]))
    mask = segment_with_query_box(model, image, pool, k or 0, box, axis, mod, flip=inference_settings(cfg)["flip"])
    mask = mask.astype(np.uint16) * value
    with staged_dir(output) as stage:
        written = [*formats.write(mask, image, stage, case, chosen), write_label_names(stage, chosen)]
    summarise(case, mask, image, chosen, f"modality {mod}, {len(pool)} example slices, box {box} on slice {k}",
              "nothing like the examples inside the box")
    return final_paths(written, stage, output)

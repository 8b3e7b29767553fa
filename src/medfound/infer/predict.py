"""``medfound predict``: a fine-tuned segmenter on 2D images and 3D volumes, in their geometry.

Volumes are reoriented to canonical RAS (as in training), cut into slices along the trained axis,
and pushed through the network in batches; each batch's class scores are mapped back onto the
slice's own pixels and only the label map is kept, so memory stays flat in the number of slices.
The mask is reoriented back and written on the input's exact grid.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from medfound.data.normalize import apply_bounds, intensity_bounds
from medfound.data.orientation import from_canonical, to_canonical
from medfound.data.slicing import from_square, iter_slices, to_square
from medfound.io import MedImage, read_image
from medfound.io.outputs import check_output_dir, final_paths, staged_dir, write_label_names
from medfound.io.read import inputs_of
from medfound.io.result_files import ResultFormats
from medfound.models.segmenter import load_segmenter, predict_square


def _batches(image: MedImage, axis: int, size: int, batch: int,
             bounds: tuple[float, float]) -> Iterator[list[tuple[int, np.ndarray, object]]]:
    buf = []
    for k, sl, spacing in iter_slices(image, axis):
        sq, geom = to_square(apply_bounds(sl, bounds), spacing, size)
        buf.append((k, sq, geom))
        if len(buf) == batch:
            yield buf
            buf = []
    if buf:
        yield buf


def assumed_modality(image: MedImage, cfg: dict, modality: str | None = None) -> str:
    """``modality`` if given, else the file's; files that record none (NIfTI, PNG) are taken to be of
    the training modality."""
    return modality or (image.modality if image.modality != "OT" else None) or cfg.get("modality") or "OT"


def predict_image(model: torch.nn.Module, cfg: dict, image: MedImage, batch_size: int = 16,
                  bf16: bool = False, modality: str | None = None, progress=None) -> np.ndarray:
    """Label map (dataset label values) on ``image``'s grid; ``progress(n)`` is called after each
    batch of ``n`` slices."""
    mod = assumed_modality(image, cfg, modality)
    bounds = intensity_bounds(image.array, mod)  # once per volume; applied slice by slice below
    view, ornt = image, None
    if image.ndim == 3 and not image.meta.get("frames_are_time"):
        view, ornt = to_canonical(image)  # a view of the stored voxels, not a copy
    axis = cfg.get("axis", 2) if view.ndim == 3 else 2
    out = np.zeros(view.shape, dtype=np.uint8)
    lut = np.zeros(cfg["n_classes"], dtype=np.uint16)
    for c, info in cfg["classes"].items():
        lut[int(c)] = int(info["label"])
    device = next(model.parameters()).device
    for items in _batches(view, axis, int(cfg["image_size"]), batch_size, bounds):
        x = torch.from_numpy(np.stack([sq for _, sq, _ in items])[:, None]).to(device)
        probs = predict_square(model, x, autocast=bf16).cpu()
        for (k, _, geom), pr in zip(items, probs):
            labels = from_square(pr, geom).argmax(axis=0)
            if view.ndim == 2:
                out[:] = labels
            else:
                idx = [slice(None)] * 3
                idx[axis] = k
                out[tuple(idx)] = labels
        if progress is not None:
            progress(len(items))
    if ornt is not None:
        out = from_canonical(out, ornt)
    return lut[out]


def _n_slices(image: MedImage, cfg: dict) -> int:
    """How many slices :func:`predict_image` cuts ``image`` into."""
    if image.ndim == 2:
        return 1
    view = image if image.meta.get("frames_are_time") else to_canonical(image)[0]
    return view.shape[cfg.get("axis", 2)]


def predict_path(model_run: str | os.PathLike, input_path: str | os.PathLike, output: str | os.PathLike,
                 batch_size: int = 16, dicom_seg: bool = False, bf16: bool = False, progress: bool = True,
                 modality: str | None = None, device: torch.device | str = "cpu", rtstruct: bool = False) -> list[Path]:
    """Every image of ``input_path`` -> ``output/<case>.<ext>``. Outputs appear together when every
    image has succeeded, or not at all (they are staged beside ``output`` meanwhile). Progress advances
    slice batch by slice batch; each image ends with a summary line (modality, slices, ml per label)."""
    import sys

    from medfound.infer.summary import summary_lines
    from medfound.progress import Progress

    model, cfg = load_segmenter(model_run)
    model = model.to(device)
    items = inputs_of(input_path)
    output = check_output_dir(output, [input_path, model_run])
    names = {int(i["label"]): i["name"] for i in cfg["classes"].values()}
    formats = ResultFormats(dicom_seg, rtstruct, f"medfound predict ({Path(model_run).name})")
    written, report = [], []
    # Images are read one at a time (an archive need not fit in memory); progress counts images, each
    # advanced slice batch by slice batch.
    with Progress("predict", len(items), enabled=progress) as bar, staged_dir(output) as stage:
        for n, (case, path) in enumerate(items, start=1):
            image = read_image(path)
            slices = _n_slices(image, cfg)
            formats.check(image, path)  # before this image's NIfTI is written
            mod = assumed_modality(image, cfg, modality)
            mask = predict_image(model, cfg, image, batch_size, bf16, mod,
                                 progress=lambda k, n=n, s=slices: bar.advance(k / s, f"image {n}/{len(items)}"))
            written += formats.write(mask, image, stage, case, names)
            report += summary_lines(case, mask, image, names, f"modality {mod}, {slices} slice(s) at "
                                    f"{cfg['image_size']} px on {torch.device(device).type}")
        written.append(write_label_names(stage, names))
    # Told once every image has succeeded: a bad input later in the folder stays a one-line error.
    print("\n".join(report), file=sys.stderr)
    return final_paths(written, stage, output)

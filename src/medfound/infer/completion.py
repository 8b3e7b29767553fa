"""Same-study completion: a study with some slices labelled -> every slice labelled.

The user labelled a few slices of *their own* volume and wants the rest. What an example set from
another subject does not give is known here: where the structure is on the labelled slices, so its
outline between them can be interpolated (signed distances blended by height, as shape-based
interpolation does; an empty labelled slice closes the structure; beyond the outermost labelled
slice it tapers off). The interpolation ignores the image between the labelled slices; the
completion refiner (``models.completion_refiner``, trained on same-study episodes) looks at it and
corrects the outline. The in-context model, with the labelled slices as its example set at their
exact heights, can be mixed in (``model_share``); the shipped share, 0, was chosen on non-held-out
structures, where the model added nothing measurable (``docs/results/incontext-same-study.md``).
Labelled slices are returned as they were given, empty ones included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfound.data.completion_inputs import (
    intensity_scale,
    refiner_inputs,
    structure_window,
)
from medfound.data.orientation import (
    canonical_index,
    file_axis,
    from_canonical,
    to_canonical,
)
from medfound.data.shape_interpolation import mean_gap, prior_reach, shape_prior
from medfound.data.slicing import plane_spacing, take_slice, to_square
from medfound.errors import InputError
from medfound.infer.incontext import (
    PreparedSlices,
    SupportEncodings,
    SupportPool,
    combine,
    prepare_slices,
    segment_prepared,
)
from medfound.infer.summary import summarise
from medfound.io import MedImage, read_image
from medfound.io.outputs import (
    check_output_dir,
    final_paths,
    staged_dir,
    write_label_names,
)
from medfound.io.read import inputs_of
from medfound.io.result_files import ResultFormats
from medfound.models.completion_refiner import (
    CompletionRefiner,
    load_refiner,
    prior_logits,
)
from medfound.models.incontext import InContextSegmenter

#: the settings of :func:`complete_study` that ship (chosen on non-held-out structures)
COMPLETION_DEFAULTS = {"model_share": 0.0, "softness_mm": 1.0, "taper": 1.0, "refine": True}


@dataclass
class PartialLabels:
    """A partial label map in the canonical frame: the labelled slice indices along ``axis``."""

    labels: np.ndarray      # canonical label array (the study's canonical grid)
    slices: np.ndarray      # sorted labelled slice indices (canonical frame)
    axis: int


def file_to_canonical_slices(image: MedImage, axis: int, file_slices: list[int]) -> list[int]:
    """Slice numbers as the file counts them (voxel index along the file axis that becomes RAS
    ``axis``) -> indices along ``axis`` of the canonical view."""
    if image.ndim != 3:
        return list(file_slices)
    along = file_axis(image, axis)
    n = image.shape[along]
    bad = [k for k in file_slices if not 0 <= k < n]
    if bad:
        raise InputError(None, f"--labelled-slices {bad[0]} is outside the study (slices 0..{n - 1} along file axis {along})")
    index = np.zeros((len(file_slices), 3))
    index[:, along] = file_slices
    return [int(round(k)) for k in canonical_index(image, index)[:, axis]]


def read_partial(image: MedImage, partial: MedImage, axis: int = 2,
                 labelled_slices: list[int] | None = None) -> PartialLabels:
    """Check a partial label map against its study and find the labelled slices: those given
    (``labelled_slices``, numbered as in the file) or every slice holding any label."""
    if image.ndim != 3:
        raise InputError(image.source, "same-study completion needs a 3D study (one volume)")
    if partial.shape != image.shape or not np.allclose(partial.affine, image.affine, atol=1e-3):
        raise InputError(partial.source, f"the partial labels are not on the study's grid (shape {partial.shape} "
                         f"against {image.shape}, or another position/orientation); resample them onto the study first")
    arr = np.asarray(partial.array)
    if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
        raise InputError(partial.source, "the partial labels are not a label map (non-integer values)")
    if arr.min() < 0:
        raise InputError(partial.source, "the partial labels hold negative values")
    canon = to_canonical(partial.with_array(arr.astype(np.int32)))[0].array
    other = tuple(d for d in range(3) if d != axis)
    if labelled_slices is None:
        slices = np.flatnonzero(canon.any(axis=other))
        if not len(slices):
            raise InputError(partial.source, "the partial labels are empty: label at least one slice")
    else:
        slices = np.unique(np.asarray(file_to_canonical_slices(image, axis, labelled_slices), int))
        off = [k for k in np.flatnonzero(canon.any(axis=other)) if k not in set(slices.tolist())]
        if off:
            raise InputError(partial.source, f"labels on slice {off[0]} (canonical), which --labelled-slices does not list")
        if not canon.any():
            raise InputError(partial.source, "the partial labels are empty on every labelled slice")
    return PartialLabels(canon, slices.astype(int), axis)


def labelled_pool(prep: PreparedSlices, partial: PartialLabels, value: int, size: int, min_pixels: int = 4) -> SupportPool | None:
    """The labelled slices holding label ``value`` as the model's example set (exact heights)."""
    spacing = plane_spacing(prep.view, prep.axis)
    imgs, masks, ks = [], [], []
    for k in partial.slices:
        hit = take_slice(partial.labels, partial.axis, int(k)) == value
        m = to_square(hit.astype(np.float32), spacing, size, nearest=True)[0]
        if m.sum() >= min_pixels:
            imgs.append(prep.squares[k])
            masks.append(m)
            ks.append(int(k))
    if not ks:
        return None
    return SupportPool(value, str(value), np.stack(imgs), np.stack(masks), prep.positions[ks].astype(np.float32),
                       [f"study:{k}" for k in ks], ["study"] * len(ks))


def model_probability(model: InContextSegmenter, prep: PreparedSlices, partial: PartialLabels, value: int,
                      size: int, reach: np.ndarray, batch_size: int = 16) -> np.ndarray | None:
    """The in-context model's probability of label ``value`` (canonical grid) with the labelled
    slices holding it as the example set, on the slices in ``reach`` (n,) bool; ``None`` when no
    labelled slice holds enough of it."""
    pool = labelled_pool(prep, partial, value, size)
    if pool is None:
        return None
    enc = SupportEncodings(model, {value: [pool]}, next(model.parameters()).device)
    return segment_prepared(model, prep, enc, batch_size, gates={value: reach})[value].astype(np.float32)


def mix_in_model(prior: np.ndarray, model: InContextSegmenter | None, prep: PreparedSlices | None,
                 partial: PartialLabels, value: int, size: int, model_share: float, batch_size: int = 16) -> np.ndarray:
    """Label ``value``'s completed probability: the shape prior with ``model_share`` of the in-context
    model's, on the slices the prior reaches; the prior alone without a model, with no share, or when
    no labelled slice holds enough of the label."""
    if model is None or prep is None or model_share <= 0:
        return prior
    prob = model_probability(model, prep, partial, value, size, prior_reach(prior, partial.axis), batch_size)
    return prior if prob is None else (1 - model_share) * prior + model_share * prob


def refine_prior(refiner: CompletionRefiner, images: np.ndarray, prior: np.ndarray, mask_of: np.ndarray,
                 slices: np.ndarray, axis: int = 0, batch_size: int = 32) -> np.ndarray:
    """The interpolated outline ``prior`` corrected by the refiner on every unlabelled slice it
    reaches. ``images`` (the study), ``prior`` and ``mask_of`` (bool, the structure on the labelled
    ``slices``) share one grid, slices along ``axis``. The correction is computed on the window around
    the structure and added to the outline's logits at the study's own resolution, so where the
    refiner has nothing to say the outline keeps its detail."""
    images, along, mask_of = (np.moveaxis(a, axis, 0) for a in (images, prior, mask_of))
    window = structure_window(mask_of[slices])
    reach = np.flatnonzero(prior_reach(along, 0))
    todo = np.setdiff1d(reach, slices)
    if window is None or not len(todo):
        return prior
    scale = intensity_scale(window.cut(images[reach]))
    masks = {int(k): mask_of[k].astype(np.float32) for k in slices}
    size = refiner.config.size
    device = next(refiner.parameters()).device
    out = prior.copy()
    out_along = np.moveaxis(out, axis, 0)  # a view: writing into it writes into ``out``
    shape = (window.r1 - window.r0, window.c1 - window.c0)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size].tolist()
        x = refiner_inputs(images, masks, along, slices, chunk, window, scale, size).to(device)
        with torch.no_grad():
            corr = refiner.correction(x).float()[:, None]
        corr = F.interpolate(corr, size=shape, mode="bilinear", align_corners=False)[:, 0].cpu()
        base = torch.from_numpy(window.cut(along[chunk]).astype(np.float32))
        out_along[chunk, window.r0:window.r1, window.c0:window.c1] = torch.sigmoid(prior_logits(base) + corr).numpy()
    return out


def complete_study(image: MedImage, partial: PartialLabels, model: InContextSegmenter | None = None,
                   size: int = 128, modality: str | None = None, batch_size: int = 16,
                   model_share: float = COMPLETION_DEFAULTS["model_share"],
                   softness_mm: float = COMPLETION_DEFAULTS["softness_mm"],
                   taper: float = COMPLETION_DEFAULTS["taper"], refiner: CompletionRefiner | None = None,
                   progress=None) -> np.ndarray:
    """The study's label map on its own grid: labelled slices as given, the others completed, label
    by label, from the interpolated outlines, corrected by ``refiner`` where given and mixed with
    the in-context model (``model_share`` > 0). ``progress``: called with one unit per label."""
    view, ornt = to_canonical(image)
    spacing = plane_spacing(view, partial.axis)
    prep = prepare_slices(image, size, partial.axis, modality) if model is not None and model_share > 0 else None
    probs = {}
    for v in labelled_values(partial):
        prior = shape_prior(partial.labels, partial.slices, v, partial.axis, spacing, softness_mm, taper)
        if refiner is not None:
            prior = refine_prior(refiner, view.array, prior, partial.labels == v, partial.slices, partial.axis)
        probs[v] = mix_in_model(prior, model, prep, partial, v, size, model_share, batch_size)
        if progress is not None:
            progress(1)
    labels = combine(probs) if probs else np.zeros(view.shape, np.uint16)
    index = labelled_index(partial)
    labels[index] = partial.labels[index]
    return from_canonical(labels, ornt)


def labelled_values(partial: PartialLabels) -> list[int]:
    """The label values that appear on the labelled slices."""
    return [int(v) for v in np.unique(partial.labels[labelled_index(partial)]) if v != 0]


def labelled_index(partial: PartialLabels) -> tuple:
    """The index of the labelled slices into the canonical grid."""
    index = [slice(None)] * 3
    index[partial.axis] = partial.slices
    return tuple(index)


def nearest_slice_copy(partial: PartialLabels, value: int) -> np.ndarray:
    """Baseline: every slice takes the labelled slice nearest to it, up to half a mean gap beyond
    the outermost ones (canonical grid, bool)."""
    ks = partial.slices
    gap = mean_gap(ks)
    n = partial.labels.shape[partial.axis]
    out = np.zeros(partial.labels.shape, bool)
    view, src = np.moveaxis(out, partial.axis, 0), np.moveaxis(partial.labels, partial.axis, 0)
    for z in range(n):
        if ks[0] - gap / 2 <= z <= ks[-1] + gap / 2:
            view[z] = src[ks[np.abs(ks - z).argmin()]] == value
    return out


def contour_interpolation(partial: PartialLabels, value: int) -> np.ndarray:
    """Baseline: ITK's morphological contour interpolation between the labelled slices (the method
    behind 3D Slicer's "Fill between slices"; package ``itk-morphologicalcontourinterpolation``).
    ITK runs in a worker process of its own: loaded next to torch and SimpleITK in one process, its
    libraries crashed the interpreter at exit."""
    from concurrent.futures import ProcessPoolExecutor

    global _ITK_WORKER
    sparse = np.zeros(partial.labels.shape, np.uint8)
    index = labelled_index(partial)
    sparse[index] = partial.labels[index] == value
    if _ITK_WORKER is None:
        import multiprocessing

        _ITK_WORKER = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_exit_before_teardown)
    return _ITK_WORKER.submit(_itk_contour_interpolation, sparse, partial.axis).result()


_ITK_WORKER = None


def _exit_before_teardown() -> None:
    """The worker leaves before ITK's teardown, which is what crashes."""
    import atexit

    atexit.register(os._exit, 0)


def _itk_contour_interpolation(sparse: np.ndarray, axis: int) -> np.ndarray:
    try:
        import itk
    except ImportError:
        raise InputError(None, "contour interpolation needs itk-morphologicalcontourinterpolation "
                         "(pip install itk-morphologicalcontourinterpolation)") from None
    image = itk.image_from_array(np.ascontiguousarray(sparse.transpose(2, 1, 0)))  # numpy (z, y, x) order
    interp = itk.MorphologicalContourInterpolator.New(image)
    interp.SetAxis(axis)
    interp.Update()
    return itk.array_from_image(interp.GetOutput()).transpose(2, 1, 0) > 0


def complete_path(input_path: str | os.PathLike, partial_path: str | os.PathLike, output: str | os.PathLike,
                  labelled_slices: list[int] | None = None, axis: int = 2, model_run: str | os.PathLike | None = None,
                  model_share: float | None = None, modality: str | None = None, batch_size: int = 16,
                  progress: bool = True, device: torch.device | str = "cpu",
                  formats: ResultFormats | None = None, refiner_run: str | os.PathLike | None = None,
                  refine: bool = COMPLETION_DEFAULTS["refine"]) -> list[Path]:
    """What ``medfound segment --partial-labels`` does: one study and its partial label map ->
    ``output/<case>.<ext>`` (every slice labelled, the labelled ones as given) and ``labels.json``,
    with the DICOM objects ``formats`` asks for."""
    from medfound.progress import Progress

    share = COMPLETION_DEFAULTS["model_share"] if model_share is None else model_share
    if not 0 <= share <= 1:
        raise InputError(None, f"--model-share must be between 0 and 1, got {share}")
    formats = formats or ResultFormats(algorithm="medfound segment --partial-labels")
    items = inputs_of(input_path)
    if len(items) != 1:
        raise InputError(input_path, f"--partial-labels completes one study; this folder holds {len(items)} images")
    case, path = items[0]
    output = check_output_dir(output, [input_path, partial_path, model_run, refiner_run])
    image, partial_image = read_image(path), read_image(partial_path)
    partial = read_partial(image, partial_image, axis, labelled_slices)
    formats.check(image, path)
    values = labelled_values(partial)
    model, size = None, 128
    if share > 0:
        from medfound.models.incontext_weights import load_incontext

        model, cfg = load_incontext(model_run)
        model, size = model.to(device), int(cfg["model"]["size"])
    names = {v: f"label_{v}" for v in values}
    refiner = load_refiner(refiner_run)[0].to(device) if refine else None
    with Progress("complete", len(values), enabled=progress) as bar, staged_dir(output) as stage:
        mask = complete_study(image, partial, model, size, modality, batch_size, share, refiner=refiner,
                              progress=lambda u: bar.advance(u, f"{len(partial.slices)} labelled slices"))
        written = [*formats.write(mask, image, stage, case, names), write_label_names(stage, names)]
    how = "refined" if refine else "interpolated"
    summarise(case, mask, image, names, f"{len(partial.slices)} labelled slices, {how}, model share {share:g}",
              "on no labelled slice")
    return final_paths(written, stage, output)

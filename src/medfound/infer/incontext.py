"""``medfound segment``: segment new images from an example set, with no gradient step.

A support folder is an nnU-Net dataset (``imagesTr``/``labelsTr``), 2D or 3D; every slice of a 3D
support volume that contains a label becomes a support pair for that label (with its relative position
in the volume). Support features are encoded once per label (and per ensemble member) and reused for
every query slice; a 3D input is segmented slice by slice in batches and written on its own grid.
Multi-class: one label at a time, then the most probable label above 0.5 wins each pixel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from medfound.data.correspondence import map_points, register_affine
from medfound.data.episodes import content_mask, relative_positions
from medfound.data.nnunet import NnUNetDataset
from medfound.data.normalize import normalize
from medfound.data.orientation import from_canonical, to_canonical
from medfound.data.slicing import from_square, iter_slices, plane_spacing, put_slice, take_slice, to_square
from medfound.errors import InputError
from medfound.infer.label_fusion import registered_label_fusion, similarity
from medfound.infer.summary import summarise, warn
from medfound.io import MedImage, read_image
from medfound.io.image import is_known_modality
from medfound.io.outputs import check_output_dir, final_paths, staged_dir, write_label_names
from medfound.io.read import inputs_of
from medfound.io.result_files import ResultFormats
from medfound.models.incontext import InContextSegmenter


@dataclass
class SupportPool:
    """Every support slice of one label: images/masks (n, S, S), positions (n,) (NaN for 2D)."""

    label: int
    name: str
    images: np.ndarray
    masks: np.ndarray
    positions: np.ndarray
    sources: list[str]
    cases: list[str] = field(default_factory=list)        # support case of each slice
    centroids: np.ndarray | None = None                   # (n, 3) world RAS mm of each mask's centre (3D)
    volumes: dict[str, MedImage] = field(default_factory=dict)  # normalised canonical support images
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)  # their label arrays (same grid)
    axis: int = 2                                         # slice axis of 3D support volumes
    planes: list | None = None  # per slice (image, mask, spacing) on the query's slice grid, once warped there

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> SupportPool:
        return replace(self, images=self.images[idx], masks=self.masks[idx], positions=self.positions[idx],
                       sources=[self.sources[i] for i in idx], cases=[self.cases[i] for i in idx] if self.cases else [],
                       centroids=None if self.centroids is None else self.centroids[idx],
                       planes=None if self.planes is None else [self.planes[i] for i in idx])

    def evenly(self, n: int) -> SupportPool:
        """``n`` slices spread evenly over the pool (ordered by case, then position)."""
        if n >= len(self):
            return self
        return self.subset(np.unique(np.linspace(0, len(self) - 1, n).round().astype(int)))

    def random(self, n: int, rng: np.random.Generator) -> SupportPool:
        if n >= len(self):
            return self
        return self.subset(np.sort(rng.choice(len(self), n, replace=False)))


@dataclass
class PreparedSlices:
    """A volume (or 2D image) cut into normalised square slices along ``axis`` — one pass over it."""

    view: MedImage
    ornt: np.ndarray | None
    axis: int
    squares: np.ndarray       # (n, S, S)
    geoms: list
    positions: np.ndarray     # (n,)


def prepare_slices(image: MedImage, size: int, axis: int = 2, modality: str | None = None) -> PreparedSlices:
    """Normalise as in training (per modality, whole volume), reorient to RAS, cut into square slices."""
    mod = modality or image.modality
    norm = image.with_array(normalize(image.array, mod))
    view, ornt = norm, None
    if norm.ndim == 3 and not image.meta.get("frames_are_time"):
        view, ornt = to_canonical(norm)
    if view.ndim == 3:
        positions = relative_positions(content_mask(view.array), axis)
    else:
        axis, positions = 2, np.array([np.nan], np.float32)
    squares, geoms = [], []
    for _, sl, spacing in iter_slices(view, axis):
        sq, geom = to_square(sl, spacing, size)
        squares.append(sq)
        geoms.append(geom)
    return PreparedSlices(view, ornt, axis, np.stack(squares), geoms, positions)


def label_names(ds: NnUNetDataset) -> dict[int, str]:
    return {v: n for n, v in ds.labels.items() if v != 0}


def resolve_labels(ds: NnUNetDataset, wanted: list[str] | None) -> dict[int, str]:
    """``--label`` values or names -> {value: name}; all labels when none are given."""
    names = label_names(ds)
    if not wanted:
        return names
    out = {}
    by_name = {n.lower(): v for v, n in names.items()}
    for w in wanted:
        v = int(w) if str(w).isdigit() else by_name.get(str(w).lower())
        if v is None or v not in names:
            raise InputError(ds.root / "dataset.json", f"no label {w!r} in the support set "
                             f"(labels: {', '.join(f'{k}={n}' for k, n in list(names.items())[:12])}...)")
        out[v] = names[v]
    return out


def support_pools(folder: str | os.PathLike, labels: dict[int, str] | None, size: int, axis: int = 2,
                  min_pixels: int = 4) -> dict[int, SupportPool]:
    """Read the support dataset once and collect, per label, the slices that contain it."""
    ds = NnUNetDataset.open(folder)
    labels = labels or label_names(ds)
    acc = {v: ([], [], [], [], [], []) for v in labels}
    volumes: dict[str, MedImage] = {}
    label_maps: dict[str, np.ndarray] = {}
    for case in ds.cases():
        image, label = ds.read_case(case)
        if label is None:
            raise InputError(ds.image_path(case), "support image has no mask in labelsTr")
        prep = prepare_slices(image, size, axis, ds.case_modality(case) if image.modality == "OT" else None)
        lab = to_canonical(label)[0] if prep.ornt is not None else label
        volumes[case] = prep.view
        label_maps[case] = lab.array.astype(np.uint16 if 0 <= lab.array.min() and lab.array.max() < 2 ** 16 else np.int32)
        spacing = plane_spacing(prep.view, prep.axis)
        for k, ls, _ in iter_slices(lab, prep.axis):
            present = np.unique(ls)
            for v in labels:
                if v not in present:
                    continue
                hit = ls == v
                m = to_square(hit.astype(np.float32), spacing, size, nearest=True)[0]
                if m.sum() < min_pixels:
                    continue
                centre = _centroid_world(prep, k, hit)
                for lst, item in zip(acc[v], (prep.squares[k], m, prep.positions[k], f"{case}:{k}", case, centre)):
                    lst.append(item)
    pools = {}
    for v, (imgs, masks, pos, src, cases, centres) in acc.items():
        if not imgs:
            raise InputError(ds.root, f"label {v} ({labels[v]}) appears in no support slice")
        pools[v] = SupportPool(v, labels[v], np.stack(imgs), np.stack(masks), np.asarray(pos, np.float32), src,
                               cases, np.stack(centres), volumes, label_maps, prep.axis)
    return pools


def _centroid_world(prep: PreparedSlices, k: int, hit: np.ndarray) -> np.ndarray:
    """World RAS mm of the centre of a mask on slice ``k`` (NaN for 2D images)."""
    if prep.view.ndim != 3:
        return np.full(3, np.nan)
    index = np.insert(np.argwhere(hit).mean(0), prep.axis, k)
    return map_points(prep.view.affine, index[None])[0]


def register_supports(pools: dict[int, SupportPool], prep: PreparedSlices) -> dict[str, np.ndarray | None]:
    """Each support volume registered (affine) onto the query volume, once for all labels:
    case -> 4x4 support-world -> query-world matrix (``None`` where it cannot be done)."""
    volumes = {}
    for pool in pools.values():
        volumes.update({c: v for c, v in pool.volumes.items() if v.ndim == 3})
    if prep.view.ndim != 3:
        return {case: None for case in volumes}
    return {case: register_affine(prep.view, vol) for case, vol in volumes.items()}


def in_query_frame(pool: SupportPool, prep: PreparedSlices, transforms: dict[str, np.ndarray | None]) -> SupportPool:
    """The pool in the query's frame, through each support volume's registration: each slice's
    position re-expressed as the query height it shows (so that the position bias and the extent gate
    compare like with like) and the slice itself resampled onto the query's slice
    grid (:func:`warp_in_plane`). Slices whose volume could not be registered stay as they are."""
    if prep.view.ndim != 3 or pool.centroids is None or len(pool.cases) != len(pool) or len(prep.positions) < 2:
        return pool
    slope, start = float(prep.positions[1] - prep.positions[0]), float(prep.positions[0])
    to_index = np.linalg.inv(prep.view.affine)
    pos = pool.positions.copy()
    heights = np.full(len(pool), np.nan)
    cases = np.asarray(pool.cases)
    for case, matrix in transforms.items():
        rows = (cases == case) & np.isfinite(pool.centroids).all(1)
        if matrix is None or not rows.any():
            continue
        heights[rows] = map_points(to_index, map_points(matrix, pool.centroids[rows]))[:, prep.axis]
        pos[rows] = start + slope * heights[rows]
    placed = replace(pool, positions=pos.astype(np.float32))
    return warp_in_plane(placed, prep, transforms, heights)


def slice_tilt(matrix: np.ndarray, support: MedImage, query: MedImage, axis: int) -> float:
    """Sine of the largest angle between the query's slice plane and a support slice plane carried
    into the query through ``matrix`` (support world -> query world): 0 for parallel planes."""
    in_plane = [d for d in range(3) if d != axis]
    to_support = np.linalg.inv(matrix)[:3, :3]
    normal = np.cross(support.affine[:3, in_plane[0]], support.affine[:3, in_plane[1]])
    normal /= np.linalg.norm(normal)
    dirs = [to_support @ query.affine[:3, d] for d in in_plane]
    return float(max(abs(d @ normal) / np.linalg.norm(d) for d in dirs))


def warp_in_plane(pool: SupportPool, prep: PreparedSlices, transforms: dict[str, np.ndarray | None],
                  heights: np.ndarray, min_pixels: int = 4, max_tilt: float = 0.17) -> SupportPool:
    """Each registered support slice resampled onto the query's slice grid at the query height it shows
    (``heights``, query slice index units): the same anatomy then falls on the same pixels of the square
    frame whatever each scan's field of view, pixel size or head position. Only the chosen slice is
    read (the through-plane part of the mapping is projected onto it), so N support slices stay N slices
    of labelled information. Slices that land (almost) outside the query keep their own frame, and so
    do all slices of a volume whose slice planes are tilted against the query's by more than
    ``max_tilt`` (sine; 0.17 is 10 degrees): an oblique cut through the query cannot be projected onto
    one support slice."""
    from scipy import ndimage

    if not pool.volumes or not any(m is not None for m in transforms.values()):
        return pool
    size = pool.images.shape[-1]
    in_plane = [d for d in range(3) if d != prep.axis]
    shape_q = [prep.view.shape[d] for d in in_plane]
    spacing_q = plane_spacing(prep.view, prep.axis)
    grid = np.indices(shape_q, dtype=np.float64).reshape(2, -1)           # (2, P) query in-plane indices
    # query voxel index -> query world -> support world -> support voxel index, per support volume that
    # is registered and not tilted against the query
    q_to_s = {case: np.linalg.inv(vol.affine) @ np.linalg.inv(transforms[case]) @ prep.view.affine
              for case, vol in pool.volumes.items()
              if transforms.get(case) is not None and slice_tilt(transforms[case], vol, prep.view, prep.axis) <= max_tilt}
    images, masks = pool.images.copy(), pool.masks.copy()
    planes = list(pool.planes) if pool.planes is not None else [None] * len(pool)
    for i, src in enumerate(pool.sources):
        case, k = src.rsplit(":", 1)
        if case not in q_to_s or not np.isfinite(heights[i]):
            continue
        vol, to_s = pool.volumes[case], q_to_s[case]
        index_q = np.empty((3, grid.shape[1]))
        index_q[in_plane] = grid
        index_q[prep.axis] = heights[i]
        index_s = (to_s[:3, :3] @ index_q + to_s[:3, 3:])[in_plane]   # (2, P), projected onto slice k
        image = ndimage.map_coordinates(take_slice(vol.array, pool.axis, int(k)).astype(np.float32), index_s,
                                        order=1, cval=0.0).reshape(shape_q)
        hit = take_slice(pool.label_maps[case], pool.axis, int(k)) == pool.label
        mask = ndimage.map_coordinates(hit.astype(np.float32), index_s, order=1, cval=0.0).reshape(shape_q) > 0.5
        square_mask = to_square(mask.astype(np.float32), spacing_q, size, nearest=True)[0]
        if square_mask.sum() < min_pixels:
            continue
        images[i], masks[i] = to_square(image, spacing_q, size)[0], square_mask
        planes[i] = (image, mask, spacing_q)
    return replace(pool, images=images, masks=masks, planes=planes)


def native_supports(pool: SupportPool) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float]]]:
    """Each support slice of ``pool`` at its original resolution: (image, mask, in-plane spacing); a
    slice resampled onto the query's grid (:func:`warp_in_plane`, :func:`register_2d`) as such."""
    out = []
    for i, src in enumerate(pool.sources):
        if pool.planes is not None and pool.planes[i] is not None:
            out.append(pool.planes[i])
            continue
        case, k = src.rsplit(":", 1)
        vol = pool.volumes[case]
        out.append((take_slice(vol.array, pool.axis, int(k)), take_slice(pool.label_maps[case], pool.axis, int(k)) == pool.label,
                    plane_spacing(vol, pool.axis)))
    return out


def register_2d(pool: SupportPool, prep: PreparedSlices, min_pixels: int = 4, cache: dict | None = None,
                deform: bool = False) -> SupportPool:
    """A 2D query's example slices, each registered onto it (2D affine,
    :func:`~medfound.data.correspondence.register_slice`; with ``deform`` refined by a smooth
    deformation, :func:`~medfound.data.correspondence.deform_slice`) and resampled onto its pixels:
    with no volume to place them, this is what brings the same anatomy to the same place of the frame.
    Examples that fail to register, come out less like the query than they were, or whose mask would
    leave the query, stay as they are.
    ``cache``: transforms by (query id, example source, deform), reused across calls with the same query."""
    from medfound.data.correspondence import deform_slice, register_slice, warp_slice

    if prep.view.ndim != 2 or not pool.volumes:
        return pool
    size = pool.images.shape[-1]
    query, spacing_q = prep.view.array.astype(np.float32), plane_spacing(prep.view, prep.axis)
    images, masks = pool.images.copy(), pool.masks.copy()
    planes = list(pool.planes) if pool.planes is not None else [None] * len(pool)
    def transform(i: int, img: np.ndarray, sp, deformed: bool):
        key = (id(prep), pool.sources[i], deformed)
        if cache is not None and key in cache:
            return cache[key]
        tx = transform(i, img, sp, False) if deformed else register_slice(query, img.astype(np.float32), spacing_q, sp)
        if tx is not None and deformed:  # the deformation refines the (cached) affine
            tx = deform_slice(query, img.astype(np.float32), tx, spacing_q, sp)
        if cache is not None:
            cache[key] = tx
        return tx

    for i, (img, mask, sp) in enumerate(native_supports(pool)):
        tx = transform(i, img, sp, deform)
        if tx is None:
            continue
        image = warp_slice(img, tx, query.shape, spacing_q, sp)
        hit = warp_slice(mask.astype(np.float32), tx, query.shape, spacing_q, sp) > 0.5
        square_mask = to_square(hit.astype(np.float32), spacing_q, size, nearest=True)[0]
        square = to_square(image, spacing_q, size)[0]
        # a registration stuck in a wrong optimum makes the example look less like the query, not more
        if square_mask.sum() < min_pixels or similarity(prep.squares[0], square) <= similarity(prep.squares[0], pool.images[i]):
            continue
        images[i], masks[i] = square, square_mask
        planes[i] = (image, hit, spacing_q)
    return replace(pool, images=images, masks=masks, planes=planes)


def place_members(pools: dict[int, SupportPool], prep: PreparedSlices, support_size: int | None, ensemble: int = 1,
                  seed: int = 0, register: bool = True, info: dict | None = None,
                  deform_2d: bool = False) -> dict[int, list[SupportPool]]:
    """Each label's ensemble members (:func:`ensemble_members`), placed in the query's frame
    (:func:`in_query_frame`) after the support volumes are registered once onto the query (with
    ``register``; a 2D query has each example slice registered onto it, :func:`register_2d`, deformably
    with ``deform_2d``). Members are chosen first, so only their slices are resampled. ``info`` gets
    ``registered``: how many of the 3D support volumes were registered onto the query."""
    if register and prep.view.ndim == 2:  # a 2D query: each example slice registered onto it
        members = {v: [register_2d(m, prep, deform=deform_2d) for m in ensemble_members(p, support_size, ensemble, seed)]
                   for v, p in pools.items()}
        if info is not None:
            placed = [pl is not None for ms in members.values() for m in ms for pl in (m.planes or [None] * len(m))]
            kind = "2D affine + deformation" if deform_2d else "2D affine"
            info["registered"] = f"{sum(placed)} of {len(placed)} example slice(s) ({kind})"
        return members
    transforms = register_supports(pools, prep) if register else {}
    if info is not None:
        volumes = {c for p in pools.values() for c in p.volumes if p.volumes[c].ndim == 3}
        info["registered"] = f"{len(transforms)} of {len(volumes)} support volume(s)" if volumes and register \
            else "no (2D supports or --no-register)"
    return {v: [in_query_frame(m, prep, transforms) for m in ensemble_members(p, support_size, ensemble, seed)]
            for v, p in pools.items()}


class SupportEncodings:
    """Support features of each label's ensemble members, encoded once per label, and the relative
    positions of all their slices (for the extent gate). ``flip``: every member is also encoded
    mirrored (the last in-plane axis, as in training's episode-wide mirror), and queries are decoded
    both ways and averaged (test-time augmentation, twice the time).

    Only one label's encodings are held at a time (the last one asked for): keys and values cover
    every support window of every query pixel, about 0.3 GB per label at 16 supports (1.2 GB at 64),
    so an atlas of a hundred labels held at once would not fit in memory. Callers go label by label."""

    def __init__(self, model: InContextSegmenter, members: dict[int, list[SupportPool]], device: torch.device,
                 flip: bool = False):
        self.model = model
        self.members = members
        self.device = device
        self.flip = flip
        self.labels = list(members)
        self.positions = {v: np.concatenate([p.positions for p in pools]) for v, pools in members.items()}
        self._held: tuple[int, list] | None = None  # (label, [(cache, mirrored), ...])

    def encode(self, v: int) -> list:
        """Label ``v``'s encodings ``[(cache, mirrored), ...]``, computed on first use; any other
        label's are released first."""
        if self._held is not None and self._held[0] == v:
            return self._held[1]
        self._held = None
        caches = []
        with torch.inference_mode():
            for p in self.members[v]:
                images = torch.from_numpy(p.images)[None, :, None].to(self.device)
                masks = torch.from_numpy(p.masks)[None, :, None].to(self.device)
                positions = torch.from_numpy(p.positions)[None].to(self.device)
                for mirrored in ((False, True) if self.flip else (False,)):
                    cache = self.model.encode_support(images.flip(-1) if mirrored else images,
                                                      masks.flip(-1) if mirrored else masks, positions)
                    caches.append((cache, mirrored))
        self._held = (v, caches)
        return caches

    def probability(self, v: int, x: torch.Tensor, query_positions: torch.Tensor | None) -> torch.Tensor:
        """(B, 1, S, S) queries -> label ``v``'s probability, averaged over members (and mirrors)."""
        total = 0.0
        caches = self.encode(v)
        for cache, mirrored in caches:
            p = torch.sigmoid(self.model.decode(x.flip(-1) if mirrored else x, cache, query_positions))
            total = total + (p.flip(-1) if mirrored else p)
        return total / len(caches)

    def gate(self, v: int, prep: PreparedSlices, margin: float | None) -> np.ndarray:
        """(n,) bool: the query slices that label ``v``'s supports speak for (all of them for 2D
        images, unknown positions or no margin)."""
        return extent_gate(self.positions[v], prep, margin)


def extent_gate(support_positions: np.ndarray, prep: PreparedSlices, margin: float | None) -> np.ndarray:
    """(n,) bool: the query slices that supports at ``support_positions`` (query-frame relative
    heights) speak for — their :func:`support_extent` widened by ``margin`` at each end; all slices for
    2D images, unknown positions or no margin (``None``)."""
    ext = support_extent(support_positions) if prep.view.ndim == 3 and margin is not None else None
    if ext is None:
        return np.ones(len(prep.squares), bool)
    return (prep.positions >= ext[0] - margin) & (prep.positions <= ext[1] + margin)


def support_extent(positions: np.ndarray, single_gap: float = 0.05) -> tuple[float, float] | None:
    """The range of query heights a support set speaks for: from its lowest to its highest slice,
    widened at each end by the mean gap between its slices. Supports drawn from a structure stop short
    of its ends by about that much (for k slices spread over a structure, the expected distance from
    the outermost one to the end is span / (k - 1)); one slice gets ``single_gap``. ``None`` for 2D."""
    if not len(positions) or not np.isfinite(positions).all():
        return None
    distinct = np.unique(np.round(positions, 4))
    gap = float(distinct[-1] - distinct[0]) / (len(distinct) - 1) if len(distinct) > 1 else single_gap
    return float(distinct[0]) - gap, float(distinct[-1]) + gap


def ensemble_members(pool: SupportPool, support_size: int | None, ensemble: int, seed: int = 0) -> list[SupportPool]:
    """Member 0: slices spread evenly over the pool; further members: random subsets."""
    n = min(support_size or 16, len(pool))
    members = [pool.evenly(n)]
    rng = np.random.default_rng(seed)
    for _ in range(1, max(1, ensemble)):
        members.append(pool.random(n, rng))
    return members


def segment_prepared(model: InContextSegmenter, prep: PreparedSlices, enc: SupportEncodings,
                     batch_size: int = 16, progress=None, extent_margin: float | None = None,
                     refine: bool = False, prior_weight: float = 0.0,
                     through_plane_sigma: float = 0.0, gates: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Per-label probability maps (canonical view's grid, float16) for a prepared volume.

    ``extent_margin``: when support and query positions are known (3D), query slices further than this
    (in relative position) outside the range the supports speak for (:func:`support_extent`) are left
    empty: supports that all hold the structure say nothing about slices beyond it (the model, trained
    10 GPU-minutes, still paints there). The packaged model's value was chosen on non-held-out structures.
    ``refine``: a second pass on a window around each structure at 2-3x the resolution
    (:mod:`medfound.infer.refine`). ``prior_weight``: 3D only, the share of the final probability given
    to the registration prior — each query slice the mask of the support registered nearest in height
    (:func:`~medfound.infer.label_fusion.registered_label_fusion`, the supports placed by
    :func:`in_query_frame`); with 1/3, the model decides where the prior is unsure and the prior moves
    the model's threshold to 0.25 inside it and 0.75 outside. ``through_plane_sigma``: 3D only,
    :func:`smooth_through_plane` (in pixels of the model's grid). ``gates``: per label, the query slices
    to segment, in place of the supports' extent gate."""
    device = next(model.parameters()).device
    shape = prep.view.shape
    probs = {v: np.zeros(shape, dtype=np.float16) for v in enc.labels}
    use_pos = prep.view.ndim == 3
    gates = gates or {v: enc.gate(v, prep, extent_margin) for v in enc.labels}
    with torch.inference_mode():
        for v in enc.labels:  # label by label: one label's support encodings in memory at a time
            for start in range(0, len(prep.squares), batch_size):
                inside = np.flatnonzero(gates[v][start:start + batch_size])
                if len(inside):  # the slices outside the gate stay empty (zeros), and cost nothing
                    ks = start + inside
                    x = torch.from_numpy(prep.squares[ks])[:, None].to(device)
                    qpos = torch.from_numpy(prep.positions[ks]).to(device) if use_pos else None
                    for k, pr in zip(ks, enc.probability(v, x, qpos)[:, 0].float().cpu()):
                        paste_slice(prep, k, pr, probs[v])
                if progress is not None:  # one unit per label and pass
                    progress(min(batch_size, len(prep.squares) - start) / len(prep.squares))
    if refine:
        from medfound.infer.refine import refine_label  # builds on this module's types

        for v in probs:
            probs[v] = refine_label(model, prep, enc.members[v], probs[v], gates[v], batch_size, flip=enc.flip)
            if progress is not None:
                progress(1.0)
    if prior_weight > 0 and use_pos:
        for v in probs:
            prior = np.mean([to_volume(prep, registered_label_fusion(prep.positions, m.positions, m.masks, gates[v]))
                             for m in enc.members[v]], 0)
            probs[v] = ((1 - prior_weight) * probs[v].astype(np.float32) + prior_weight * prior).astype(np.float16)
    if through_plane_sigma > 0:
        probs = {v: smooth_through_plane(p, prep, through_plane_sigma) for v, p in probs.items()}
    return probs


def smooth_through_plane(prob: np.ndarray, prep: PreparedSlices, sigma_px: float) -> np.ndarray:
    """A Gaussian along the slice axis, ``sigma_px`` pixels of the model's in-plane grid wide (in mm:
    ``sigma_px`` x the square pixel's side): each slice is segmented on its own, so neighbouring slices
    disagree by more than the anatomy does; smoothing across them to the resolution the model sees in
    the plane evens that out. 2D images and time frames are returned unchanged."""
    from scipy.ndimage import gaussian_filter1d

    if prep.view.ndim != 3 or prep.ornt is None:
        return prob
    sigma = sigma_px * prep.geoms[0].pixel_mm / float(prep.view.spacing[prep.axis])  # in slices
    return gaussian_filter1d(prob.astype(np.float32), sigma, axis=prep.axis, mode="nearest").astype(prob.dtype)


def paste_slice(prep: PreparedSlices, k: int, square: np.ndarray | torch.Tensor, volume: np.ndarray) -> None:
    """Map the square-slice result ``k`` back onto its pixels in the canonical ``volume``."""
    put_slice(volume, prep.axis, k, from_square(square, prep.geoms[k]))


def to_volume(prep: PreparedSlices, squares: np.ndarray) -> np.ndarray:
    """(n, S, S) per-slice results -> an array on the canonical view's grid."""
    out = np.zeros(prep.view.shape, dtype=np.float32)
    for k, sq in enumerate(squares):
        paste_slice(prep, k, sq, out)
    return out


INFERENCE_DEFAULTS = {"extent_margin": 0.0, "refine": False, "flip": False, "prior_weight": 0.0,
                      "through_plane_sigma": 0.0, "deform_2d": False}


def inference_settings(cfg: dict, **overrides) -> dict:
    """The inference knobs (the keys of :data:`INFERENCE_DEFAULTS`, the keyword arguments of
    :func:`segment_image`) stored with a model (``config.json["inference"]``), with the caller's
    ``overrides`` that are not ``None`` on top. A model that stores none gets the extent gate with no
    extra margin: which query heights a support set speaks for is a property of the supports, not of
    the model (chosen on validation structures, see the packaged config)."""
    unknown = set(overrides) - set(INFERENCE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown inference setting(s): {sorted(unknown)}")
    for key, high in (("prior_weight", 1), ("through_plane_sigma", 16)):  # every caller's overrides, one check
        value = overrides.get(key)
        if value is not None and not 0 <= value <= high:
            raise InputError(None, f"--{key.replace('_', '-')} must be between 0 and {high}, got {value}")
    stored = cfg.get("inference", {})
    return ({k: stored.get(k, default) for k, default in INFERENCE_DEFAULTS.items()}
            | {k: v for k, v in overrides.items() if v is not None})


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Only the largest connected component (26-connected in 3D) of a binary mask: a single anatomical
    structure is one piece, so islands elsewhere are false positives (nnU-Net's post-processing, here
    an opt-in per call, since lesions and paired structures are not one piece)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def combine(probs: dict[int, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """Label map: the most probable label where its probability exceeds ``threshold``."""
    values = sorted(probs)
    stack = np.stack([probs[v] for v in values]).astype(np.float32)
    best = stack.argmax(0)
    out = np.asarray(values, dtype=np.uint16)[best]
    out[stack.max(0) <= threshold] = 0
    return out


def segment_image(model: InContextSegmenter, image: MedImage, pools: dict[int, SupportPool], size: int,
                  axis: int = 2, support_size: int | None = 16, ensemble: int = 1, batch_size: int = 16,
                  modality: str | None = None, seed: int = 0, extent_margin: float | None = None,
                  keep_largest: bool = False, register: bool = True, refine: bool = False,
                  flip: bool = False, prior_weight: float = 0.0, through_plane_sigma: float = 0.0,
                  deform_2d: bool = False, progress=None, report: dict | None = None) -> np.ndarray:
    """Label map (support label values) on ``image``'s own grid; ``keep_largest``: one connected
    piece per label; ``register``: place 3D support slices at the query height they show through an
    affine registration of each support volume onto the image (else: relative position in each volume);
    ``refine``: a second pass around each structure at a finer resolution (registration also resamples
    each support slice onto the image's slice grid, :func:`warp_in_plane`); ``flip``: mirrored
    test-time augmentation (:class:`SupportEncodings`); ``prior_weight``: the registration prior's share,
    ``through_plane_sigma``: smoothing across slices (both :func:`segment_prepared`); ``deform_2d``: a 2D
    query's examples registered deformably, not by an affine alone (:func:`register_2d`). ``progress``: called
    with units of work done (one per label and pass); ``report``: filled with what was done (slices
    used per label, whether the supports were registered, the modality assumed)."""
    device = next(model.parameters()).device
    prep = prepare_slices(image, size, axis, modality)
    placed: dict = {}
    members = place_members(pools, prep, support_size, ensemble, seed, register, info=placed, deform_2d=deform_2d)
    enc = SupportEncodings(model, members, device, flip)
    labels = combine(segment_prepared(model, prep, enc, batch_size, progress, extent_margin=extent_margin,
                                      refine=refine, prior_weight=prior_weight,
                                      through_plane_sigma=through_plane_sigma))
    if report is not None:
        report["modality"] = modality or image.modality
        report["support_slices"] = {int(v): len(ms[0]) for v, ms in members.items() if ms}
        report["registered"] = placed.get("registered", "no")
    if keep_largest:
        for v in pools:
            part = labels == v
            labels[part & ~largest_component(part)] = 0
    return from_canonical(labels, prep.ornt) if prep.ornt is not None else labels


#: support slices per label that ``segment`` and the viewer accept (one rule for both)
SUPPORT_SIZES = (1, 64)


def segment_path(support: str | os.PathLike, input_path: str | os.PathLike, output: str | os.PathLike,
                 model_run: str | os.PathLike | None = None, labels: list[str] | None = None,
                 support_size: int | None = 16, ensemble: int = 1, axis: int = 2, batch_size: int = 16,
                 modality: str | None = None, progress: bool = True, keep_largest: bool = False,
                 register: bool = True, refine: bool | None = None, flip: bool | None = None,
                 prior_weight: float | None = None, through_plane_sigma: float | None = None,
                 device: torch.device | str = "cpu", dicom_seg: bool = False, rtstruct: bool = False,
                 deform_2d: bool | None = None) -> list[Path]:
    """What ``medfound segment`` does: every image of ``input_path`` -> ``output/<case>.<ext>``, and
    for DICOM inputs ``<case>_seg.dcm`` (DICOM-SEG over the source series) with ``dicom_seg`` and
    ``<case>_rtstruct.dcm`` (RT Structure Set) with ``rtstruct``
    (``refine``, ``flip``, ``prior_weight``, ``through_plane_sigma``, ``deform_2d``: the model's setting
    when ``None``)."""
    from medfound.models.incontext_weights import load_incontext
    from medfound.progress import Progress

    if support_size is not None and not SUPPORT_SIZES[0] <= support_size <= SUPPORT_SIZES[1]:
        raise InputError(None, f"--support-size must be between {SUPPORT_SIZES[0]} and {SUPPORT_SIZES[1]}, got {support_size}")
    if ensemble < 1:
        raise InputError(None, f"--ensemble must be at least 1, got {ensemble}")
    if batch_size < 1:
        raise InputError(None, f"--batch-size must be at least 1, got {batch_size}")
    if modality is not None and not is_known_modality(modality):
        raise InputError(None, f"unknown modality {modality!r} (use ct, mr, pet, nm, xray, us)")
    model, cfg = load_incontext(model_run)
    model = model.to(device)
    size = int(cfg["model"]["size"])
    settings = inference_settings(cfg, refine=refine, flip=flip, prior_weight=prior_weight,
                                  through_plane_sigma=through_plane_sigma, deform_2d=deform_2d)
    ds = NnUNetDataset.open(support)
    output = check_output_dir(output, [input_path, support, model_run])
    chosen = resolve_labels(ds, labels)
    pools = support_pools(support, chosen, size, axis)
    items = inputs_of(input_path)
    images = [(case, read_image(path)) for case, path in items]  # read all first: bad input fails before any work
    formats = ResultFormats(dicom_seg, rtstruct,
                            f"medfound segment ({Path(model_run).name if model_run else 'shipped in-context model'})")
    for _, image in images:
        formats.check(image)
    examples = ds.case_modality(ds.cases()[0]) if ds.cases() else "OT"
    written = []
    passes = len(chosen) * (2 if settings.get("refine") else 1)
    with Progress("segment", len(images) * passes, enabled=progress) as bar, staged_dir(output) as stage:
        for n, (case, image) in enumerate(images, start=1):
            mod = modality or (image.modality if image.modality != "OT" else examples)
            if modality is None and image.modality not in ("OT", examples):
                warn(f"{case}: the image says {image.modality}, the example set {examples}; "
                     f"normalised as {image.modality} (--modality to override)")
            report: dict = {}
            mask = segment_image(model, image, pools, size, axis, support_size, ensemble, batch_size, mod,
                                 keep_largest=keep_largest, register=register, **settings,
                                 progress=lambda u, n=n: bar.advance(u, f"image {n}/{len(images)}"), report=report)
            written += formats.write(mask, image, stage, case, chosen)
            summarise_mask(case, mask, image, chosen, report)
        written.append(write_label_names(stage, chosen))
    return final_paths(written, stage, output)


def summarise_mask(case: str, mask: np.ndarray, image: MedImage, names: dict[int, str], report: dict) -> None:
    """The image's summary line: modality assumed, support slices per label, registration, ml per label."""
    slices = sorted(set(report.get("support_slices", {}).values()))
    summarise(case, mask, image, names, f"modality {report.get('modality')}, {'/'.join(map(str, slices)) or '?'} "
              f"support slices per label, registered: {report.get('registered', 'no')}",
              "not in this image's field of view, or examples that do not match it")

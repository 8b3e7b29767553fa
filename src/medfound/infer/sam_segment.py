"""Prompted segmentation with SAM on 2D images and volumes, with image embeddings cached per slice.

A session keeps each slice's embedding, so a new box or click on a slice already seen costs only
the prompt encoder and mask decoder. Prompts are given in the slice's own pixels (x = i, y = j of
the array, as ``medfound data inspect`` reports shapes) and mapped into the square SAM input.
A model trained on zoomed views (the conv SAM shipped with medfound, ``box_zoom`` in its config)
sees a box prompt in a square crop ``box_zoom`` times the box's size, cut from the full-resolution
slice: small structures get the whole input, and the mask comes back at the slice's resolution.
An encoder that runs at any input size (LiteMedSAM's TinyViT) may take that crop at a smaller side
(``box_size`` in its config): a crop around one structure needs fewer pixels than the whole slice.
On a volume, a box on one slice can be propagated: each neighbour is prompted with the box of the
mask found on the slice before it, until the structure ends. With ``flip`` every answer is the mean
of the model's logits on the slice and on its mirror image (the prompts mirrored with it), the
test-time mirroring nnU-Net applies, at twice the cost.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import torch

from medfound.data.box_crop import box_window
from medfound.data.normalize import apply_bounds, intensity_bounds
from medfound.data.slicing import SquareGeometry, from_square, square_coords, to_square
from medfound.device import inference_precision
from medfound.errors import InputError
from medfound.io import MedImage
from medfound.models.sam import decode, sam_view, to_sam_input


def check_prompts(shape: tuple[int, ...], box=None, points=None, labels=None):
    """Validated (box, points, labels) for a slice of ``shape``, in its array indices: a box is four
    finite numbers x0 <= x1, y0 <= y1 that overlap the slice (clipped to it); a point is two finite
    numbers inside the slice with label 1 (inside) or 0 (outside). Anything else is an InputError,
    raised before any mask changes (an empty answer would erase a drawn label)."""
    if box is None and not points:
        raise InputError(None, "give a box and/or at least one point")
    n0, n1 = shape[0], shape[1]
    if box is not None:
        b = np.asarray(box, np.float64).ravel()
        if b.size != 4 or not np.isfinite(b).all():
            raise InputError(None, f"a box is four finite numbers x0,y0,x1,y1; got {list(np.asarray(box).ravel())}")
        if b[2] < b[0] or b[3] < b[1]:
            raise InputError(None, f"box {b.tolist()} is inverted (needs x0 <= x1 and y0 <= y1)")
        if b[2] < 0 or b[3] < 0 or b[0] > n0 - 1 or b[1] > n1 - 1:
            raise InputError(None, f"box {b.tolist()} lies outside the slice (x 0..{n0 - 1}, y 0..{n1 - 1})")
        box = [max(b[0], 0.0), max(b[1], 0.0), min(b[2], n0 - 1.0), min(b[3], n1 - 1.0)]
    if points:
        p = np.asarray(points, np.float64)
        if p.ndim != 2 or p.shape[1] != 2 or not np.isfinite(p).all():
            raise InputError(None, "a point is two finite numbers x,y (and a label 1 inside / 0 outside)")
        if (p < -0.5).any() or (p[:, 0] > n0 - 0.5).any() or (p[:, 1] > n1 - 0.5).any():
            raise InputError(None, f"point(s) outside the slice (x 0..{n0 - 1}, y 0..{n1 - 1}): {p.tolist()}")
        labels = [1] * len(p) if labels is None else list(labels)
        if len(labels) != len(p) or any(lab not in (0, 1) for lab in labels):
            raise InputError(None, f"point labels must be 1 (inside) or 0 (outside), one per point; got {labels}")
        points = p.tolist()
    return box, (points or None), (labels if points else None)


class SamSession:
    """One image (2D, or a volume sliced along ``axis``) and a SAM, with an embedding cache."""

    def __init__(self, sam, image: MedImage, image_size: int, axis: int = 2, cache_size: int = 64,
                 modality: str | None = None, box_zoom: float | None = None, precision: str = "32",
                 box_size: int | None = None, flip: bool = False, bounds: tuple[float, float] | None = None):
        self.sam, self.image, self.size, self.axis = sam, image, image_size, axis
        self.flip = flip
        self._mirror: SamSession | None = None  # the mirrored image's session (``flip``)
        self.box_zoom = box_zoom
        self.box_size = box_size or image_size  # the input side of a box's zoomed crop
        # the intensity window (given by a session on the same voxels, e.g. mirrored, to skip the percentiles)
        self.bounds = bounds if bounds is not None else intensity_bounds(image.array, modality or image.modality)
        self._cache: OrderedDict[int, tuple[torch.Tensor, SquareGeometry]] = OrderedDict()
        self.cache_size = cache_size
        self._crop: tuple[tuple, torch.Tensor, SquareGeometry] | None = None  # the last box crop's embedding
        self.encoder_calls = 0
        self.device = next(sam.parameters()).device
        self.precision = inference_precision(precision, self.device)

    @classmethod
    def for_model(cls, sam, config: dict, image: MedImage, axis: int = 2, precision: str | None = None,
                  flip: bool | None = None) -> SamSession:
        """A session with the input size and inference settings a loaded model's config gives
        (``precision`` and ``flip``, when given, override the model's own)."""
        settings = config.get("inference", {})
        return cls(sam, image, config["image_size"], axis=axis, box_zoom=settings.get("box_zoom"),
                   precision=precision or settings.get("precision", "32"), box_size=settings.get("box_size"),
                   flip=bool(settings.get("flip", False)) if flip is None else flip)

    def _autocast(self):
        """bf16 autocast around the networks when the session runs in bf16 (masks come back in fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @property
    def n_slices(self) -> int:
        return 1 if self.image.ndim == 2 else self.image.shape[self.axis]

    def slice_array(self, k: int) -> np.ndarray:
        if self.image.ndim == 2:
            return self.image.array
        self.slice_shape(k)  # the range check
        return np.take(self.image.array, k, axis=self.axis)

    def slice_shape(self, k: int) -> tuple[int, int]:
        """Shape of slice ``k`` (range-checked as :meth:`slice_array`, without copying the slice)."""
        if self.image.ndim == 2:
            return self.image.shape
        if not 0 <= k < self.n_slices:
            raise InputError(self.image.source, f"slice {k} out of range 0..{self.n_slices - 1}")
        return tuple(n for d, n in enumerate(self.image.shape) if d != self.axis)

    def spacing(self) -> tuple[float, float]:
        return tuple(s for d, s in enumerate(self.image.spacing) if d != self.axis)[:2] if self.image.ndim == 3 \
            else tuple(self.image.spacing)

    @torch.no_grad()
    def embedding(self, k: int) -> tuple[torch.Tensor, SquareGeometry]:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        sq, geom = to_square(apply_bounds(self.slice_array(k), self.bounds), self.spacing(), self.size)
        x = torch.from_numpy(sq)[None, None].to(self.device)
        with self._autocast():
            emb = self.sam.image_encoder(to_sam_input(sam_view(x)))
        self.encoder_calls += 1
        self._cache[k] = (emb, geom)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb, geom

    def segment(self, k: int = 0, box=None, points=None, labels=None) -> np.ndarray:
        """Binary mask (the slice's shape) for a box (x0, y0, x1, y1) and/or points with labels."""
        return self.logits(k, box, points, labels) > 0

    @torch.no_grad()
    def logits(self, k: int = 0, box=None, points=None, labels=None) -> np.ndarray:
        """Mask logits on the slice's pixels (what :meth:`segment` thresholds at 0)."""
        box, points, labels = check_prompts(self.slice_shape(k), box, points, labels)
        out = self._logits(k, box, points, labels)
        if self.flip:  # x -> w - 1 - x: the slice's first axis reversed, its prompts with it
            w = self.slice_shape(k)[0] - 1
            mbox = None if box is None else (w - box[2], box[1], w - box[0], box[3])
            mpoints = None if points is None else [(w - x, y) for x, y in points]
            out = 0.5 * (out + self.mirrored._logits(k, mbox, mpoints, labels)[::-1])
        return out

    @property
    def mirrored(self) -> SamSession:
        """A session on the image mirrored along its slices' first axis (a view, no copy)."""
        if self._mirror is None:
            along = 0 if self.image.ndim == 2 else [d for d in range(3) if d != self.axis][0]
            image = dataclasses.replace(self.image, array=np.flip(self.image.array, along))
            self._mirror = SamSession(self.sam, image, self.size, axis=self.axis, cache_size=self.cache_size,
                                      box_zoom=self.box_zoom, precision=self.precision, box_size=self.box_size,
                                      bounds=self.bounds)
        return self._mirror

    def _logits(self, k: int, box, points, labels) -> np.ndarray:
        """:meth:`logits` of one view, for checked prompts."""
        if box is not None and self.box_zoom:
            return self._logits_zoomed(k, box, points, labels)
        emb, geom = self.embedding(k)
        return self._decode(emb, geom, box, points, labels)

    def _decode(self, emb: torch.Tensor, geom: SquareGeometry, box, points, labels, size: int | None = None) -> np.ndarray:
        boxes = None
        if box is not None:
            corners = square_coords(np.array(box, np.float32).reshape(2, 2), geom).reshape(1, 4)
            boxes = torch.from_numpy(corners).to(self.device)
        pts = None
        if points:
            xy = torch.from_numpy(square_coords(np.array(points, np.float32).reshape(-1, 2), geom))[None].to(self.device)
            lab = torch.tensor([list(labels if labels is not None else [1] * len(points))], dtype=torch.long,
                               device=self.device)
            pts = (xy, lab)
        with self._autocast():
            logits = sam_view(decode(self.sam, emb, boxes, pts, size or self.size))[0, 0].float()
        return from_square(logits, geom)

    def _logits_zoomed(self, k: int, box, points, labels) -> np.ndarray:
        """The box's neighbourhood (``box_zoom`` x its larger physical side, at least a quarter of the
        slice's extent) as the model's input; prompts shifted into the crop, the mask pasted back."""
        shape, sp = self.slice_shape(k), self.spacing()
        win = box_window(box, shape, sp, self.box_zoom)
        out = np.full(shape, -20.0, np.float32)  # outside the crop: certainly not the structure
        where = win.overlap(shape)
        if where is None:
            return out
        key = (k, tuple(int(v) for v in win.start), win.shape)
        if self._crop is not None and self._crop[0] == key:  # the same box, corrected by clicks
            emb, geom = self._crop[1:]
        else:  # the slice is read only for a new crop
            sq, geom = to_square(win.cut(apply_bounds(self.slice_array(k), self.bounds)), sp, self.box_size)
            with self._autocast():
                emb = self.sam.image_encoder(to_sam_input(sam_view(torch.from_numpy(sq)[None, None].to(self.device))))
            self.encoder_calls += 1
            self._crop = (key, emb, geom)
        pts = list(win.to_crop(points)) if points else None
        m = self._decode(emb, geom, win.to_crop(box), pts, labels, self.box_size)
        out[where[0]] = m[where[1]]
        return out

    def propagate(self, k: int, box, max_slices: int | None = None, progress=None) -> np.ndarray:
        """3D mask: ``box`` on slice ``k``, then each neighbour prompted with the previous mask's box;
        ``progress(note)`` is called after each slice."""
        if self.image.ndim != 3:
            raise InputError(self.image.source, "propagation needs a 3D volume")
        out = np.zeros(self.image.shape, dtype=bool)
        first = self.segment(k, box=box)
        self._put(out, k, first)
        for step in (1, -1):
            prev, j = first, k + step
            while prev.any() and 0 <= j < self.n_slices and (max_slices is None or abs(j - k) <= max_slices):
                xs, ys = np.nonzero(prev)
                m = self.segment(j, box=(xs.min(), ys.min(), xs.max(), ys.max()))
                if m.sum() < 0.2 * prev.sum():  # the structure has ended (or SAM lost it)
                    break
                self._put(out, j, m)
                if progress is not None:
                    progress(f"slice {j}")
                prev, j = m, j + step
        return out

    def _put(self, vol: np.ndarray, k: int, mask: np.ndarray) -> None:
        idx = [slice(None)] * 3
        idx[self.axis] = k
        vol[tuple(idx)] = mask

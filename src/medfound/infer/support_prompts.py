"""An example set given as prompts instead of masks (``medfound segment --support-prompts``).

The user has support images but no masks: a JSON file gives, per image, label and slice, a box
and/or points, in the image's own voxel indices (as ``sam segment`` and the viewer take them)::

    {"CASE": {"LABEL": [{"slice": 40, "box": [x0, y0, x1, y1]},
                        {"slice": 52, "points": [[x, y, 1], [x, y, 0]]}]}}

``CASE`` is the image's case name (its file name without extension and ``_0000``), ``slice`` the
index along ``axis`` of the stored array (default 2; leave it out for a 2D image), ``points`` are
``x, y, label`` with 1 inside and 0 outside. A SAM turns each prompt into that slice's mask; the
prompted slices, and only they, become the label's support slices. In-context segmentation then
runs as with a mask-defined example set.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medfound.errors import InputError
from medfound.io import read_image
from medfound.io.json_file import read_json
from medfound.io.read import inputs_of


def read_prompts(path: str | os.PathLike, cases: set[str]) -> dict[str, dict[str, list[dict]]]:
    """The prompts file, checked: every case one of ``cases``, every entry a box and/or points."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise InputError(path, 'expected {"CASE": {"LABEL": [{"slice": K, "box": [x0, y0, x1, y1]}, ...]}}')
    for case, labels in data.items():
        if case not in cases:
            raise InputError(path, f"case {case!r} is not among the support images ({', '.join(sorted(cases)[:8])})")
        if not isinstance(labels, dict) or not labels:
            raise InputError(path, f"{case}: expected a mapping of label name to a list of prompts")
        for label, entries in labels.items():
            if not isinstance(entries, list) or not entries:
                raise InputError(path, f"{case}/{label}: expected a non-empty list of prompts")
            for e in entries:
                if not isinstance(e, dict) or not ("box" in e or "points" in e):
                    raise InputError(path, f"{case}/{label}: each prompt needs a box and/or points, got {e!r}")
                if "box" in e and (not isinstance(e["box"], list) or len(e["box"]) != 4):
                    raise InputError(path, f"{case}/{label}: a box is [x0, y0, x1, y1], got {e['box']!r}")
                if "points" in e and (not isinstance(e["points"], list)
                                      or any(not isinstance(p, list) or len(p) != 3 for p in e["points"])):
                    raise InputError(path, f"{case}/{label}: points are [[x, y, 1 or 0], ...], got {e['points']!r}")
    return data


@contextlib.contextmanager
def prompted_support_set(images: str | os.PathLike, prompts: str | os.PathLike, sam_model: str | None = None,
                         device: str = "cpu") -> Iterator[Path]:
    """A temporary nnU-Net example set whose masks a SAM drew from ``prompts`` on ``images``
    (a folder with ``imagesTr/``, or a folder of images); removed on exit."""
    from medfound.data.nnunet import write_dataset
    from medfound.infer.sam_segment import SamSession
    from medfound.infer.summary import warn
    from medfound.models.sam import load_sam_model

    images = Path(images)
    folder = images / "imagesTr" if (images / "imagesTr").is_dir() else images
    items = dict(inputs_of(folder))
    spec = read_prompts(prompts, set(items))
    names = list(dict.fromkeys(label for labels in spec.values() for label in labels))
    values = {name: v for v, name in enumerate(names, start=1)}
    sam, cfg = load_sam_model(sam_model)
    sam = sam.to(device)
    cases, channel = [], None
    for case, labels in spec.items():
        image = read_image(items[case])
        channel = channel or image.modality
        sessions: dict[int, SamSession] = {}  # one per slice axis (each caches its slices' embeddings)
        label_map = np.zeros(image.shape, np.uint16)
        for name, entries in labels.items():
            for e in entries:
                axis = int(e.get("axis", 2))
                k = e.get("slice")
                if image.ndim == 3 and (k is None or axis not in (0, 1, 2)):
                    raise InputError(prompts, f"{case}/{name}: {case} is a volume; each prompt needs its \"slice\" "
                                              "(and an \"axis\" of 0, 1 or 2 if not 2)")
                session = sessions.setdefault(axis, SamSession.for_model(sam, cfg, image, axis=axis))
                pts = e.get("points") or []
                mask = session.segment(int(k or 0), box=e.get("box"), points=[p[:2] for p in pts] or None,
                                       labels=[int(p[2]) for p in pts] or None)
                if image.ndim == 2:
                    label_map[mask] = values[name]
                else:
                    view = np.moveaxis(label_map, axis, 0)[int(k)]  # the slice, as a view into the label map
                    view[mask] = values[name]
                if not mask.any():
                    warn(f"{case}/{name}: the prompt on slice {k} gave an empty mask; that slice is no support")
        cases.append((case, image, label_map))
    with tempfile.TemporaryDirectory(prefix="medfound-prompted-support-") as tmp:
        root = Path(tmp) / "Dataset999_PromptedSupport"
        write_dataset(root, cases, {"background": 0, **values}, {"0": channel or "OT"},
                      description=f"masks drawn by a SAM from {Path(prompts).name}")
        yield root

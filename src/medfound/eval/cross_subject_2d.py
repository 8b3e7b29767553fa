"""``medfound experiment cross-subject-2d``: example slices of one brain, queries from another, all 2D.

What a user with PNG slices, X-ray, ultrasound or one slice per case has: no volume, no geometry, no
registration. The example set is the axial slices of one brain written as PNG files (each scaled to
0..255 on its own, as exports are); every query is an axial slice of another brain written as a PNG
or a single-slice NIfTI with an identity affine, cropped, padded and rescaled at random (another
field of view and scale), so neither position nor size carries over from the examples. Scored by 2D
Dice on each query's own pixels, against label fusion (the most similar example's mask copied) and
the mean of the example masks. ``incontext-registered`` and ``registered-label-fusion`` first register
every example onto the query (2D affine, :func:`~medfound.infer.incontext.register_2d`);
``incontext-deformable`` and ``deformable-label-fusion`` refine that affine by a smooth deformation. Each seed
draws other examples (seed 0: spread evenly) and other crops.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfound.data.nnunet import NnUNetDataset, write_dataset
from medfound.data.orientation import to_canonical
from medfound.data.slicing import from_square
from medfound.errors import InputError
from medfound.eval.metrics import summarise
from medfound.eval.support_size import match_structures
from medfound.infer.incontext import (
    SupportEncodings,
    combine,
    inference_settings,
    prepare_slices,
    register_2d,
    segment_prepared,
    support_pools,
)
from medfound.infer.label_fusion import label_fusion
from medfound.io import MedImage, read_image, write_image
from medfound.io.atomic import write_csv, write_text

METHODS = ("incontext", "label-fusion", "mean-mask", "incontext-registered", "registered-label-fusion",
           "incontext-deformable", "deformable-label-fusion")
#: how each method places the examples on the query: as they are, by a 2D affine, or an affine and a deformation
PLACEMENT = {"incontext-registered": "affine", "registered-label-fusion": "affine",
             "incontext-deformable": "deformable", "deformable-label-fusion": "deformable"}


def to_png_values(sl: np.ndarray) -> np.ndarray:
    """A slice as an exported PNG holds it: 0..255, scaled between its own 0.5th and 99.5th percentile."""
    lo, hi = np.percentile(sl, [0.5, 99.5])
    return np.clip((sl - lo) / max(hi - lo, 1e-6) * 255, 0, 255).round().astype(np.uint8)


def new_view(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, min_scale: float = 0.7,
             max_scale: float = 1.3) -> tuple[np.ndarray, np.ndarray]:
    """The slice and its mask rescaled by a random factor, cropped to a random window that keeps the
    mask whole, and padded by a random margin on each side: another field of view and scale."""
    s = float(rng.uniform(min_scale, max_scale))
    shape = tuple(max(8, round(n * s)) for n in image.shape)
    img = F.interpolate(torch.from_numpy(image.astype(np.float32))[None, None], size=shape, mode="bilinear",
                        align_corners=False, antialias=s < 1)[0, 0].numpy()
    msk = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=shape, mode="nearest-exact")[0, 0].numpy() > 0.5
    idx = np.argwhere(msk)
    lo, hi = (idx.min(0), idx.max(0) + 1) if len(idx) else (np.zeros(2, int), np.array(shape))
    start, stop = [], []
    for d in range(2):
        keep = hi[d] - lo[d]
        width = int(rng.uniform(max(keep + 8, 0.55 * shape[d]), shape[d] + 1))
        width = min(width, shape[d])
        first = int(rng.integers(max(0, hi[d] - width), min(lo[d], shape[d] - width) + 1))
        start.append(first)
        stop.append(first + width)
    img, msk = img[start[0]:stop[0], start[1]:stop[1]], msk[start[0]:stop[0], start[1]:stop[1]]
    pad = [(int(rng.integers(0, 25)), int(rng.integers(0, 25))) for _ in range(2)]
    return np.pad(img, pad), np.pad(msk, pad)


def write_example_slices(ds: NnUNetDataset, values: list[int], out: Path) -> NnUNetDataset:
    """Every axial slice of the dataset's first volume that holds one of ``values``, as a 2D PNG
    nnU-Net dataset (images 0..255, label maps as PNG)."""
    case = ds.cases()[0]
    image, label = ds.read_case(case)
    view, lab = to_canonical(image)[0], to_canonical(label)[0].array
    cases = []
    for k in range(view.shape[2]):
        sl = lab[:, :, k]
        keep = np.where(np.isin(sl, values), sl, 0)
        if keep.any():
            png = MedImage(to_png_values(view.array[:, :, k].astype(np.float32)), modality="OT", format="png")
            cases.append((f"{case}_z{k:03d}", png, keep.astype(np.uint8 if keep.max() < 256 else np.uint16)))
    names = {n: v for n, v in ds.labels.items() if v == 0 or v in values}
    return write_dataset(out, cases, names, {"0": "MR"}, file_ending=".png")


def dice2d(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def cross_subject_2d_experiment(support: str | os.PathLike, test: str | os.PathLike, out: str | os.PathLike,
                                sizes: list[int] = (1, 2, 4, 8, 16, 32), seeds: int = 3, queries: int = 6,
                                names: list[str] | None = None, methods: tuple[str, ...] = METHODS,
                                model_run: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """Run the protocol; write ``results.csv`` (one row per structure, size, seed, query and method),
    ``summary.csv``, ``summary.json`` and ``cross_subject_2d.png``; the example set and the queries as
    written stay in ``out/examples`` and ``out/queries``."""
    from medfound.eval.support_size import plot_support_size
    from medfound.models.incontext_weights import load_incontext
    from medfound.progress import Progress

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(None, f"unknown method {unknown[0] if unknown else ''!r} (use {', '.join(METHODS)})")
    if not sizes or min(sizes) < 1 or seeds < 1 or queries < 1:
        raise InputError(None, "--sizes, --seeds and --queries must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sds, tds = NnUNetDataset.open(support), NnUNetDataset.open(test)
    matched = match_structures(sds, tds, names)
    model, cfg = load_incontext(model_run)
    model.eval()
    size = int(cfg["model"]["size"])
    settings = inference_settings(cfg)
    examples = write_example_slices(sds, [sv for sv, _, _, _ in matched], out / "examples")
    pools = support_pools(examples.root, {sv: sn for sv, sn, _, _ in matched}, size)
    case = tds.cases()[0]
    timage, tlabel = tds.read_case(case)
    tview, tlab = to_canonical(timage)[0], to_canonical(tlabel)[0].array
    qdir = out / "queries"
    rows = []
    with Progress("cross-subject-2d", len(matched) * len(sizes) * seeds, enabled=progress) as bar:
        for sv, sname, tv, tname in matched:
            z = np.flatnonzero((tlab == tv).any((0, 1)))
            if not len(z) or sv not in pools:
                continue
            heights = np.unique(np.linspace(z[0], z[-1], queries + 2)[1:-1].round().astype(int))
            pool = pools[sv]
            for seed in range(seeds):
                rng = np.random.default_rng([seed, tv])
                views = []
                for i, k in enumerate(heights):  # the queries of this structure and seed, written as a user has them
                    img, truth = new_view(tview.array[:, :, k].astype(np.float32), tlab[:, :, k] == tv, rng)
                    if i % 2:
                        path = write_image(MedImage(img.astype(np.float32), np.eye(4), "OT", format="nifti"),
                                           qdir / f"{tname}_s{seed}_z{k:03d}.nii.gz")
                    else:
                        path = write_image(MedImage(to_png_values(img), modality="OT", format="png"),
                                           qdir / f"{tname}_s{seed}_z{k:03d}.png")
                    views.append((k, prepare_slices(read_image(path), size, modality="MR"), truth, {}))
                for n in sizes:
                    chosen = pool.evenly(n) if seed == 0 else pool.random(n, np.random.default_rng([seed, sv, n]))
                    enc = SupportEncodings(model, {sv: [chosen]}, torch.device("cpu"), settings["flip"])
                    for k, prep, truth, transforms in views:
                        registered: dict = {}  # the examples placed on this query, by the first method that needs them
                        for method in methods:
                            t0 = time.perf_counter()
                            how = PLACEMENT.get(method)
                            if how is not None and how not in registered:
                                registered[how] = register_2d(chosen, prep, cache=transforms, deform=how == "deformable")
                            placed = registered[how] if how is not None else chosen
                            if method.startswith("incontext"):  # as segment_image; unregistered examples encoded once for all queries
                                here = enc if method == "incontext" else SupportEncodings(model, {sv: [placed]}, torch.device("cpu"),
                                                                                          settings["flip"])
                                probs = segment_prepared(model, prep, here, extent_margin=settings["extent_margin"],
                                                         refine=settings["refine"])
                                pred = combine(probs) == sv
                            else:
                                sq = (label_fusion(prep.squares, placed.images, placed.masks)[0] if "label-fusion" in method
                                      else placed.masks.mean(0))
                                pred = from_square(sq, prep.geoms[0]) > 0.5
                            rows.append({"support": sds.root.name, "test": tds.root.name, "structure": tname,
                                         "size": n, "seed": seed, "slice": int(k), "method": method,
                                         "dice": dice2d(np.asarray(pred, bool), truth),
                                         "seconds": time.perf_counter() - t0})
                    bar.advance(1, tname)
    by_size = []
    for m in methods:
        for n in sizes:
            sel = [r["dice"] for r in rows if r["method"] == m and r["size"] == n]
            if sel:
                s = summarise(sel)
                by_size.append({"method": m, "size": n, "runs": len(sel), "dice_mean": s["mean"], "ci_low": s["ci_low"],
                                "ci_high": s["ci_high"],
                                "seconds_mean": float(np.mean([r["seconds"] for r in rows if r["method"] == m and r["size"] == n]))})
    meta = {"support": sds.root.name, "test": tds.root.name, "structures": [t for _, _, _, t in matched],
            "sizes": list(sizes), "seeds": seeds, "queries": queries, "methods": list(methods),
            "model": str(model_run) if model_run else "shipped", "inference": settings}
    write_csv(out / "results.csv", rows)
    write_csv(out / "summary.csv", by_size)
    write_text(out / "summary.json", json.dumps(meta | {"by_size": by_size}, indent=2))
    plot_support_size(by_size, out / "cross_subject_2d.png", f"2D: {sds.root.name} examples -> {tds.root.name} queries", "2D Dice (95 % CI)")
    return meta | {"by_size": by_size}

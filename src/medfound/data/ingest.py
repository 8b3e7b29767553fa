"""``medfound data ingest``: unlabeled pools of mixed formats -> manifest + normalised slice shards.

Every image is read with its geometry, normalised by modality, reoriented to canonical RAS, cut into
2D slices along one axis, resampled by physical size to a square and streamed into shards. A file
that cannot be read is recorded with its reason and skipped: one bad file never stops a pool.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfound.data.normalize import normalize, spec_for
from medfound.data.orientation import to_canonical
from medfound.data.shards import ShardWriter
from medfound.data.slicing import iter_slices, to_square
from medfound.data.sources import ImageRef, Source, scan_sources
from medfound.errors import InputError
from medfound.io.atomic import atomic_dir, check_replaceable
from medfound.io.outputs import check_output_dir
from medfound.io.image import MedImage


@dataclass(frozen=True)
class IngestOptions:
    size: int = 224
    axis: int = 2
    stride: int = 1
    ct_window: str = "wide"
    min_std: float = 0.01  # slices flatter than this (empty background) are not kept
    shard_size: int = 5000


def read_ref(ref: ImageRef) -> MedImage:
    """Read the image an :class:`ImageRef` points to."""
    from medfound.io import read_image
    from medfound.io.dicom import read_dicom_series

    image = read_dicom_series(ref.paths) if ref.fmt == "dicom" else read_image(ref.paths[0])
    if ref.modality:
        image.modality = ref.modality
    if image.array.dtype.kind == "f" and not np.all(np.isfinite(image.array)):
        raise InputError(ref.label, "NaN or infinite voxels")
    return image


def image_slices(image: MedImage, opts: IngestOptions) -> tuple[list[tuple[int, np.ndarray]], dict]:
    """Normalised square slices of one image and its manifest entry."""
    norm = image.with_array(normalize(image.array, image.modality, opts.ct_window))
    axis = opts.axis
    if norm.ndim == 3 and not norm.meta.get("frames_are_time"):
        norm, _ = to_canonical(norm)
    elif norm.ndim == 3:
        axis = 2  # cine: frames are the slices
    kept = []
    n = 0
    for k, sl, spacing in iter_slices(norm, axis):
        n += 1
        if k % opts.stride:
            continue
        if float(sl.std()) < opts.min_std:
            continue
        sq, _ = to_square(sl, spacing, opts.size)
        kept.append((k, sq))
    entry = {"modality": image.modality, "format": image.format, "shape": list(image.shape),
             "spacing": [round(s, 6) for s in image.spacing], "orientation": image.orientation,
             "axis": axis if image.ndim == 3 else None, "slices": n, "kept_slices": len(kept)}
    return kept, entry


def _work(args: tuple[ImageRef, IngestOptions]):
    import warnings

    ref, opts = args
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        image = read_ref(ref)
        kept, entry = image_slices(image, opts)
        return ref, kept, entry, None
    except InputError as e:
        return ref, [], None, e.problem
    except Exception as e:  # a decoder bug in one file must not end a pool of millions
        return ref, [], None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def ingest(sources: list[Source], out: str | os.PathLike, opts: IngestOptions = IngestOptions(),
           workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Scan, read, normalise and shard the pools; returns the manifest (also at ``out/manifest.json``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = Path(out)
    check_output_dir(out, [s.path for s in sources])
    if out.exists() and not overwrite:
        raise InputError(out, "output folder exists (pass --overwrite to replace it)")
    if overwrite:
        check_replaceable(out)  # --overwrite replaces an earlier ingest output, never anything else
    t0 = time.time()
    scan = scan_sources(sources)
    errors = [{"path": p, "reason": r} for p, r in scan.errors]
    if not scan.images:
        detail = f"; {errors[0]['path']}: {errors[0]['reason']}" if errors else ""
        raise InputError(sources[0].path, f"no readable images found{detail}")
    images, counts = [], Counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp / "shards", maxcount=opts.shard_size)
        jobs = [(ref, opts) for ref in scan.images]
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        results = pool.map(_work, jobs) if pool else map(_work, jobs)
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task("ingest", total=len(jobs))
            for ref, kept, entry, err in results:
                bar.advance(task)
                if err is not None:
                    errors.append({"path": ref.label, "reason": err})
                    continue
                idx = len(images)
                entry = {"id": idx, "path": ref.label, **({"series_uid": ref.series_uid} if ref.series_uid else {}), **entry}
                images.append(entry)
                for k, sq in kept:
                    writer.write(f"{idx:07d}_{k:05d}", sq, {"image": idx, "slice": k, "modality": entry["modality"],
                                                            "source": ref.label})
                counts[entry["modality"]] += len(kept)
        if pool:
            pool.shutdown()
        shards = writer.close()
        if not images:
            raise InputError(sources[0].path, f"no readable images among {len(errors)} candidate file(s); "
                                              f"first: {errors[0]['path']}: {errors[0]['reason']}")
        manifest = {
            "version": 1,
            "sources": [{"path": str(s.path), "modality": s.modality} for s in sources],
            "options": {"size": opts.size, "axis": opts.axis, "stride": opts.stride, "ct_window": opts.ct_window,
                        "min_std": opts.min_std, "dtype": "float16", "range": [0.0, 1.0]},
            "normalisation": {m: spec_for(m, opts.ct_window).as_dict() for m in sorted(counts)},
            "num_images": len(images),
            "num_slices": int(sum(counts.values())),
            "slices_per_modality": dict(sorted(counts.items())),
            "images": images,
            "errors": errors,
            "ignored_files": len(scan.ignored),
            "shards": shards,
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    # Reported once the run has kept good images (an all-bad run is one error line instead).
    for e in errors:
        print(f"medfound: skipped {e['path']}: {e['reason']}", file=sys.stderr)
    return manifest

"""Volume inference throughput and memory: a 512x512x200 CT through a ViT-Tiny segmenter.

    python -m medfound.bench.predict [--slices 200] [--batch-size 16] [--image-size 224]

prints one JSON line: seconds, slices/s and peak resident memory for the full volume, and the same
for a volume a quarter as long, measured in fresh processes — memory that stays flat while the
slice count quadruples is the point (the input volume and the output mask are the only parts that
grow). Weights are random: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def _run(slices: int, batch: int, size: int, bf16: bool, q) -> None:
    import numpy as np
    import torch

    from medfound.infer.predict import predict_image
    from medfound.io import MedImage
    from medfound.io.image import affine_from_geometry
    from medfound.models.segmenter import build_segmenter
    from medfound.models.vit import VIT_CONFIGS

    torch.manual_seed(0)
    model = build_segmenter({"type": "vit", **VIT_CONFIGS["vit-tiny"].as_dict()}, 4).eval()
    cfg = {"n_classes": 4, "classes": {str(c): {"label": c, "name": str(c)} for c in range(1, 4)},
           "image_size": size, "axis": 2, "modality": "CT"}
    vol = np.random.default_rng(0).integers(-1000, 1500, size=(512, 512, slices), dtype=np.int16)
    image = MedImage(array=vol, affine=affine_from_geometry((0.7, 0.7, 1.5), (0, 0, 0), np.eye(3)), modality="CT")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    mask = predict_image(model, cfg, image, batch_size=batch, bf16=bf16)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put({"slices": slices, "seconds": round(sec, 2), "slices_per_s": round(slices / sec, 2),
           "peak_rss_mb": round(peak / 1024, 1), "rss_before_predict_mb": round(base / 1024, 1),
           "input_mb": round(vol.nbytes / 2**20, 1), "mask_mb": round(mask.nbytes / 2**20, 1)})


def measure(slices: int, batch: int, size: int, bf16: bool) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(slices, batch, size, bf16, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--precision", choices=("bf16", "32"), default="bf16")
    a = ap.parse_args(argv)
    bf16 = a.precision == "bf16"
    full = measure(a.slices, a.batch_size, a.image_size, bf16)
    quarter = measure(max(1, a.slices // 4), a.batch_size, a.image_size, bf16)
    grow = (full["peak_rss_mb"] - full["input_mb"] - full["mask_mb"]) - (
        quarter["peak_rss_mb"] - quarter["input_mb"] - quarter["mask_mb"])
    out = {"benchmark": "predict", "model": "vit-tiny UNETR (random weights)", "volume": [512, 512, a.slices],
           "image_size": a.image_size, "batch_size": a.batch_size, "precision": a.precision,
           "seconds": full["seconds"], "slices_per_s": full["slices_per_s"], "peak_rss_mb": full["peak_rss_mb"],
           "quarter_volume": quarter,
           "working_memory_growth_mb": round(grow, 1),
           "note": "working memory = peak RSS minus input volume and output mask; flat in slices if growth ~ 0",
           "target_seconds": 60}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

"""In-context latency: one 256x256 query slice segmented from 16 and 64 support pairs.

    python -m medfound.bench.incontext [--repeats 20] [--threads N] [--model RUN]

prints one JSON line. For each support size: ``query_ms`` — one query against support features
already encoded (how ``medfound segment`` runs a volume: supports once, then every slice), including
the resize of the 256x256 slice to the model's working size and of the mask back; ``support_encode_ms``
— the one-time cost of encoding the support set; ``cold_ms`` — both, for a single slice;
``refined_query_ms`` — a query with the refinement pass (:mod:`medfound.infer.refine`) on a
``--window``-px window after the first pass (window crop and paste-back included);
``refined_flip_query_ms`` — the same with mirrored test-time augmentation (``--flip``: every decode
twice); and the peak resident memory. Uses the packaged model unless ``--model`` is given; weights do not change speed.
"""

from __future__ import annotations

import argparse
import json
import resource

import numpy as np
import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--query-size", type=int, default=256)
    ap.add_argument("--supports", default="16,64")
    ap.add_argument("--model", default=None)
    ap.add_argument("--window", type=int, default=128, help="refinement window (px); 128 is typical for deep nuclei")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from medfound.models.incontext_weights import load_incontext

    from medfound.bench.common import machine, mean_ms
    from medfound.data.slicing import crop_windows, paste_windows

    model, cfg = load_incontext(args.model)
    s = int(cfg["model"]["size"])
    q = args.query_size
    rng = np.random.default_rng(0)
    query = torch.from_numpy(rng.random((1, 1, q, q), dtype=np.float32))
    result = {"bench": "incontext", "query_size": q, "model_size": s, "parameters": sum(p.numel() for p in model.parameters()),
              "threads": torch.get_num_threads(), "machine": machine(), "results": []}
    with torch.inference_mode():
        for n in (int(x) for x in args.supports.split(",")):
            simg = torch.from_numpy(rng.random((1, n, 1, s, s), dtype=np.float32))
            smask = torch.from_numpy((rng.random((1, n, 1, s, s)) > 0.7).astype(np.float32))
            spos = torch.from_numpy(np.linspace(0.3, 0.6, n, dtype=np.float32))[None]
            cache = model.encode_support(simg, smask, spos)
            qpos = torch.tensor([0.45])

            def one_query(views=1):
                x = F.interpolate(query, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
                p = sum(torch.sigmoid(model.decode(x.flip(-1) if v else x, cache, qpos)) for v in range(views))
                F.interpolate(p, size=(q, q), mode="bilinear", align_corners=False)

            query_ms = mean_ms(one_query, args.repeats)
            w = args.window
            wcache = model.encode_support(torch.from_numpy(rng.random((1, n, 1, w, w), dtype=np.float32)),
                                          torch.from_numpy((rng.random((1, n, 1, w, w)) > 0.7).astype(np.float32)), spos)
            native = query[0].numpy()
            centre = np.array([[q / 2, q / 2]])

            def refined_query(views=1):
                one_query(views)
                x = torch.from_numpy(crop_windows(native, (1.0, 1.0), centre, q / 2, w))[:, None]
                p = sum(torch.sigmoid(model.decode(x.flip(-1) if v else x, wcache, qpos)) for v in range(views))
                paste_windows(p[:, 0], (1.0, 1.0), (q, q), centre, q / 2)

            refined_ms = mean_ms(refined_query, args.repeats)
            flip_ms = mean_ms(lambda: refined_query(2), args.repeats)
            enc_ms = mean_ms(lambda: model.encode_support(simg, smask, spos), max(2, args.repeats // 5))
            result["results"].append({"supports": n, "query_ms": round(query_ms, 2), "refined_query_ms": round(refined_ms, 2),
                                      "refined_flip_query_ms": round(flip_ms, 2), "support_encode_ms": round(enc_ms, 1),
                                      "cold_ms": round(query_ms + enc_ms, 1),
                                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    result["target"] = "query_ms <= 50 with 16 supports on 2 cores (DESIGN.md)"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

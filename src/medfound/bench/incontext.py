"""In-context latency: one 256x256 query slice segmented from 16 and 64 support pairs.

    python -m medfound.bench.incontext [--repeats 20] [--threads N] [--model RUN]

prints one JSON line. For each support size: ``query_ms`` — one query against support features
already encoded (how ``medfound segment`` runs a volume: supports once, then every slice), including
the resize of the 256x256 slice to the model's working size and of the mask back; ``batched_query_ms``
— the same per slice when ``--batch`` slices go through at once, as ``medfound segment`` sends a
volume's slices (16 by default); ``support_encode_ms`` — the one-time cost of encoding the support
set; ``cold_ms`` — both, for a single slice; ``refined_query_ms`` — a query with the refinement pass
(:mod:`medfound.infer.refine`) on a ``--window``-px window after the first pass (window crop and
paste-back included); ``refined_flip_query_ms`` — the same with mirrored test-time augmentation
(``--flip``: every decode twice), the shipped settings; ``batched_refined_flip_query_ms`` — the
shipped settings per slice with ``--batch`` slices at once, as a volume runs; and the peak resident memory, reached with
the shipped settings' four support encodings (both passes, both mirrors) held at once. Queries run
through :class:`~medfound.infer.incontext.SupportEncodings`, the code ``medfound segment`` runs. Uses
the packaged model unless ``--model`` is given; weights do not change speed.
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
    ap.add_argument("--batch", type=int, default=16, help="query slices per call for batched_query_ms (segment's default)")
    ap.add_argument("--window", type=int, default=128, help="refinement window (px); 128 is typical for deep nuclei")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from medfound.bench.common import machine, mean_ms
    from medfound.data.slicing import crop_windows, paste_windows
    from medfound.infer.incontext import SupportEncodings, SupportPool
    from medfound.models.incontext_weights import load_incontext

    model, cfg = load_incontext(args.model)
    s, q, w = int(cfg["model"]["size"]), args.query_size, args.window
    rng = np.random.default_rng(0)
    query = torch.from_numpy(rng.random((1, 1, q, q), dtype=np.float32))
    native, centre = query[0].numpy(), np.array([[q / 2, q / 2]])
    cpu = torch.device("cpu")
    result = {"bench": "incontext", "query_size": q, "model_size": s, "parameters": sum(p.numel() for p in model.parameters()),
              "threads": torch.get_num_threads(), "machine": machine(), "results": []}

    def pool(n: int, size: int) -> SupportPool:
        return SupportPool(0, "bench", rng.random((n, size, size), dtype=np.float32),
                           (rng.random((n, size, size)) > 0.7).astype(np.float32),
                           np.linspace(0.3, 0.6, n, dtype=np.float32), ["random"] * n)

    def first_pass(enc: SupportEncodings, x: torch.Tensor) -> None:
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        p = enc.probability(0, x, torch.full((len(x),), 0.45))
        F.interpolate(p, size=(q, q), mode="bilinear", align_corners=False)

    def refined(enc: SupportEncodings, window_enc: SupportEncodings, b: int = 1) -> None:
        first_pass(enc, query.expand(b, -1, -1, -1))
        slices, centres = np.repeat(native, b, 0), np.repeat(centre, b, 0)
        x = torch.from_numpy(crop_windows(slices, (1.0, 1.0), centres, q / 2, w))[:, None]
        paste_windows(window_enc.probability(0, x, torch.full((b,), 0.45))[:, 0], (1.0, 1.0), (q, q), centres, q / 2)

    with torch.inference_mode():
        for n in (int(x) for x in args.supports.split(",")):
            supports, windows = {0: [pool(n, s)]}, {0: [pool(n, w)]}
            enc_ms = mean_ms(lambda: SupportEncodings(model, supports, cpu).encode(0), max(2, args.repeats // 5))
            plain, plain_window = SupportEncodings(model, supports, cpu), SupportEncodings(model, windows, cpu)
            plain.encode(0), plain_window.encode(0)  # encoded once, outside the timed queries
            query_ms = mean_ms(lambda: first_pass(plain, query), args.repeats)
            batch = query.expand(args.batch, -1, -1, -1)
            batched_ms = mean_ms(lambda: first_pass(plain, batch), max(2, args.repeats // 4)) / args.batch
            refined_ms = mean_ms(lambda: refined(plain, plain_window), args.repeats)
            plain = plain_window = None  # freed before the mirrored encodings
            mirrored, mirrored_window = SupportEncodings(model, supports, cpu, True), SupportEncodings(model, windows, cpu, True)
            mirrored.encode(0), mirrored_window.encode(0)
            flip_ms = mean_ms(lambda: refined(mirrored, mirrored_window), args.repeats)
            batched_flip_ms = mean_ms(lambda: refined(mirrored, mirrored_window, args.batch),
                                      max(2, args.repeats // 4)) / args.batch
            mirrored = mirrored_window = None
            result["results"].append({"supports": n, "query_ms": round(query_ms, 2), "batched_query_ms": round(batched_ms, 2),
                                      "refined_query_ms": round(refined_ms, 2), "refined_flip_query_ms": round(flip_ms, 2),
                                      "batched_refined_flip_query_ms": round(batched_flip_ms, 2),
                                      "support_encode_ms": round(enc_ms, 1), "cold_ms": round(query_ms + enc_ms, 1),
                                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    result["target"] = "query_ms <= 50 with 16 supports on 2 cores (DESIGN.md)"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""SAM latency: image-encoder ms per slice and mask-decoder ms per prompt, by input size and precision.

    python -m medfound.bench.sam [--variant vit_b] [--sizes 256,512,1024] [--repeats 2]

prints one JSON line. Weights are random (speed does not depend on them; no checkpoint downloads).
The decoder figure is what a new click on an already-embedded slice costs.
"""

from __future__ import annotations

import argparse
import json

import torch

from medfound.bench.common import machine, mean_ms
from medfound.models.sam import build_sam, decode, to_sam_input


@torch.no_grad()
def _time(fn, repeats: int) -> float:
    return mean_ms(fn, repeats)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="vit_b")
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    results = []
    for size in [int(s) for s in a.sizes.split(",")]:
        torch.manual_seed(0)
        sam = build_sam(a.variant, size).eval()
        x = to_sam_input(torch.rand(1, 1, size, size))
        box = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.7]])
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                enc_ms = _time(lambda: sam.image_encoder(x), a.repeats)
                emb = sam.image_encoder(x)
                dec_ms = _time(lambda: decode(sam, emb, box, None, size), max(5, a.repeats))
            results.append({"size": size, "precision": precision, "encoder_ms_per_slice": round(enc_ms, 1),
                            "decoder_ms_per_prompt": round(dec_ms, 2)})
    out = {"benchmark": "sam", "variant": a.variant, "results": results, "machine": machine()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

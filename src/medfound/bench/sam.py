"""SAM latency: image-encoder ms per slice and mask-decoder ms per prompt, by input size and precision.

    python -m medfound.bench.sam [--variant vit_b] [--sizes 256,512,1024] [--repeats 2]
    python -m medfound.bench.sam --variant default [--sizes 256,512]
    python -m medfound.bench.sam --variant litemedsam [--adapter RUN]

prints one JSON line. Weights are random (speed does not depend on them; no checkpoint downloads).
The decoder figure is what a new click on an already-embedded slice costs. ``default`` times the
small SAM shipped with medfound end to end through a ``SamSession`` on a CT slice of each size: a box
(zoomed crop: encoder + decoder, what the viewer's box costs) and a click on a cached slice.
``litemedsam`` times the released LiteMedSAM weights (from ``make install``; a LoRA run with
``--adapter``) at its 256 px input (and at the box crop's size when the run answers boxes on a zoomed
crop, ``inference.box_size``), fp32 and bf16: encoder, decoder, and a box answered end to end as the
run's settings say (bf16 is ``--precision bf16`` of ``sam segment``; fp32 is the default).
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


def _encoder_decoder(sam, size: int, repeats: int) -> list[dict]:
    """Encoder ms per slice and decoder ms per box prompt, in fp32 and under bf16 autocast."""
    x = to_sam_input(torch.rand(1, 1, size, size))
    box = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.7]])
    out = []
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            enc_ms = _time(lambda: sam.image_encoder(x), repeats)
            emb = sam.image_encoder(x)
            dec_ms = _time(lambda: decode(sam, emb, box, None, size), max(5, repeats))
        out.append({"size": size, "precision": precision, "encoder_ms_per_slice": round(enc_ms, 1),
                    "decoder_ms_per_prompt": round(dec_ms, 2)})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="vit_b")
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--adapter", default=None, help="a `sam finetune --base litemedsam` run (with --variant litemedsam)")
    a = ap.parse_args(argv)
    if a.variant == "default":
        return _default(a)
    if a.variant == "litemedsam":
        return _litemedsam(a)
    results = []
    for size in [int(s) for s in a.sizes.split(",")]:
        torch.manual_seed(0)
        results += _encoder_decoder(build_sam(a.variant, size).eval(), size, a.repeats)
    out = {"benchmark": "sam", "variant": a.variant, "results": results, "machine": machine()}
    print(json.dumps(out))
    return out


def _default(a) -> dict:
    from medfound.data.phantoms import make_phantom
    from medfound.infer.sam_segment import SamSession
    from medfound.models.sam import load_sam_model

    sam, cfg = load_sam_model(None)
    results = []
    for size in [int(s) for s in a.sizes.split(",")]:
        image, _ = make_phantom("CT", shape=(size, size, 4), seed=0)
        session = SamSession.for_model(sam, cfg, image)
        box = (size * 0.3, size * 0.35, size * 0.5, size * 0.6)
        box_ms = _time(lambda: session.segment(1, box=box), max(5, a.repeats))
        session.segment(1, points=[(size // 2, size // 2)], labels=[1])  # embeds the whole slice once
        click_ms = _time(lambda: session.segment(1, points=[(size // 2, size // 2)], labels=[1]), max(5, a.repeats))
        results.append({"size": size, "precision": "fp32", "box_ms": round(box_ms, 1),
                        "click_on_cached_slice_ms": round(click_ms, 1)})
    out = {"benchmark": "sam", "variant": "default (shipped conv SAM)", "model_input": cfg["image_size"],
           "results": results, "machine": machine()}
    print(json.dumps(out))
    return out


def _litemedsam(a) -> dict:
    from medfound.data.phantoms import make_phantom
    from medfound.infer.sam_segment import SamSession
    from medfound.models.sam import load_sam_model

    sam, cfg = load_sam_model(a.adapter or "litemedsam")
    settings = cfg.get("inference", {})
    results = []  # the encoder at the slice's input size, and at the box crop's when the run zooms
    for size in sorted({cfg["image_size"], settings.get("box_size", cfg["image_size"])}):
        results += _encoder_decoder(sam, size, a.repeats)
    image, _ = make_phantom("CT", shape=(256, 256, 4), seed=0)
    for precision in ("32", "bf16"):  # a box on a new slice: encoder + decoder, through a session
        box_ms = _time(lambda: SamSession.for_model(sam, cfg, image, precision=precision).segment(1, box=(70, 80, 140, 160)),
                       a.repeats)
        session = SamSession.for_model(sam, cfg, image, precision=precision)
        session.segment(1, points=[(128, 128)], labels=[1])
        click_ms = _time(lambda: session.segment(1, points=[(128, 128)], labels=[1]), max(5, a.repeats))
        results.append({"size": 256, "box_input_size": settings.get("box_size", cfg["image_size"]),
                        "precision": "fp32" if precision == "32" else precision,
                        "box_answer_ms": round(box_ms, 1), "click_on_cached_slice_ms": round(click_ms, 1)})
    out = {"benchmark": "sam", "variant": "litemedsam" + (f" + {a.adapter}" if a.adapter else ""), "inference": settings,
           "parameters": sum(p.numel() for p in sam.parameters()), "results": results, "machine": machine()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

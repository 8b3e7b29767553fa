"""Pretraining throughput: medfound's MAE vs an eager fp32 MONAI MaskedAutoEncoderViT of equal size.

    python -m medfound.bench.pretrain --model vit-tiny --image-size 224 --batch-size 16 --steps 10

prints one JSON line: images/s, GFLOP per step (forward + backward, torch.utils.flop_counter),
achieved GFLOP/s, the fp32 and bf16 matmul peaks measured in the same run, the same figures for the
MONAI reference (encoder 12 x 192 wide, 3 heads; decoder 4 x 192; one channel; AdamW step), and the
data loader alone (slices/s from shards). Both models do the same work: masking 75 %, the encoder on
visible patches, the decoder on all patches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from medfound.bench.common import count_flops, machine, matmul_peak_gflops, time_steps
from medfound.models.mae import MAE, MAEConfig
from medfound.models.vit import VIT_CONFIGS


def monai_reference(model: str, image_size: int, decoder_width: int, decoder_depth: int, decoder_heads: int):
    from monai.networks.nets import MaskedAutoEncoderViT

    c = VIT_CONFIGS[model]
    return MaskedAutoEncoderViT(in_channels=1, img_size=image_size, patch_size=c.patch_size, hidden_size=c.width,
                                mlp_dim=int(c.width * c.mlp_ratio), num_layers=c.depth, num_heads=c.heads,
                                decoder_hidden_size=decoder_width, decoder_mlp_dim=4 * decoder_width,
                                decoder_num_layers=decoder_depth, decoder_num_heads=decoder_heads,
                                spatial_dims=2, masking_ratio=0.75)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def _step_fn(model, opt, x, monai: bool, autocast: torch.dtype | None, device: str):
    p = 16

    def step():
        with torch.autocast(device.split(":")[0], dtype=autocast, enabled=autocast is not None):
            if monai:
                pred, mask = model(x)
                loss = (((pred - _patchify(x, p)) ** 2).mean(-1) * mask).sum() / mask.sum()
            else:
                loss = model(x)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(model, x, steps: int, warmup: int, monai: bool, autocast, device: str, compile: bool = False) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run = torch.compile(model) if compile else model
    sec = time_steps(_step_fn(run, opt, x, monai, autocast, device), steps, warmup, device)
    return {"s_per_step": round(sec, 4), "images_per_s": round(x.shape[0] / sec, 2)}


def loader_throughput(image_size: int, batch_size: int, workers: int, batches: int = 20) -> dict:
    """Slices/s of the pretraining stream alone (read shards, decode, augment, batch)."""
    from torch.utils.data import DataLoader

    from medfound.data.ingest import IngestOptions, ingest
    from medfound.data.phantoms import write_phantom_dataset
    from medfound.data.sources import Source
    from medfound.data.stream import PretrainStream

    with tempfile.TemporaryDirectory() as tmp:
        ds = write_phantom_dataset(Path(tmp) / "ph", ("CT", "MR", "PT"), cases_per_modality=4)
        ingest([Source(ds.root)], Path(tmp) / "sh", IngestOptions(size=image_size), progress=False)
        stream = PretrainStream([Path(tmp) / "sh"], image_size, batch_size, workers, rank=0, world=1,
                                samples_per_epoch=batch_size * batches * max(workers, 1))
        dl = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=True)
        n, t0 = 0, None
        for i, (x, _) in enumerate(dl):
            if i == 1:
                t0 = time.perf_counter()
            elif i > 1:
                n += x.shape[0]
        sec = time.perf_counter() - t0 if t0 else float("nan")
    return {"workers": workers, "slices_per_s": round(n / sec, 1) if n else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-tiny", choices=sorted(VIT_CONFIGS))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--loader-workers", type=int, default=2)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = a.device
    dec_w, dec_d, dec_h = 192, 4, 3  # the reference decoder, for every encoder size
    x = torch.rand(a.batch_size, 1, a.image_size, a.image_size, device=dev)

    peaks = {"fp32": matmul_peak_gflops(torch.float32, dev), "bf16": matmul_peak_gflops(torch.bfloat16, dev)}
    ours = MAE(MAEConfig(encoder=a.model, decoder_width=dec_w, decoder_depth=dec_d, decoder_heads=dec_h,
                         norm_pix_loss=False)).to(dev)
    ref = monai_reference(a.model, a.image_size, dec_w, dec_d, dec_h).to(dev)
    flops_ours = count_flops(lambda: ours(x)[0].backward())
    flops_ref = count_flops(lambda: _step_fn(ref, torch.optim.SGD(ref.parameters(), lr=0), x, True, None, dev)())
    ours.zero_grad(set_to_none=True)

    def figures(res: dict, flops: float) -> dict:
        g = flops / 1e9 / res["s_per_step"]
        return {**res, "gflops": round(g, 1), "fraction_of_bf16_peak": round(g / peaks["bf16"], 3),
                "fraction_of_fp32_peak": round(g / peaks["fp32"], 3)}

    variants = {
        "fp32_eager": figures(measure(ours, x, a.steps, a.warmup, False, None, dev), flops_ours),
        "bf16_eager": figures(measure(ours, x, a.steps, a.warmup, False, torch.bfloat16, dev), flops_ours),
    }
    if not a.no_compile:
        variants["bf16_compiled"] = figures(measure(ours, x, a.steps, a.warmup + 2, False, torch.bfloat16, dev,
                                                    compile=True), flops_ours)
    reference = figures(measure(ref, x, a.steps, a.warmup, True, None, dev), flops_ref)
    best_name = max(variants, key=lambda k: variants[k]["images_per_s"])
    best = variants[best_name]
    out = {
        "benchmark": "pretrain",
        "model": a.model, "image_size": a.image_size, "batch_size": a.batch_size, "steps": a.steps, "device": dev,
        "mode": best_name,
        "images_per_s": best["images_per_s"],
        "gflop_per_step": round(flops_ours / 1e9, 2),
        "gflops": best["gflops"],
        "fraction_of_bf16_peak": best["fraction_of_bf16_peak"],
        "peak_fp32_gflops": round(peaks["fp32"], 1),
        "peak_bf16_gflops": round(peaks["bf16"], 1),
        "speedup_vs_reference": round(best["images_per_s"] / reference["images_per_s"], 2),
        "variants": variants,
        "reference": {"name": "monai.MaskedAutoEncoderViT eager fp32", "gflop_per_step": round(flops_ref / 1e9, 2),
                      **reference},
        "loader": loader_throughput(a.image_size, a.batch_size, a.loader_workers),
        "machine": machine(),
        "targets": {"speedup_vs_reference": 1.6, "fraction_of_bf16_peak_cpu": 0.55, "fraction_of_bf16_peak_gpu": 0.40},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

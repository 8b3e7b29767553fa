"""The benchmarks run and print the JSON they promise (numbers are reported, never asserted)."""

import json
import subprocess
import sys


def test_pretrain_bench_prints_json():
    r = subprocess.run([sys.executable, "-m", "medfound.bench.pretrain", "--model", "vit-micro", "--image-size", "64",
                        "--batch-size", "2", "--steps", "1", "--warmup", "0", "--no-compile", "--loader-workers", "0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "gflop_per_step", "gflops", "peak_fp32_gflops", "peak_bf16_gflops",
                "fraction_of_bf16_peak", "speedup_vs_reference", "reference", "loader"):
        assert key in out
    assert out["reference"]["images_per_s"] > 0 and out["gflop_per_step"] > 0
    assert out["loader"]["slices_per_s"] > 0


def test_predict_bench_prints_json():
    r = subprocess.run([sys.executable, "-m", "medfound.bench.predict", "--slices", "8", "--batch-size", "4",
                        "--image-size", "64"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["volume"] == [512, 512, 8] and out["slices_per_s"] > 0 and out["peak_rss_mb"] > 0
    assert "quarter_volume" in out and "working_memory_growth_mb" in out


def test_sam_bench_prints_json():
    r = subprocess.run([sys.executable, "-m", "medfound.bench.sam", "--variant", "tiny", "--sizes", "64",
                        "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {r["precision"] for r in out["results"]} == {"fp32", "bf16"}
    assert all(r["encoder_ms_per_slice"] > 0 and r["decoder_ms_per_prompt"] > 0 for r in out["results"])


def test_sam_bench_default_model_prints_json():
    from medfound.bench.sam import main

    out = main(["--variant", "default", "--sizes", "96", "--repeats", "1"])
    r = out["results"][0]
    assert r["size"] == 96 and r["box_ms"] > 0 and r["click_on_cached_slice_ms"] > 0

"""`medfound pretrain` as users run it: loss falls on real data, checkpoints, resume, export, DDP."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli
from medfound.data.ingest import IngestOptions, ingest
from medfound.data.sources import Source
from medfound.models.export import load_encoder

ARGS = ["--model", "vit-micro", "--image-size", "64", "--batch-size", "8", "--num-workers", "1",
        "--decoder-depth", "1", "--decoder-width", "32"]


@pytest.fixture(scope="module")
def pool_shards(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "shards"
    ingest([Source(samples / "pool"), Source(samples / "Dataset002_Lesions"), Source(samples / "Dataset100_Phantoms")],
           out, IngestOptions(size=64, stride=2), progress=False)
    return out


def _losses(run):
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_pretrain_loss_falls_and_exports(pool_shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("pretrain", "--data", pool_shards, "--out", run, *ARGS, "--max-steps", "60",
                "--checkpoint-every", "20", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(run)
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["steps"] == 60 and cfg["image_size"] == 64 and cfg["patch_size"] == 16
    assert {"CT", "MR", "US"} <= set(cfg["data"]["images_per_modality"])
    assert abs(sum(cfg["data"]["sampling_weights"].values()) - 1) < 1e-6
    encoder, _ = load_encoder(run)
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ck["global_step"] == 60
    enc_sd = {k[len("mae.encoder."):]: v for k, v in ck["state_dict"].items() if k.startswith("mae.encoder.")}
    assert all(torch.equal(enc_sd[k].float(), v.float()) for k, v in encoder.state_dict().items())
    assert sorted(p.name for p in (run / "previews").glob("*.png"))
    # a second run into the same folder without --resume is refused
    r = run_cli("pretrain", "--data", pool_shards, "--out", run, *ARGS, "--max-steps", "5")
    assert r.returncode == 2 and "--resume" in r.stderr


def test_resume_continues_step_count_and_optimizer(pool_shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("pretrain", "--data", pool_shards, "--out", run, *ARGS, "--max-steps", "20", "--checkpoint-every", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    r = run_cli("pretrain", "--data", pool_shards, "--out", run, *ARGS, "--max-steps", "30", "--checkpoint-every", "10", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 20 and second["global_step"] == 30
    assert second["optimizer_states"][0]["state"][0]["step"] == 30  # AdamW moments carried on
    assert json.loads((run / "config.json").read_text())["training"]["steps"] == 30
    r = run_cli("pretrain", "--data", pool_shards, "--out", tmp_path / "fresh", *ARGS, "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_sigkill_loses_at_most_one_interval(pool_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "medfound", "pretrain", "--data", str(pool_shards), "--out", str(run), *ARGS,
           "--max-steps", "100000", "--checkpoint-every", "5"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "checkpoints").glob("step*.ckpt")):
        time.sleep(0.5)
    time.sleep(3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # never torn
    logged = len(_losses(run)) if (run / "logs" / "metrics.csv").exists() else ck["global_step"]
    assert ck["global_step"] >= 5 and ck["global_step"] % 5 == 0
    assert logged - ck["global_step"] <= 5  # the steps logged before the kill, less the last checkpoint's
    assert not list((run / "checkpoints").glob(".*tmp*"))
    r = run_cli("pretrain", "--data", pool_shards, "--out", run, *ARGS, "--max-steps", str(ck["global_step"] + 5),
                "--checkpoint-every", "5", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == ck["global_step"] + 5


def test_ddp_two_cpu_processes(pool_shards, tmp_path):
    run = tmp_path / "ddp"
    r = run_cli("pretrain", "--data", pool_shards, "--out", run, *ARGS, "--max-steps", "6", "--accelerator", "cpu",
                "--devices", "2", "--strategy", "ddp", "--precision", "32", "--checkpoint-every", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["global_batch"] == 16
    assert cfg["training"]["steps"] == 6


def test_pretrain_from_raw_folder_skips_label_dirs(samples, tmp_path):
    run = tmp_path / "raw"
    r = run_cli("pretrain", "--data", samples / "Dataset002_Lesions", "--out", run, *ARGS, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((run / "data" / "source00" / "manifest.json").read_text())
    assert m["num_images"] == 5 and not any("labelsTr" in i["path"] for i in m["images"])


def test_pretrain_bad_input(tmp_path):
    r = run_cli("pretrain", "--data", tmp_path / "missing", "--out", tmp_path / "r", *ARGS, "--max-steps", "2")
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("pretrain", "--data", tmp_path, "--out", tmp_path / "r", "--model", "vit-huge", "--max-steps", "2")
    assert r.returncode == 2 and "vit-huge" in r.stderr

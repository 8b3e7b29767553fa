"""Classification from an image,label CSV: linear probe and fine-tuning, then predict."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def _csv(tmp_path, n=12):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = "disc" if i % 2 else "bar"
        img = rng.normal(40, 10, (48, 48))
        if label == "disc":
            yy, xx = np.mgrid[:48, :48]
            img[(yy - 24) ** 2 + (xx - 24) ** 2 < 100] += 150
        else:
            img[20:28, 4:44] += 150
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / f"im{i}.png")
        rows.append((f"im{i}.png", label))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        w.writerows(rows)
    return tmp_path / "labels.csv"


def test_linear_probe_lora_and_full(tmp_path):
    path = _csv(tmp_path)
    for mode in ("linear", "lora", "full"):
        r = run_cli("classify", "train", "--csv", path, "--out", tmp_path / mode, "--encoder", "scratch:vit-micro",
                    "--mode", mode, "--max-steps", "30", "--batch-size", "4", "--image-size", "48")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "balanced accuracy" in r.stdout
    # LoRA: the adapters trained alone, then folded in; the run loads as a plain classifier and scores
    # its validation images as training reported
    from medfound.train.classify import classify_paths, load_classifier, stratified_split

    cfg = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert cfg["lora_rank"] == 4 and cfg["training"]["trainable_parameters"] < 20_000
    model, _ = load_classifier(tmp_path / "lora")
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with open(path) as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    _, val = stratified_split([names.index(r["label"]) for r in rows], 0.2, 0)
    got = classify_paths(tmp_path / "lora", [tmp_path / rows[i]["image"] for i in val])
    accuracy = np.mean([label == rows[i]["label"] for (_, label, _), i in zip(got, val)])
    assert accuracy == pytest.approx(cfg["validation"]["accuracy"])
    r = run_cli("classify", "predict", "--model", tmp_path / "full", "--input", tmp_path, "--out", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"bar", "disc"}


def test_classify_bad_csv(tmp_path):
    (tmp_path / "x.csv").write_text("path,y\na.png,1\n")
    r = run_cli("classify", "train", "--csv", tmp_path / "x.csv", "--out", tmp_path / "o")
    assert r.returncode == 2 and "image,label" in r.stderr


def test_classify_ddp_two_cpu_processes(tmp_path):
    """Distributed data parallel over 2 CPU processes (gloo): one run folder, written and reported once."""
    path = _csv(tmp_path)
    run = tmp_path / "ddp"
    r = run_cli("classify", "train", "--csv", path, "--out", run, "--encoder", "scratch:vit-micro", "--mode", "full",
                "--max-steps", "4", "--batch-size", "2", "--image-size", "48", "--accelerator", "cpu",
                "--devices", "2", "--strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["global_batch"] == 4
    assert r.stdout.count("balanced accuracy") == 1


def test_merged_adapters_load_into_the_plain_architecture():
    """plain_state: adapters folded in, saved under the unadapted names, give the adapted function."""
    import torch

    from medfound.models.lora import add_lora, merge_lora, plain_state
    from medfound.models.segmenter import build_encoder, encoder_for

    enc, _ = encoder_for("scratch:vit-micro", 48)
    arch = {"type": "vit", **enc.config.as_dict()}
    enc = add_lora(enc, rank=2).eval()
    for n, p in enc.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # non-zero adapters: they change the function
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        adapted = enc(x)
        plain = build_encoder(arch).eval()
        plain.load_state_dict(plain_state(merge_lora(enc)))  # strict: every name matches
        assert torch.allclose(plain(x), adapted, atol=1e-5)

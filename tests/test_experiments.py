"""The label-efficiency experiment: fixed test cases, arms x fractions x seeds, CSV, plot, OOD table."""

import csv
import json

from conftest import run_cli
from medfound.data.phantoms import write_phantom_dataset
from medfound.models.export import save_encoder
from medfound.models.vit import VIT_CONFIGS, ViTEncoder


def test_label_efficiency_experiment(tmp_path):
    ds = write_phantom_dataset(tmp_path / "Dataset700_Ph", ("CT",), cases_per_modality=6)
    ood = write_phantom_dataset(tmp_path / "Dataset701_PhMR", ("MR",), cases_per_modality=2, seed=50)
    enc = tmp_path / "enc"
    save_encoder(ViTEncoder(VIT_CONFIGS["vit-micro"]), enc, {"image_size": 48})
    r = run_cli("experiment", "label-efficiency", "--dataset", ds.root, "--encoder", enc, "--out", tmp_path / "exp",
                "--fractions", "0.5,1", "--seeds", "2", "--max-steps", "3", "--image-size", "48", "--batch-size", "4",
                "--modes", "full,lora", "--ood-dataset", ood.root)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    assert len(rows) == 2 * 2 * 3  # fractions x seeds x (pretrained-full, pretrained-lora, scratch-full)
    assert {r["arm"] for r in rows} == {"pretrained-full", "pretrained-lora", "scratch-full"}
    assert all(0 <= float(r["test_dice"]) <= 1 and r["ood_dice"] != "" for r in rows)
    meta = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert not set(meta["test_cases"]) & set(meta["train_pool"])
    for r in rows:  # no run ever trained or validated on a test case
        cfg = json.loads((tmp_path / "exp" / "runs" / f"{r['arm']}_f{float(r['fraction']):g}_s{r['seed']}" / "config.json").read_text())
        assert not set(cfg["data"]["train_cases"] + cfg["data"]["val_cases"]) & set(meta["test_cases"])
    assert (tmp_path / "exp" / "label_efficiency.png").stat().st_size > 5000
    summary = list(csv.DictReader(open(tmp_path / "exp" / "summary.csv")))
    assert len(summary) == 6 and "ood_dice_mean" in summary[0]

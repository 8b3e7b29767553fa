"""Fine-tuning (full / linear / LoRA), prediction in the input's geometry, and the case split."""

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from helpers import write_dicom_series
from medfound.data.labeled import split_cases
from medfound.data.nnunet import write_dataset
from medfound.data.phantoms import PHANTOM_LABELS, make_phantom
from medfound.errors import InputError
from medfound.io import read_image
from medfound.models.segmenter import load_segmenter
from medfound.device import native_bf16
from medfound.train.checkpoint import lightning_precision, training_precision
from medfound.train.finetune import validation_interval

FT = ["--encoder", "scratch:vit-micro", "--image-size", "48", "--max-steps", "6", "--val-every", "3",
      "--batch-size", "4", "--precision", "32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft") / "Dataset600_Phantom"
    cases = []
    for i in range(5):
        img, lab = make_phantom("CT", shape=(40, 36, 10), seed=i, oblique=i % 2 == 1)
        img.format = "nifti"
        lab = lab.copy()
        lab[lab == 3] = 5  # give the lesion a held-out name and value: it must not be trained
        cases.append((f"case{i}", img, lab))
    labels = {"background": 0, "organ": 1, "kidney": 2, "bone": 4, "Left_Thalamus": 5}
    write_dataset(root, cases, labels, {"0": "CT"})
    return root


@pytest.mark.parametrize("mode", ["full", "linear", "lora"])
def test_finetune_modes_export_and_reload(dataset, tmp_path, mode):
    run = tmp_path / mode
    r = run_cli("finetune", "--dataset", dataset, "--out", run, *FT, "--mode", mode, "--label-fraction", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["mode"] == mode and cfg["n_classes"] == 4  # organ, kidney, bone (+ background)
    assert {c["name"] for c in cfg["classes"].values()} == {"organ", "kidney", "bone"}
    assert "Left_Thalamus" in cfg["data"]["heldout_labels_excluded"]
    assert not set(cfg["data"]["train_cases"]) & set(cfg["data"]["val_cases"])
    assert len(cfg["data"]["train_cases"]) == 2  # half of the 4 non-validation cases
    t = cfg["training"]
    if mode == "lora":
        assert 0 < t["encoder_trainable_parameters"] < 0.2 * t["encoder_parameters"]
    elif mode == "linear":
        assert t["encoder_trainable_parameters"] == 0
    else:
        assert t["encoder_trainable_parameters"] == t["encoder_parameters"]
    model, _ = load_segmenter(run)
    assert model(torch.rand(1, 1, 48, 48)).shape == (1, 4, 48, 48)
    card = (run / "model_card.md").read_text()
    assert "## Metrics on 1 validation" in card and "| organ |" in card and "Intended use" in card
    assert list(run.glob("failure_*.png"))


def test_finetune_ddp_two_cpu_processes(dataset, tmp_path):
    """Distributed data parallel over 2 CPU processes (gloo): the run, its model card and the report
    come from rank 0 alone."""
    run = tmp_path / "ddp"
    r = run_cli("finetune", "--dataset", dataset, "--out", run, *FT, "--accelerator", "cpu", "--devices", "2",
                "--strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["global_batch"] == 8
    assert r.stdout.count("best validation Dice") == 1 and (run / "model_card.md").is_file()
    model, _ = load_segmenter(run)
    assert model(torch.rand(1, 1, 48, 48)).shape == (1, 4, 48, 48)


def test_predict_nifti_and_dicom_keep_geometry(dataset, tmp_path):
    run = tmp_path / "run"
    assert run_cli("finetune", "--dataset", dataset, "--out", run, *FT).returncode == 0
    # 3D NIfTI with an oblique affine
    src = dataset / "imagesTr" / "case1_0000.nii.gz"
    r = run_cli("predict", "--model", run, "--input", src, "--output", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    # the summary: modality, slices, where it ran, ml per label
    assert "medfound: case1: modality CT" in r.stderr and "slice(s) at 48 px on cpu" in r.stderr and " ml" in r.stderr
    out = tmp_path / "out" / "case1.nii.gz"
    a, b = nib.load(str(src)), nib.load(str(out))
    assert a.shape == b.shape and np.array_equal(a.affine, b.affine)
    assert set(np.unique(np.asarray(b.dataobj)).tolist()) <= {0, 1, 2, 4}  # dataset values, never held-out 5
    # DICOM series in, NIfTI + DICOM-SEG out, on the series' grid
    image = read_image(src)
    write_dicom_series(image.with_array(np.clip(image.array, -1024, 3000).astype(np.int16)), tmp_path / "dcm")
    r = run_cli("predict", "--model", run, "--input", tmp_path / "dcm", "--output", tmp_path / "out2", "--dicom-seg")
    assert r.returncode == 0, r.stderr[-2000:]
    series = read_image(tmp_path / "dcm")
    mask = read_image(tmp_path / "out2" / "dcm.nii.gz")
    assert mask.shape == series.shape and np.abs(mask.affine - series.affine).max() < 1e-5
    seg = tmp_path / "out2" / "dcm_seg.dcm"
    assert seg.is_file()
    # read back by highdicom onto the source frames (by SOP Instance UID); dciodvfy finds no error
    from medfound.io.dicomseg import read_dicom_seg

    back, _ = read_dicom_seg(seg, series)
    assert np.array_equal(back > 0, np.asarray(mask.array) > 0)
    if shutil.which("dciodvfy"):
        v = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True)
        assert "Error" not in v.stdout + v.stderr, (v.stdout + v.stderr)[-2000:]


def test_predict_2d_png(tmp_path, dataset):
    from PIL import Image

    run = tmp_path / "run"
    assert run_cli("finetune", "--dataset", dataset, "--out", run, *FT).returncode == 0
    Image.fromarray((np.random.default_rng(0).random((50, 70)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    r = run_cli("predict", "--model", run, "--input", tmp_path / "x.png", "--output", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.asarray(Image.open(tmp_path / "o" / "x.png")).shape == (50, 70)


def test_validation_interval_ends_on_the_last_step():
    # about five validations, the last one on the final step, so no trained step goes unvalidated
    for steps in (150, 300, 500, 1000):
        n = validation_interval(steps)
        assert steps % n == 0 and 5 <= steps // n <= 10
    assert validation_interval(150) == 30
    assert validation_interval(3) == 1
    assert validation_interval(7) == 1  # a prime: every step rather than skipping the end
    assert validation_interval(500, every=100) == 100
    assert validation_interval(40, every=100) == 40


def test_auto_training_precision_is_bf16_only_where_native():
    # a CPU without bf16 emulates it about ten times slower than fp32, so auto trains there in fp32
    cpu = "bf16" if native_bf16(torch.device("cpu")) else "32"
    assert training_precision("auto", "cpu") == cpu
    assert lightning_precision("auto", "cpu") == {"bf16": "bf16-mixed", "32": "32-true"}[cpu]
    assert training_precision("BF16", "cpu") == "bf16" and training_precision("32", "gpu") == "32"
    with pytest.raises(InputError, match="--precision must be auto, bf16 or 32"):
        training_precision("16")


def test_split_by_case():
    cases = [f"c{i}" for i in range(10)]
    train, val = split_cases(cases, 0.25, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 2 and not set(train) & set(val)
    assert split_cases(cases, 0.25, 0.2, seed=3) == (train, val)
    with pytest.raises(InputError):
        split_cases(["only"], 1.0, 0.2, 0)


def test_finetune_bad_input(tmp_path):
    img, lab = make_phantom("CT", shape=(20, 20, 4))
    img.format = "nifti"
    write_dataset(tmp_path / "one", [("a", img, lab)], PHANTOM_LABELS, {"0": "CT"})
    r = run_cli("finetune", "--dataset", tmp_path / "one", "--out", tmp_path / "r", *FT)
    assert r.returncode == 2 and "at least 2" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("finetune", "--dataset", tmp_path / "one", "--out", tmp_path / "r", *FT[:2], "--mode", "weird")
    assert r.returncode == 2
    r = run_cli("predict", "--model", tmp_path / "nope", "--input", tmp_path, "--output", tmp_path / "o")
    assert r.returncode == 2 and "nope" in r.stderr


def test_finetune_from_sam_image_encoder(dataset, tmp_path):
    import torch as _torch

    from medfound.models.sam import build_sam

    _torch.manual_seed(0)
    _torch.save(build_sam("tiny", 1024).state_dict(), tmp_path / "sam_tiny.pth")
    run = tmp_path / "samenc"
    r = run_cli("finetune", "--dataset", dataset, "--out", run, "--encoder", f"sam:{tmp_path / 'sam_tiny.pth'}",
                "--image-size", "64", "--max-steps", "4", "--val-every", "2", "--batch-size", "2", "--mode", "lora",
                "--precision", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["architecture"]["type"] == "sam" and cfg["encoder"]["kind"] == "sam-checkpoint"
    r = run_cli("predict", "--model", run, "--input", dataset / "imagesTr" / "case0_0000.nii.gz", "--output", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]

"""The from-scratch CNN floor (``--encoder scratch:unet``, a ResNet-18 U-Net from MONAI): it fine-tunes,
reloads from safetensors and predicts in the input's geometry like any segmenter; what makes no sense
for it (a frozen or LoRA-adapted random encoder, a classifier, a side that does not divide by 32) is
refused before anything is written; label-efficiency takes it as an arm."""

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from medfound.data.phantoms import write_phantom_dataset
from medfound.errors import InputError
from medfound.eval.experiments import arms_for
from medfound.models.cnn_unet import CNNEncoder
from medfound.models.segmenter import load_segmenter


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("cnn") / "Dataset701_Ph", ("CT",), cases_per_modality=4).root


def test_scratch_unet_finetunes_reloads_and_predicts_on_the_input_grid(phantoms, tmp_path):
    run = tmp_path / "run"
    r = run_cli("finetune", "--dataset", phantoms, "--output", run, "--encoder", "scratch:unet", "--max-steps", "3",
                "--batch-size", "2", "--image-size", "64", "--val-every", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    model, cfg = load_segmenter(run)
    assert cfg["architecture"] == {"type": "cnn", "backbone": "resnet18", "in_channels": 1}
    assert isinstance(model.encoder, CNNEncoder) and cfg["mode"] == "full"
    assert cfg["training"]["encoder_trainable_parameters"] == cfg["training"]["encoder_parameters"] > 10_000_000
    x = torch.rand(2, 1, 64, 64)
    assert model(x).shape == (2, cfg["n_classes"], 64, 64)
    src = phantoms / "imagesTr" / sorted(p.name for p in (phantoms / "imagesTr").iterdir())[0]
    r = run_cli("predict", "--model", run, "--input", src, "--output", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = nib.load(str(src)), nib.load(str(next((tmp_path / "out").glob("*.nii.gz"))))
    assert a.shape == b.shape and np.array_equal(a.affine, b.affine)


@pytest.mark.parametrize("args, why", [
    (("--mode", "lora"), "--mode full"),
    (("--mode", "linear"), "--mode full"),
    (("--image-size", "48"), "multiple of 32"),
])
def test_scratch_unet_refuses_what_it_cannot_do(phantoms, tmp_path, args, why):
    out = tmp_path / "run"
    r = run_cli("finetune", "--dataset", phantoms, "--output", out, "--encoder", "scratch:unet", "--max-steps", "1",
                "--batch-size", "2", *(("--image-size", "64") if "--image-size" not in args else ()), *args)
    assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_classify_refuses_the_cnn(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,label\na.png,x\nb.png,y\n")
    r = run_cli("classify", "train", "--csv", csv_path, "--out", tmp_path / "run", "--encoder", "scratch:unet")
    assert r.returncode == 2 and "segmentation network" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_label_efficiency_takes_the_cnn_as_an_arm():
    arms = arms_for("scratch,scratch:unet,litemedsam=linear", ["full"])
    assert [(a.name, a.encoder, a.mode) for a in arms] == [
        ("scratch-full", "scratch:vit-tiny", "full"), ("scratch-unet-full", "scratch:unet", "full"),
        ("litemedsam-linear", "litemedsam", "linear")]
    with pytest.raises(InputError, match="trains fully"):
        arms_for("scratch:unet=lora", ["full"])


def test_an_encoder_rate_other_than_the_default_names_the_full_arms():
    arms = arms_for("scratch:unet,litemedsam=linear", ["full"], encoder_lr_scale=1.0)
    assert [(a.name, a.encoder_lr_scale) for a in arms] == [("scratch-unet-full-encoder-lr-1", 1.0),
                                                            ("litemedsam-linear", None)]
    assert [a.name for a in arms_for("scratch:unet", ["full"], encoder_lr_scale=0.3)] == ["scratch-unet-full"]
    with pytest.raises(InputError, match="> 0"):
        arms_for("scratch:unet", ["full"], encoder_lr_scale=0.0)

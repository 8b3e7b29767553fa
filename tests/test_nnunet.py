"""nnU-Net v2 raw dataset folders: write, read, validate, and convert from Decathlon."""

import json

import nibabel as nib
import numpy as np
import pytest

from medfound.data.nnunet import NnUNetDataset, convert_msd, write_dataset
from medfound.data.phantoms import PHANTOM_LABELS, make_phantom
from medfound.errors import InputError
from medfound.io import write_image


def _cases(n=3):
    for i in range(n):
        img, lab = make_phantom("CT", shape=(24, 20, 8), seed=i, oblique=i == 1)
        img.format = "nifti"
        yield f"case{i:02d}", img, lab


def test_write_and_read_dataset(tmp_path):
    labels = {**PHANTOM_LABELS, "Left_Thalamus": 5}
    ds = write_dataset(tmp_path / "Dataset500_X", list(_cases()), labels, {"0": "CT"})
    info = json.loads((tmp_path / "Dataset500_X" / "dataset.json").read_text())
    assert info["numTraining"] == 3 and info["file_ending"] == ".nii.gz"
    assert info["channel_names"] == {"0": "CT"} and info["labels"]["lesion"] == 3
    assert info["medfound"]["heldout_labels"] == {"Left_Thalamus": 5}
    assert ds.cases() == ["case00", "case01", "case02"]
    assert (tmp_path / "Dataset500_X" / "imagesTr" / "case01_0000.nii.gz").is_file()
    image, label = ds.read_case("case01")
    ref = dict((c, (i, l)) for c, i, l in _cases())["case01"]
    assert np.array_equal(label.array, ref[1]) and np.allclose(image.affine, ref[0].affine, atol=1e-4)
    assert image.modality == "CT"


def test_label_grid_mismatch_is_an_input_error(tmp_path):
    ds = write_dataset(tmp_path / "D", list(_cases(1)), PHANTOM_LABELS, {"0": "CT"})
    lab = tmp_path / "D" / "labelsTr" / "case00.nii.gz"
    n = nib.load(str(lab))
    nib.save(nib.Nifti1Image(np.asarray(n.dataobj), n.affine @ np.diag([1, 1, 1.5, 1])), str(lab))
    with pytest.raises(InputError, match="geometry"):
        ds.read_case("case00")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), n.affine), str(lab))
    with pytest.raises(InputError, match="shape"):
        ds.read_case("case00")
    nib.save(nib.Nifti1Image(np.full(n.shape, 9, np.uint8), n.affine), str(lab))
    with pytest.raises(InputError, match="not declared"):
        ds.read_case("case00")


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match="no such"):
        NnUNetDataset.open(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="dataset.json"):
        NnUNetDataset.open(tmp_path / "d")
    (tmp_path / "d" / "dataset.json").write_text("{bad")
    with pytest.raises(InputError, match="invalid JSON"):
        NnUNetDataset.open(tmp_path / "d")


def test_convert_msd(tmp_path):
    msd = tmp_path / "Task09_Spleen"
    entries = []
    for case, img, lab in _cases(2):
        write_image(img, msd / "imagesTr" / f"{case}.nii.gz")
        write_image(img.with_array(lab), msd / "labelsTr" / f"{case}.nii.gz")
        entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (msd / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {str(v): k for k, v in PHANTOM_LABELS.items()},
        "training": entries, "test": []}))
    ds = convert_msd(msd, tmp_path / "Dataset009_Spleen")
    assert ds.cases() == ["case00", "case01"] and ds.labels["bone"] == 4
    assert ds.read_case("case00")[1] is not None

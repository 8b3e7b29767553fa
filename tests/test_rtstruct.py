"""RT Structure Sets: contours <-> label maps on a DICOM series, checked by dciodvfy and by round trip;
`data convert-rtstruct` and `segment --rtstruct` as a user runs them."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from conftest import run_cli
from helpers import write_dicom_series

from medfound.io import read_image
from medfound.io.rtstruct import read_rtstruct, write_rtstruct


@pytest.fixture
def ct_series(samples, tmp_path):
    image = read_image(samples / "Dataset100_Phantoms" / "imagesTr" / "phantom_ct_001_0000.nii.gz")
    label = np.asarray(read_image(samples / "Dataset100_Phantoms" / "labelsTr" / "phantom_ct_001.nii.gz").array)
    write_dicom_series(image.with_array(np.clip(image.array, -1024, 3000).astype(np.int16)), tmp_path / "ct")
    return read_image(tmp_path / "ct"), label.astype(np.uint8)


def _no_dciodvfy_errors(path):
    if shutil.which("dciodvfy"):
        v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert "Error" not in v.stdout + v.stderr, (v.stdout + v.stderr)[-2000:]


def test_rtstruct_round_trip_holes_islands_and_validator(ct_series, tmp_path):
    series, label = ct_series
    names = {1: "organ", 2: "kidney", 3: "lesion", 4: "bone"}
    path = write_rtstruct(label, series, tmp_path / "rt.dcm", labels=names)
    _no_dciodvfy_errors(path)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.FrameOfReferenceUID == pydicom.dcmread(series.meta["dicom_files"][0]).FrameOfReferenceUID
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series.meta["dicom_files"]}
    refs = {str(c.ContourImageSequence[0].ReferencedSOPInstanceUID) for r in ds.ROIContourSequence for c in r.ContourSequence}
    assert refs <= uids
    back = read_rtstruct(path, series)
    for v, n in names.items():
        if (label == v).any():
            assert np.array_equal(back[n], label == v), n
    # a ring with an island in its hole, many pieces, pixels touching only at corners
    ring = np.zeros(series.shape, np.uint8)
    ii, jj = np.mgrid[: series.shape[0], : series.shape[1]]
    r = np.hypot(ii - series.shape[0] / 2, jj - series.shape[1] / 2)
    ring[:, :, 2][(r < 14) & (r > 6)] = 1
    ring[:, :, 2][r < 3] = 1
    ring[:, :, 3][(ii % 9 < 4) & (jj % 7 < 3)] = 1
    ring[:, :, 4][ii == jj] = 1
    back = read_rtstruct(write_rtstruct(ring, series, tmp_path / "ring.dcm"), series)
    assert np.array_equal(back["label_1"], ring == 1)


def test_convert_rtstruct_and_segment_writes_rtstruct(ct_series, samples, tmp_path):
    series, label = ct_series
    rt = write_rtstruct(label, series, tmp_path / "rt.dcm", labels={1: "organ", 2: "kidney", 3: "lesion", 4: "bone"})
    r = run_cli("data", "convert-rtstruct", tmp_path / "ct", rt, "--output", tmp_path / "ds", "--roi", "kidney", "--roi", "organ")
    assert r.returncode == 0, r.stderr
    ds = tmp_path / "ds"
    out = np.asarray(read_image(ds / "labelsTr" / "ct.nii.gz").array)
    assert np.array_equal(out == 1, label == 2) and np.array_equal(out == 2, label == 1)
    assert '"kidney": 1' in (ds / "dataset.json").read_text()
    # the converted contours are an example set; results come back as RTSTRUCT too
    r = run_cli("segment", "--support", ds, "--label", "organ", "--input", tmp_path / "ct", "--output", tmp_path / "seg",
                "--rtstruct", "--support-size", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    mask = np.asarray(read_image(tmp_path / "seg" / "ct.nii.gz").array)
    rt_out = tmp_path / "seg" / "ct_rtstruct.dcm"
    _no_dciodvfy_errors(rt_out)
    assert mask.any() and np.array_equal(read_rtstruct(rt_out, series)["organ"], mask > 0)
    # bad input: exit 2, one line, nothing written
    r = run_cli("data", "convert-rtstruct", tmp_path / "ct", rt, "--output", tmp_path / "x", "--roi", "liver")
    assert r.returncode == 2 and "'liver'" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "x").exists()
    r = run_cli("data", "convert-rtstruct", tmp_path / "ct", series.meta["dicom_files"][0],
                     "--output", tmp_path / "x")
    assert r.returncode == 2 and "not an RT Structure Set" in r.stderr and not (tmp_path / "x").exists()
    other = pydicom.dcmread(rt)
    other.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = "1.2.3.4"
    other.save_as(tmp_path / "other.dcm")
    r = run_cli("data", "convert-rtstruct", tmp_path / "ct", tmp_path / "other.dcm", "--output", tmp_path / "x")
    assert r.returncode == 2 and "Frame of Reference" in r.stderr and not (tmp_path / "x").exists()


def test_completion_writes_dicom_objects_for_a_dicom_study(ct_series, tmp_path):
    series, label = ct_series
    partial = np.zeros_like(label)
    partial[:, :, 4:20:5] = (label[:, :, 4:20:5] == 1)
    from medfound.io import write_mask

    write_mask(partial, series, tmp_path / "partial.nii.gz")
    r = run_cli("segment", "--input", tmp_path / "ct", "--partial-labels", tmp_path / "partial.nii.gz",
                "--output", tmp_path / "done", "--dicom-seg", "--rtstruct")
    assert r.returncode == 0, r.stderr[-2000:]
    mask = np.asarray(read_image(tmp_path / "done" / "ct.nii.gz").array)
    assert np.array_equal(read_rtstruct(tmp_path / "done" / "ct_rtstruct.dcm", series)["label_1"], mask == 1)
    from medfound.io.dicomseg import read_dicom_seg

    back, _ = read_dicom_seg(tmp_path / "done" / "ct_seg.dcm", series)
    assert np.array_equal(back > 0, mask > 0)

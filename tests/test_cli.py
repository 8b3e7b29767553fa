"""The CLI as a user runs it: help everywhere, and every bad input -> exit 2, one line, no traceback."""

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import run_cli

COMMANDS = [[], ["data"], ["data", "inspect"], ["data", "ingest"], ["data", "samples"], ["data", "phantoms"],
            ["data", "check"], ["data", "convert-msd"], ["demo"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def _assert_input_error(r, name):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and name in lines[0] and lines[0].startswith("medfound: error:")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, pydicom_files):
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.int16), np.eye(4)), str(good))
    (d / "truncated.nii.gz").write_bytes(good.read_bytes()[:60])
    (d / "text.nii").write_text("hello")
    (d / "notes.txt").write_text("hello")
    nib.save(nib.Nifti1Image(np.array([[[np.inf, 1.0]]], np.float32), np.eye(4)), str(d / "inf.nii.gz"))
    ds = pydicom.dcmread(pydicom_files["CT_small.dcm"])
    del ds.PixelData
    ds.save_as(d / "nopixels.dcm")
    (d / "emptydir").mkdir()
    return d


@pytest.mark.parametrize("name", ["truncated.nii.gz", "text.nii", "notes.txt", "inf.nii.gz", "nopixels.dcm",
                                  "emptydir", "missing.nii.gz"])
def test_inspect_bad_input(bad_files, name):
    _assert_input_error(run_cli("data", "inspect", bad_files / name), name)


def test_inspect_real_files(pydicom_files, tmp_path):
    r = run_cli("data", "inspect", pydicom_files["CT_small.dcm"], "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["modality"] == "CT" and info["shape"] == [128, 128]
    r = run_cli("data", "inspect", pydicom_files["emri_small.dcm"])
    assert r.returncode == 0 and "orientation" in r.stdout


def test_check_label_mismatch(tmp_path):
    r = run_cli("data", "phantoms", "--out", tmp_path / "ph", "--modalities", "CT,MR", "--cases", "1")
    assert r.returncode == 0, r.stderr
    assert run_cli("data", "check", tmp_path / "ph").returncode == 0
    lab = tmp_path / "ph" / "labelsTr" / "phantom_mr_000.nii.gz"
    n = nib.load(str(lab))
    nib.save(nib.Nifti1Image(np.asarray(n.dataobj)[:-1], n.affine), str(lab))
    _assert_input_error(run_cli("data", "check", tmp_path / "ph"), "phantom_mr_000.nii.gz")
    _assert_input_error(run_cli("data", "check", tmp_path / "nothing"), "nothing")


def test_ingest_cli_bad_files_skipped_and_all_bad_fails(tmp_path, bad_files, pydicom_files):
    pool = tmp_path / "pool"
    shutil.copytree(bad_files, pool)
    shutil.copy(pydicom_files["MR_small.dcm"], pool / "mr.dcm")
    r = run_cli("data", "ingest", f"mr:{pool}", "--out", tmp_path / "out", "--size", "32")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_images"] == 2 and m["slices_per_modality"] == {"MR": m["num_slices"]}  # mr.dcm + good.nii.gz
    named = {e["path"].split("/")[-1] for e in m["errors"]}
    assert {"truncated.nii.gz", "text.nii", "inf.nii.gz", "nopixels.dcm"} <= named
    for n in ("truncated.nii.gz", "inf.nii.gz", "nopixels.dcm"):
        assert n in r.stderr
    (pool / "mr.dcm").unlink()
    (pool / "good.nii.gz").unlink()
    r = run_cli("data", "ingest", pool, "--out", tmp_path / "out2")
    _assert_input_error(r, str(pool))
    assert not (tmp_path / "out2").exists()
    _assert_input_error(run_cli("data", "ingest", bad_files / "emptydir", "--out", tmp_path / "o3"), "emptydir")
    _assert_input_error(run_cli("data", "ingest", tmp_path / "missing", "--out", tmp_path / "o4"), "missing")
    r = run_cli("data", "ingest", pool, "--out", tmp_path / "o5", "--modality", "banana")
    assert r.returncode == 2 and "banana" in r.stderr and "Traceback" not in r.stderr

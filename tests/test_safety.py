"""Nothing a user owns is lost: outputs never replace or delete inputs, appear whole or not at all, and are
checked before any work; bad arguments are exit 2 with one line. The CLI runs in-process here (the same
``main`` a user's shell runs) so each case takes about a second."""

import hashlib
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import run_cli
from medfound.data.nnunet import write_dataset
from medfound.data.phantoms import make_phantom
from medfound.io import write_image

FT = ["--encoder", "scratch:vit-micro", "--image-size", "48", "--max-steps", "2", "--val-every", "2",
      "--batch-size", "2", "--precision", "32"]


@pytest.fixture
def mf(capsys, monkeypatch):
    """Run ``medfound ARGS`` in-process: (exit code, stdout, stderr)."""
    from medfound.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["medfound", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _one_line_error(result, *names):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("medfound: skipped")]
    assert code == 2, result
    assert len(lines) == 1 and lines[0].startswith("medfound: error:") and "Traceback" not in err, err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A folder holding one small MR volume, and a 2-case example set of the same kind."""
    root = tmp_path_factory.mktemp("safety")
    image, label = make_phantom("MR", shape=(32, 30, 8), seed=7)
    image.format = "nifti"
    write_image(image, root / "scans" / "a.nii.gz")
    cases = []
    for i in range(2):
        img, lab = make_phantom("MR", shape=(32, 30, 8), seed=10 + i)
        img.format = "nifti"
        cases.append((f"case{i}", img, (lab == 1).astype(np.uint8)))
    support = write_dataset(root / "Dataset970_Support", cases, {"background": 0, "organ": 1}, {"0": "MR"}).root
    return root, root / "scans", support


@pytest.fixture(scope="module")
def run_dir(study):
    root, _, support = study
    run = root / "ftrun"
    r = run_cli("finetune", "--dataset", support, "--out", run, *FT, "--val-fraction", "0.5")
    assert r.returncode == 0, r.stderr
    return run


# 1. No output may replace or delete an input.

def test_predict_segment_sam_refuse_output_onto_input(mf, study, run_dir):
    root, scans, support = study
    before = _digest(scans)
    _one_line_error(mf("predict", "--model", run_dir, "--input", scans, "--output", scans), "input")
    _one_line_error(mf("predict", "--model", run_dir, "--input", scans, "--output", scans / "masks"), "lies inside")
    _one_line_error(mf("segment", "--support", support, "--input", scans, "--output", scans), "input")
    _one_line_error(mf("segment", "--support", support, "--input", scans, "--output", support / "x"), "lies inside")
    _one_line_error(mf("sam", "segment", "--model", "tiny", "--input", scans / "a.nii.gz", "--output", scans,
                       "--box", "2,2,20,20", "--slice", "3"), "contains")
    _one_line_error(mf("predict", "--model", run_dir, "--input", scans, "--output", run_dir), "input")
    assert _digest(scans) == before and not (scans / "masks").exists()


def test_ingest_never_deletes_what_it_did_not_write(mf, study, pydicom_files, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (pool / name).write_bytes(pydicom_files[name].read_bytes())
    before = _digest(pool)
    _one_line_error(mf("data", "ingest", pool, "--out", pool, "--overwrite", "--size", "32"), "input")
    _one_line_error(mf("data", "ingest", pool, "--out", pool / "shards", "--overwrite", "--size", "32"), "lies inside")
    assert _digest(pool) == before
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    _one_line_error(mf("data", "ingest", pool, "--out", mine, "--overwrite", "--size", "32"), "refusing to replace")
    assert (mine / "notes.txt").read_text() == "precious"
    out = tmp_path / "shards"
    assert mf("data", "ingest", pool, "--out", out, "--size", "32")[0] == 0
    assert mf("data", "ingest", pool, "--out", out, "--overwrite", "--size", "32")[0] == 0  # its own output: replaced
    assert (out / "manifest.json").is_file() and _digest(pool) == before


def test_overwriting_writers_keep_user_folders(mf, tmp_path):
    mine = tmp_path / "Dataset001_Mine"
    mine.mkdir()
    (mine / "dataset.json").write_text('{"name": "mine"}')  # a user's dataset, not medfound's
    _one_line_error(mf("data", "phantoms", "--out", mine, "--cases", "1", "--modalities", "CT"), "refusing to replace")
    assert (mine / "dataset.json").read_text() == '{"name": "mine"}'
    ph = tmp_path / "Dataset002_Ph"
    assert mf("data", "phantoms", "--out", ph, "--cases", "1", "--modalities", "CT")[0] == 0
    assert mf("data", "phantoms", "--out", ph, "--cases", "1", "--modalities", "CT")[0] == 0


# 2. A folder of outputs appears whole or not at all.

def test_predict_and_segment_folder_with_a_corrupt_image_leave_nothing(mf, study, run_dir, tmp_path):
    _, scans, support = study
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.nii.gz").write_bytes((scans / "a.nii.gz").read_bytes())
    (mixed / "b.nii.gz").write_bytes((scans / "a.nii.gz").read_bytes()[:200])  # truncated, read after a
    _one_line_error(mf("predict", "--model", run_dir, "--input", mixed, "--output", tmp_path / "p"), "b.nii.gz")
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))
    (tmp_path / "s").mkdir()
    _one_line_error(mf("segment", "--support", support, "--input", mixed, "--output", tmp_path / "s"), "b.nii.gz")
    assert not list((tmp_path / "s").iterdir())
    code, out, _ = mf("predict", "--model", run_dir, "--input", scans, "--output", tmp_path / "p")
    assert code == 0 and (tmp_path / "p" / "a.nii.gz").is_file() and str(tmp_path / "p" / "a.nii.gz") in out
    assert not list(tmp_path.glob(".p.*"))  # the staging folder is gone
    assert "whole or not at all" in " ".join(run_cli("predict", "--help").stdout.split())


# 3. Outputs are checked before any work.

def test_bad_output_paths_fail_before_work(mf, study, run_dir, tmp_path):
    _, scans, support = study
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_line_error(mf("predict", "--model", run_dir, "--input", scans, "--output", afile), "is a file")
    assert "Errno" not in line
    _one_line_error(mf("segment", "--support", support, "--input", scans, "--output", afile / "sub"), "is a file")
    _one_line_error(mf("predict", "--model", run_dir, "--input", scans, "--output", "/proc/medfound/out"), "cannot")
    _one_line_error(mf("sam", "segment", "--model", "tiny", "--input", scans / "a.nii.gz", "--output", afile,
                       "--box", "2,2,20,20", "--slice", "3"), "is a file")


# 6 (CLI) and 14-15: prompts and arguments.

@pytest.mark.parametrize("box", ["100,100,120,120", "20,20,2,2", "nan,2,20,20", "2,2,inf,20"])
def test_sam_segment_invalid_box_exits_2_and_writes_nothing(mf, study, tmp_path, box):
    _, scans, _ = study
    _one_line_error(mf("sam", "segment", "--model", "tiny", "--input", scans / "a.nii.gz", "--output",
                       tmp_path / "o", "--box", box, "--slice", "3"), "box")
    assert not (tmp_path / "o").exists()
    _one_line_error(mf("sam", "segment", "--model", "tiny", "--input", scans / "a.nii.gz", "--output",
                       tmp_path / "o", "--point", "500,5,1", "--slice", "3"), "outside")


def test_argument_errors_are_exit_2(mf, study, tmp_path):
    root, scans, support = study
    a = scans / "a.nii.gz"
    _one_line_error(mf("segment", "--support", support, "--input", a, "--output", tmp_path / "o", "--batch-size", "0"),
                    "--batch-size")
    _one_line_error(mf("segment", "--support", support, "--input", a, "--output", tmp_path / "o", "--modality", "bogus"),
                    "bogus")
    _one_line_error(mf("sam", "segment", "--model", "tiny", "--input", a, "--output", tmp_path / "o", "--box",
                       "2,2,9,9", "--axis", "3"), "--axis")
    truth = support / "labelsTr"
    (tmp_path / "evalout").mkdir()
    _one_line_error(mf("evaluate", "--pred", truth, "--truth", truth, "--out", tmp_path / "evalout"), "is a folder")
    _one_line_error(mf("evaluate", "--pred", truth, "--truth", truth, "--out", tmp_path / "e.csv", "--nsd-tolerance",
                       "nan"), "--nsd-tolerance")
    _one_line_error(mf("serve", "--port", "99999"), "--port")
    _one_line_error(mf("serve", "--workdir", a), "is a file")
    _one_line_error(mf("serve", "--max-upload-mb", "-1"), "--max-upload-mb")
    assert not (tmp_path / "o").exists()


def test_evaluate_json_is_strict(mf, study, tmp_path):
    import json

    _, _, support = study
    truth = support / "labelsTr"
    empty = tmp_path / "pred"
    empty.mkdir()
    for f in truth.iterdir():  # empty predictions: HD95 is undefined
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(empty / f.name))
    assert mf("evaluate", "--pred", empty, "--truth", truth, "--out", tmp_path / "e.csv")[0] == 0
    summary = json.loads((tmp_path / "e_summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert summary["labels"]["1"]["hd95"]["mean"] is None


def test_data_check_catches_counts_orphans_and_bad_values(mf, study, tmp_path):
    import json
    import shutil

    _, _, support = study
    ds = tmp_path / "Dataset971_Check"
    shutil.copytree(support, ds)
    assert mf("data", "check", ds)[0] == 0
    info = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**info, "numTraining": 5}))
    _one_line_error(mf("data", "check", ds), "numTraining")
    (ds / "dataset.json").write_text(json.dumps(info))
    shutil.copy(ds / "labelsTr" / "case0.nii.gz", ds / "labelsTr" / "ghost.nii.gz")
    _one_line_error(mf("data", "check", ds), "ghost.nii.gz", "without an image")


def test_misleading_messages_fixed(mf, tmp_path):
    import gzip

    nib.save(nib.Nifti1Image(np.zeros((10, 10, 0), np.int16), np.eye(4)), str(tmp_path / "zero.nii.gz"))
    line = _one_line_error(mf("data", "inspect", tmp_path / "zero.nii.gz"), "zero.nii.gz", "no voxels")
    assert "1D" not in line
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "bad.nii.gz").write_bytes(gzip.compress(b"garbage" * 100))
    line = _one_line_error(mf("data", "inspect", folder), "bad.nii.gz")
    assert "DICOM image" not in line and "NIFTI" in line


# 16-17: DICOM series with one damaged file; DICOM-SEG without a Frame of Reference.

def test_truncated_copy_in_a_series_is_skipped_and_named(mf, pydicom_files, tmp_path):
    src = pydicom_files["CT_small.dcm"].read_bytes()
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(src)
    (folder / "b.dcm").write_bytes(src[:30000])  # a truncated transfer of the same slice
    code, out, err = mf("data", "inspect", folder, "--json")
    assert code == 0 and '"CT"' in out, err
    assert "skipped" in err and "b.dcm" in err


def test_dicom_seg_without_frame_of_reference_fails_before_output(mf, study, run_dir, tmp_path):
    from helpers import write_dicom_series

    image, _ = make_phantom("CT", shape=(32, 30, 4), seed=2)
    files = write_dicom_series(image.with_array(image.array.astype(np.int16)), tmp_path / "dcm")
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    _one_line_error(mf("predict", "--model", run_dir, "--input", tmp_path / "dcm", "--output", tmp_path / "o",
                       "--dicom-seg"), "FrameOfReferenceUID")
    assert not (tmp_path / "o").exists()

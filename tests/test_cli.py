"""The CLI as a user runs it: help everywhere, and every bad input -> exit 2, one line, no traceback."""

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import run_cli, run_cli_subprocess

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
    _assert_input_error(run_cli_subprocess("data", "inspect", bad_files / name), name)


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


def test_version_short_help_and_groups():
    import medfound

    r = run_cli_subprocess("--version")
    assert r.returncode == 0 and medfound.__version__ in r.stdout
    for cmd in (["-h"], ["sam", "segment", "-h"], ["data", "make-support", "-h"], ["segment", "-h"]):
        r = run_cli(*cmd)
        assert r.returncode == 0 and "Usage" in r.stdout, cmd


def test_trainer_options_defined_once():
    from pathlib import Path

    import medfound.cli as cli

    root = Path(cli.__file__).parent
    defs = [f.name for f in root.glob("*.py") if 'typer.Option(help="cpu, gpu or auto.")' in f.read_text()]
    assert defs == ["common.py"]


def test_make_support_then_segment_and_evaluate_by_name(tmp_path):
    from medfound.data.phantoms import make_phantom
    from medfound.io import write_image

    pairs = []
    for i in range(2):
        img, lab = make_phantom("MR", shape=(32, 30, 8), seed=30 + i)
        img.format = "nifti"
        sparse = np.zeros_like(lab, dtype=np.uint8)
        sparse[:, :, 2:6:2] = (lab[:, :, 2:6:2] == 1)  # two labelled slices per case, value 1
        write_image(img, tmp_path / f"img{i}.nii.gz")
        write_image(img.with_array(sparse), tmp_path / f"msk{i}.nii.gz")
        pairs += [tmp_path / f"img{i}.nii.gz", tmp_path / f"msk{i}.nii.gz"]
    (tmp_path / "names.json").write_text(json.dumps({"organ": 1}))
    r = run_cli("data", "make-support", *pairs, "--out", tmp_path / "ex", "--labels", tmp_path / "names.json")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "ex" / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "organ": 1} and info["numTraining"] == 2
    assert run_cli("data", "check", tmp_path / "ex").returncode == 0
    _assert_input_error(run_cli("data", "make-support", *pairs, "--out", tmp_path / "ex"), "exists")
    _assert_input_error(run_cli("data", "make-support", *pairs[:3], "--out", tmp_path / "ex2"), "pairs")
    r = run_cli("segment", "--support", tmp_path / "ex", "--input", pairs[0], "--output", tmp_path / "o",
                "--support-size", "2", "--no-refine", "--no-flip")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "labels.json").read_text()) == {"0": "background", "1": "organ"}
    # the truth names the same structure with another value: evaluate matches it by name
    truth = tmp_path / "Dataset990_T"
    (truth / "labelsTr").mkdir(parents=True)
    lab = nib.load(pairs[1])
    nib.save(nib.Nifti1Image((np.asarray(lab.dataobj) > 0).astype(np.uint8) * 7, lab.affine),
             str(truth / "labelsTr" / "img0.nii.gz"))
    (truth / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 7}}))
    r = run_cli("evaluate", "--pred", tmp_path / "o", "--truth", truth / "labelsTr", "--out", tmp_path / "e.csv")
    assert r.returncode == 0 and "matched by name" in r.stdout, r.stderr
    summary = json.loads((tmp_path / "e_summary.json").read_text())
    assert summary["labels_matched_by"] == "name" and list(summary["labels"]) == ["7"]


def test_sam_segment_on_a_volume_needs_a_slice(tmp_path):
    img = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 5), np.int16), np.eye(4)), str(img))
    _assert_input_error(run_cli("sam", "segment", "--model", "tiny", "--input", img, "--output", tmp_path / "o",
                                "--box", "2,2,9,9"), "--slice")


def test_old_option_spellings_still_work_but_are_not_listed(tmp_path):
    from medfound.cli.aliases import canonical_argv

    assert canonical_argv(["incontext", "train", "--steps", "5", "--size=64", "--lora-rank", "2", "--out", "r"]) == \
        ["incontext", "train", "--max-steps", "5", "--image-size=64", "--rank", "2", "--output", "r"]
    assert canonical_argv(["predict", "--bf16", "--", "--out"]) == ["predict", "--precision", "bf16", "--", "--out"]
    for flag in ("--out", "--output", "-o"):
        r = run_cli("data", "phantoms", flag, tmp_path / flag.strip("-"), "--cases", "1", "--modalities", "CT")
        assert r.returncode == 0, r.stderr
    shown = run_cli("incontext", "train", "--help").stdout
    assert "--max-steps" in shown and "--image-size" in shown and "--lora-rank" not in shown
    assert " --out " not in shown and "--steps " not in shown


def test_progress_plain_lines_when_not_a_terminal():
    import io

    from medfound.progress import Progress

    buf = io.StringIO()
    with Progress("segment", 4, every_s=0, stream=buf) as p:
        for _ in range(4):
            p.advance(1, "image 1/1")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("medfound: segment: 25 %") and "left" in lines[0] and lines[-1].startswith("medfound: segment: 100 %")
    quiet = io.StringIO()
    with Progress("segment", 4, enabled=False, stream=quiet) as p:
        p.advance(4)
    assert quiet.getvalue() == ""


def test_segment_says_what_it_did_and_warns_on_an_empty_label(tmp_path):
    from medfound.data.nnunet import write_dataset
    from medfound.data.phantoms import make_phantom
    from medfound.io import write_image

    cases = []
    for i in range(2):
        img, lab = make_phantom("MR", shape=(32, 30, 8), seed=40 + i)
        img.format = "nifti"
        cases.append((f"c{i}", img, lab))
    support = write_dataset(tmp_path / "Dataset991_S", cases, {"background": 0, "organ": 1, "kidney": 2, "lesion": 3,
                                                               "bone": 4}, {"0": "MR"}).root
    query = tmp_path / "blank.nii.gz"
    write_image(cases[0][1].with_array(np.zeros_like(cases[0][1].array)), query)  # nothing to find in it
    r = run_cli("segment", "--support", support, "--input", query, "--output", tmp_path / "o", "--label", "organ",
                "--support-size", "2", "--no-refine", "--no-flip")
    assert r.returncode == 0, r.stderr
    assert "modality MR" in r.stderr and "support slices per label" in r.stderr and "organ" in r.stderr and " ml" in r.stderr



def test_empty_label_is_warned(capsys):
    from medfound.data.phantoms import make_phantom
    from medfound.infer.incontext import summarise_mask

    img, _ = make_phantom("MR", shape=(10, 10, 4), seed=1)
    mask = np.zeros(img.shape, np.uint16)
    mask[2:4, 2:4, 1] = 1
    summarise_mask("q", mask, img, {1: "organ", 2: "kidney"}, {"modality": "MR", "support_slices": {1: 8, 2: 8}})
    err = capsys.readouterr().err
    assert "organ 0.00" not in err and "warning: q: kidney came out empty" in err and "organ came out" not in err


def test_device_option_on_every_inference_command(tmp_path):
    import torch

    from medfound.device import inference_device

    assert inference_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert inference_device("cpu").type == "cpu"
    img = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 5), np.int16), np.eye(4)), str(img))
    commands = {
        "predict": ["predict", "--model", tmp_path, "--input", img, "--output", tmp_path / "o1"],
        "segment": ["segment", "--support", tmp_path, "--input", img, "--output", tmp_path / "o2"],
        "sam segment": ["sam", "segment", "--model", "tiny", "--input", img, "--output", tmp_path / "o3",
                        "--box", "2,2,9,9", "--slice", "2"],
        "serve": ["serve", "--port", "1"],
    }
    for name, args in commands.items():
        r = run_cli(*args, "--device", "tpu")
        _assert_input_error(r, "--device")
        if not torch.cuda.is_available():
            _assert_input_error(run_cli(*args, "--device", "cuda"), "no CUDA GPU")
    if torch.cuda.is_available():  # the GPU path, where there is one
        r = run_cli(*commands["sam segment"], "--device", "cuda")
        assert r.returncode == 0 and "on cuda" in r.stderr, r.stderr[-2000:]

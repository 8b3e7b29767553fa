"""The small conv SAM: training from scratch (held-out rule, resume, DDP, export), the packaged
default answering boxes and points, and box-zoomed inference keeping the slice geometry."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_cli

from medfound.data.phantoms import make_phantom

LABELS = {"background": 0, "organ": 1, "Left-Thalamus": 2, "lesion": 3, "bone": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from medfound.data.nnunet import write_dataset

    cases = []
    for i, m in enumerate(("MR", "CT", "CT")):
        image, label = make_phantom(m, shape=(48, 44, 16), seed=20 + i)
        image.format = "nifti"
        cases.append((f"case{i}", image, label))
    return write_dataset(tmp_path_factory.mktemp("samtrain") / "Dataset910_Sam", cases, LABELS, {"0": "mixed"},
                         extra={"case_modalities": {"case0": "MR", "case1": "CT", "case2": "CT"}}).root


def test_zoom_keeps_structure_and_never_trains_heldout(dataset):
    from medfound.data.episodes import build_bank
    from medfound.train.sam_train import zoom_to_structure

    bank = build_bank([str(dataset)], size=64, progress=False)
    assert not (bank.labels == 2).any() and all(n != "left-thalamus" for n, _ in bank.tasks)
    mask = torch.zeros(3, 1, 64, 64)
    mask[:, :, 20:28, 30:36] = 1
    img = torch.rand(3, 1, 64, 64)
    gen = torch.Generator().manual_seed(0)
    zi, zm = zoom_to_structure(img, mask, gen, p=1.0)
    assert zi.shape == img.shape and (zm.sum((1, 2, 3)) > mask.sum((1, 2, 3))).all()  # magnified, still there
    _, same = zoom_to_structure(img, mask, gen, p=0.0)
    assert torch.equal(same, mask)


def test_sam_train_resume_export_and_segment(dataset, tmp_path):
    run = tmp_path / "run"
    args = ["sam", "train", "--datasets", dataset, "--out", run, "--image-size", "64", "--batch-size", "3",
            "--accelerator", "cpu", "--devices", "1", "--checkpoint-every", "2", "--warmup-steps", "1"]
    r = run_cli(*args, "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    r = run_cli(*args, "--steps", "3", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "sam-conv" and cfg["training"]["steps"] == 3 and cfg["inference"]["box_zoom"] > 1
    assert (run / "previews" / "prompts.png").is_file() and "--datasets" in cfg["command"]
    assert run_cli(*args, "--steps", "2").returncode == 2  # refuses to overwrite a run
    img = dataset / "imagesTr" / "case1_0000.nii.gz"
    for extra in (["--box", "10,10,30,30"], ["--point", "20,20,1"], ["--box", "10,10,30,30", "--propagate"]):
        r = run_cli("sam", "segment", "--model", run, "--input", img, "--output", tmp_path / "o", "--slice", "8", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = nib.load(img), nib.load(tmp_path / "o" / "case1.nii.gz")
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    # the never-trained structure, prompted through the session: summary + per-structure rows
    r = run_cli("sam", "evaluate", "--model", run, "--dataset", dataset, "--out", tmp_path / "e.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "e.csv").read_text().splitlines()
    assert lines[0].startswith("prompt,dice_mean") and len(lines) == 1 + 5
    per = (tmp_path / "e_structures.csv").read_text()
    assert "Left-Thalamus" in per and "organ" not in per
    # both pieces of the (kidney-shaped) structure boxed alone: two more prompts, the others unchanged
    r = run_cli("sam", "evaluate", "--model", run, "--dataset", dataset, "--out", tmp_path / "p.csv", "--box-per-piece")
    assert r.returncode == 0, r.stderr[-2000:]
    pieces = (tmp_path / "p.csv").read_text().splitlines()
    assert len(pieces) == 1 + 7 and set(lines) < set(pieces)
    assert any(p.startswith("box per piece,") for p in pieces) and any(p.startswith("box per piece (inscribed") for p in pieces)
    # sagittal slices of the same volumes: every prompt scored there too; a fourth axis is refused
    r = run_cli("sam", "evaluate", "--model", run, "--dataset", dataset, "--out", tmp_path / "s.csv", "--axis", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + 5
    assert (tmp_path / "s.csv").read_text() != (tmp_path / "e.csv").read_text()
    r = run_cli("sam", "evaluate", "--model", run, "--dataset", dataset, "--out", tmp_path / "b.csv", "--axis", "3")
    assert r.returncode == 2 and "--axis" in r.stderr and not (tmp_path / "b.csv").exists()
    r = run_cli("sam", "evaluate", "--model", run, "--dataset", dataset, "--out", tmp_path / "l.csv", "--box-shift", "6",
                "--no-propagate")  # looser boxes: their ellipses move too
    assert r.returncode == 0, r.stderr[-2000:]
    loose = (tmp_path / "l.csv").read_text().splitlines()
    assert loose[1].startswith("box (inscribed ellipse),") and loose[1] != lines[1]
    r = run_cli("sam", "evaluate", "--model", run, "--dataset", dataset, "--out", tmp_path / "b.csv", "--box-shift", "-1")
    assert r.returncode == 2 and "--box-shift" in r.stderr and not (tmp_path / "b.csv").exists()


def test_sam_train_ddp_two_cpu_processes(dataset, tmp_path):
    r = run_cli("sam", "train", "--datasets", dataset, "--out", tmp_path / "ddp", "--image-size", "64",
                "--batch-size", "2", "--steps", "2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["global_batch"] == 4


def test_sam_train_bad_input(dataset, tmp_path):
    r = run_cli("sam", "train", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--datasets or --bank" in r.stderr
    r = run_cli("sam", "train", "--datasets", tmp_path / "missing", "--out", tmp_path / "y")
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sam", "train", "--datasets", dataset, "--out", tmp_path / "z", "--image-size", "100")
    assert r.returncode == 2 and "multiple of 32" in r.stderr


def test_packaged_sam_segments_an_unseen_structure_from_a_box():
    """The shipped model on a phantom it never saw: a box around the organ (mask-derived, as a user
    would draw it) gives the organ back, one click inside a part of it; the zoomed crop is pasted in place."""
    from medfound.eval.sam_eval import _dice, _interior_point
    from medfound.infer.sam_segment import SamSession
    from medfound.models.sam import load_sam_model

    sam, cfg = load_sam_model(None)
    assert cfg["kind"] == "sam-conv" and cfg["training"]["steps"] > 0
    image, label = make_phantom("CT", shape=(96, 80, 12), seed=4242)
    session = SamSession.for_model(sam, cfg, image)
    k = int(np.argmax((label == 1).sum((0, 1))))
    truth = label[:, :, k] == 1
    xs, ys = np.nonzero(truth)
    box = (xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2)
    m = session.segment(k, box=box)
    assert m.shape == truth.shape and _dice(m, truth) > 0.7  # 0.77 with the shipped weights
    assert not m[: max(0, box[0] - 20)].any()  # nothing far outside the box
    one = session.segment(k, points=[tuple(_interior_point(truth))], labels=[1])
    assert one.any() and (one & truth).sum() > 0.8 * one.sum()  # a click is ambiguous: a part of the organ


def test_sam_segment_unites_one_box_per_piece(tmp_path):
    """Both kidneys of a phantom: one box around each piece, answered alone and united, finds both;
    a point beside several boxes is refused before anything is written."""
    from scipy import ndimage

    from medfound.eval.sam_eval import _dice
    from medfound.io import write_image

    image, label = make_phantom("CT", shape=(96, 80, 12), seed=4242)
    image.format = "nifti"
    img = write_image(image, tmp_path / "ct.nii.gz")
    k = int(np.argmax((label == 2).sum((0, 1))))
    pieces, n = ndimage.label(label[:, :, k] == 2)
    assert n == 2
    boxes = []
    for i in (1, 2):
        xs, ys = np.nonzero(pieces == i)
        boxes += ["--box", f"{xs.min() - 2},{ys.min() - 2},{xs.max() + 2},{ys.max() + 2}"]
    r = run_cli("sam", "segment", "--input", img, "--slice", str(k), *boxes, "--output", tmp_path / "o")
    assert r.returncode == 0 and "2 boxes" in r.stderr, r.stderr[-2000:]
    mask = np.asarray(nib.load(tmp_path / "o" / "ct.nii.gz").dataobj)[:, :, k] > 0
    assert all((mask & (pieces == i)).sum() > 0.5 * (pieces == i).sum() for i in (1, 2))  # both kidneys
    assert _dice(mask, pieces > 0) > 0.6
    r = run_cli("sam", "segment", "--input", img, "--slice", str(k), *boxes, "--propagate", "--output", tmp_path / "v")
    assert r.returncode == 0 and "propagated" in r.stderr, r.stderr[-2000:]
    vol = np.asarray(nib.load(tmp_path / "v" / "ct.nii.gz").dataobj) > 0
    assert vol.any((0, 1)).sum() > 1 and all((vol[:, :, k] & (pieces == i)).any() for i in (1, 2))
    r = run_cli("sam", "segment", "--input", img, "--slice", str(k), *boxes, "--point", "36,50,1",
                "--output", tmp_path / "p")
    assert r.returncode == 2 and "--point goes with one --box" in r.stderr and not (tmp_path / "p").exists()

"""Same-study completion: ``segment --partial-labels`` and ``experiment same-study``."""

import json

import nibabel as nib
import numpy as np
import pytest

from medfound.infer.completion import PartialLabels, nearest_slice_copy, shape_prior


def _study(tmp_path, flip_z: bool = True, small_at: tuple[int, int] = (30, 12)):
    """A 40x36x30 MR-like volume holding two ellipsoids (labels 1 and 2) whose cross-sections grow
    and shift with height, the small one centred at ``small_at`` in-plane; its z axis runs downwards
    in the file when ``flip_z``."""
    x, y, z = np.meshgrid(np.arange(40), np.arange(36), np.arange(30), indexing="ij")
    cx = 14 + 0.2 * z
    labels = np.zeros((40, 36, 30), np.uint8)
    labels[((x - cx) / 7) ** 2 + ((y - 18) / 6) ** 2 + ((z - 15) / 11) ** 2 <= 1] = 1
    labels[((x - small_at[0]) / 4) ** 2 + ((y - small_at[1]) / 4) ** 2 + ((z - 12) / 6) ** 2 <= 1] = 2
    rng = np.random.default_rng(0)
    image = (100 + 300 * (labels == 1) + 200 * (labels == 2) + rng.normal(0, 10, labels.shape)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    if flip_z:  # file slice k is canonical slice 29 - k
        affine[2, 2], affine[2, 3] = -1.5, 29 * 1.5
        image, labels = image[:, :, ::-1].copy(), labels[:, :, ::-1].copy()
    img_path, lab_path = tmp_path / "study.nii.gz", tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), img_path)
    nib.save(nib.Nifti1Image(labels, affine), lab_path)
    return img_path, labels, affine


def _partial(tmp_path, labels, affine, slices, name="partial.nii.gz"):
    p = np.zeros_like(labels)
    p[:, :, slices] = labels[:, :, slices]
    path = tmp_path / name
    nib.save(nib.Nifti1Image(p, affine), path)
    return path


def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_shape_prior_morphs_between_outlines_and_an_empty_slice_closes_the_structure():
    yy, xx = np.mgrid[:40, :40]
    labels = np.zeros((40, 40, 21), np.int32)
    labels[:, :, 0] = (yy - 20) ** 2 + (xx - 20) ** 2 <= 5 ** 2
    labels[:, :, 10] = (yy - 20) ** 2 + (xx - 20) ** 2 <= 9 ** 2
    prior = shape_prior(labels, np.array([0, 10]), 1, 2, (1.0, 1.0))
    area = (prior[:, :, 5] > 0.5).sum()
    assert abs(area - np.pi * 7 ** 2) < 0.1 * np.pi * 7 ** 2  # half-way between radius 5 and 9
    assert (prior[:, :, 20] > 0.5).sum() == 0  # tapered off a gap beyond the last labelled slice
    assert 0 < (prior[:, :, 13] > 0.5).sum() < (prior[:, :, 10] > 0.5).sum()
    closed = shape_prior(labels, np.array([0, 10, 16]), 1, 2, (1.0, 1.0))  # slice 16 labelled empty
    assert (closed[:, :, 14] > 0.5).sum() < (prior[:, :, 14] > 0.5).sum() and (closed[:, :, 16] > 0.5).sum() == 0
    near = nearest_slice_copy(PartialLabels(labels, np.array([0, 10]), 2), 1)
    assert near[:, :, 4].sum() == labels[:, :, 0].sum() and near[:, :, 6].sum() == labels[:, :, 10].sum()


def test_segment_partial_labels_completes_the_study(cli, tmp_path):
    img_path, truth, affine = _study(tmp_path)
    given = [6, 11, 16, 21]  # file slice numbers
    partial = _partial(tmp_path, truth, affine, given)
    out = tmp_path / "out"
    r = cli("segment", "--input", img_path, "--partial-labels", partial, "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    mask_img = nib.load(out / "study.nii.gz")
    assert mask_img.shape == truth.shape and np.allclose(mask_img.affine, affine)
    mask = np.asarray(mask_img.dataobj)
    assert np.array_equal(mask[:, :, given], truth[:, :, given])  # labelled slices returned as given
    other = np.setdiff1d(np.arange(30), given)
    for v in (1, 2):
        assert _dice(mask[:, :, other] == v, truth[:, :, other] == v) > 0.8
    assert json.loads((out / "labels.json").read_text())
    assert "4 labelled slices" in r.stderr
    # --labelled-slices: file slice 3 is labelled and empty, so the interpolated outlines close there
    # (the refiner may then follow the image up to it, so the interpolation alone is compared)
    partial2 = _partial(tmp_path, truth, affine, given, "partial2.nii.gz")
    masks = {}
    for name, extra in (("open", ()), ("closed", ("--labelled-slices", "3," + ",".join(map(str, given))))):
        r = cli("segment", "--input", img_path, "--partial-labels", partial2, "--output", tmp_path / name,
                "--refiner", "none", *extra)
        assert r.returncode == 0 and "interpolated" in r.stderr, r.stderr[-2000:]
        masks[name] = np.asarray(nib.load(tmp_path / name / "study.nii.gz").dataobj)
    assert masks["closed"][:, :, 3].sum() == 0 and masks["open"][:, :, 3].sum() > 0
    assert masks["closed"][:, :, 4].sum() < masks["open"][:, :, 4].sum()


def test_segment_partial_labels_bad_input(cli, tmp_path):
    img_path, truth, affine = _study(tmp_path)
    partial = _partial(tmp_path, truth, affine, [6, 11])
    shifted = tmp_path / "shifted.nii.gz"
    moved = affine.copy()
    moved[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asarray(nib.load(partial).dataobj), moved), shifted)
    empty = _partial(tmp_path, truth, affine, [], "empty.nii.gz")
    cases = [
        (("--partial-labels", shifted), "shifted.nii.gz"),
        (("--partial-labels", empty), "empty.nii.gz"),
        (("--partial-labels", partial, "--labelled-slices", "6"), "--labelled-slices"),
        (("--partial-labels", partial, "--labelled-slices", "6,11,99"), "99"),
        (("--partial-labels", partial, "--support", tmp_path), "--partial-labels"),
        (("--partial-labels", partial, "--model-share", "2"), "--model-share"),
        (("--labelled-slices", "3"), "--partial-labels"),
        (("--refiner", "none"), "--partial-labels"),
    ]
    for extra, says in cases:
        r = cli("segment", "--input", img_path, "--output", tmp_path / "o", *extra)
        assert r.returncode == 2, (extra, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and says in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "o").exists()


def test_same_study_experiment(cli, tmp_path):
    ds = _study_dataset(tmp_path)
    out = tmp_path / "exp"
    r = cli("experiment", "same-study", "--dataset", ds.root, "--output", out, "--labelled", "2,4", "--seeds", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2 * 3  # structures x counts x seeds x methods
    summary = json.loads((out / "summary.json").read_text())
    assert {r["group"] for r in summary["by_count"]} == {"held-out", "trained"}
    assert {r["baseline"] for r in summary["paired"]} == {"nearest-slice", "contour-interpolation"}
    assert all(0 <= r["dice_mean"] <= 1 for r in summary["by_count"])
    assert (out / "same_study.png").stat().st_size > 1000
    r = cli("experiment", "same-study", "--dataset", ds.root, "--output", out, "--methods", "guess")
    assert r.returncode == 2 and "guess" in r.stderr


def _study_dataset(tmp_path):
    from medfound.data.nnunet import write_dataset
    from medfound.io import read_image

    img_path, truth, affine = _study(tmp_path, flip_z=False)
    return write_dataset(tmp_path / "Dataset950_Study", [("study", read_image(img_path), truth)],
                         {"background": 0, "organ": 1, "Left-Thalamus": 2}, {"0": "MR"})


def test_a_fresh_refiner_returns_the_interpolation_and_its_window_holds_the_structure():
    import torch

    from medfound.data.completion_inputs import CHANNELS, refiner_inputs, structure_window
    from medfound.infer.completion import refine_prior
    from medfound.models.completion_refiner import CompletionRefiner, RefinerConfig

    labels = np.zeros((30, 40, 36), np.int32)  # slices first
    zz, yy, xx = np.meshgrid(np.arange(30), np.arange(40), np.arange(36), indexing="ij")
    labels[((yy - 14 - 0.2 * zz) / 7) ** 2 + ((xx - 18) / 6) ** 2 + ((zz - 15) / 11) ** 2 <= 1] = 1
    images = (100 + 300 * labels).astype(np.float32)
    given = np.array([8, 15, 22])
    sparse = np.zeros_like(labels)
    sparse[given] = labels[given]
    prior = shape_prior(sparse, given, 1, 0, (1.0, 1.0))
    window = structure_window(sparse[given] == 1)
    rows, cols = np.nonzero((sparse == 1).any(0))
    assert window.r0 <= rows.min() and rows.max() < window.r1 and window.c0 <= cols.min() and cols.max() < window.c1
    x = refiner_inputs(images, {int(k): (sparse[k] == 1).astype(np.float32) for k in given}, prior, given,
                       [10, 26], window, (100.0, 400.0), 32)
    assert x.shape == (2, len(CHANNELS), 32, 32)
    t, beyond = CHANNELS.index("t"), CHANNELS.index("beyond")
    assert float(x[0, t, 0, 0]) == pytest.approx(2 / 7) and float(x[0, beyond, 0, 0]) == 0  # slice 10: 8 -> 15
    assert float(x[1, t, 0, 0]) == 0 and float(x[1, beyond, 0, 0]) == pytest.approx(4 / 7)  # 4 beyond 22
    torch.manual_seed(0)
    fresh = CompletionRefiner(RefinerConfig(size=32)).eval()  # its correction starts at exactly zero
    refined = refine_prior(fresh, images, prior, sparse == 1, given)
    assert np.allclose(refined, prior, atol=1e-4)


def test_train_completion_learns_from_trained_structures_only_and_segment_uses_the_run(cli, tmp_path):
    ds = _study_dataset(tmp_path)
    run = tmp_path / "refiner"
    r = cli("incontext", "train-completion", "--datasets", ds.root, "--output", run, "--max-steps", "3",
            "--image-size", "32", "--batch-size", "4", "--accelerator", "cpu", "--episodes-per-structure", "2",
            "--devices", "2", "--strategy", "ddp")  # two CPU processes (gloo), as on many GPUs
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "completion-refiner" and cfg["training"]["steps"] == 3
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["global_batch"] == 8
    assert cfg["data"]["structures"] == 1  # Left-Thalamus is held out (DESIGN.md): never an episode
    from medfound.models.completion_refiner import load_refiner

    refiner, _ = load_refiner(run)
    assert refiner.config.size == 32
    img_path = tmp_path / "study.nii.gz"
    truth = np.asarray(nib.load(img_path.with_name("truth.nii.gz")).dataobj)
    partial = _partial(tmp_path, truth, nib.load(img_path).affine, [6, 11, 16, 21])
    r = cli("segment", "--input", img_path, "--partial-labels", partial, "--output", tmp_path / "o", "--refiner", run)
    assert r.returncode == 0 and "refined" in r.stderr, r.stderr[-2000:]
    r = cli("segment", "--input", img_path, "--partial-labels", partial, "--output", tmp_path / "o2",
                 "--refiner", tmp_path / "nothing")
    assert r.returncode == 2 and "completion refiner" in r.stderr and not (tmp_path / "o2").exists()
    r = cli("incontext", "train-completion", "--datasets", ds.root, "--output", run, "--max-steps", "3")
    assert r.returncode == 2 and "--resume" in r.stderr  # a finished run folder is never overwritten


def test_the_shipped_refiner_loads():
    from medfound.models.completion_refiner import DEFAULT_REFINER_DIR, load_refiner

    refiner, cfg = load_refiner(None)
    assert (DEFAULT_REFINER_DIR / "model.safetensors").stat().st_size < 3_000_000
    assert cfg["training"]["heldout_rule"] and cfg["command"].startswith("medfound incontext train-completion")
    assert refiner.config.size == cfg["model"]["size"]


def test_the_shipped_refiner_follows_the_image_where_the_interpolation_cannot():
    """A tube whose centre swings between the labelled slices: the interpolated outline cuts the
    curve, the image shows where the structure went, and the shipped refiner moves the outline there."""
    from medfound.infer.completion import refine_prior
    from medfound.models.completion_refiner import load_refiner

    zz, yy, xx = np.meshgrid(np.arange(40), np.arange(64), np.arange(64), indexing="ij")  # slices first
    centre = 32 + 8 * np.sin(zz / 40 * 2 * np.pi)
    truth = (((yy - centre) / 7) ** 2 + ((xx - 32) / 9) ** 2 <= 1) & (zz >= 4) & (zz < 36)
    image = (100 + 300 * truth + np.random.default_rng(0).normal(0, 10, truth.shape)).astype(np.float32)
    given = np.array([6, 14, 22, 30])
    sparse = np.zeros(truth.shape, np.int32)
    sparse[given] = truth[given]
    prior = shape_prior(sparse, given, 1, 0, (1.0, 1.0))
    refined = refine_prior(load_refiner(None)[0].eval(), image, prior, sparse == 1, given)
    rest = np.setdiff1d(np.arange(40), given)
    assert np.array_equal(refined[given], prior[given])  # labelled slices are not touched
    before, after = _dice(prior[rest] > 0.5, truth[rest]), _dice(refined[rest] > 0.5, truth[rest])
    assert after > before + 0.03, (before, after)


@pytest.mark.parametrize("flip", [False, True])
def test_labelled_slices_are_numbered_as_the_file_counts_them(tmp_path, flip):
    from medfound.infer.completion import file_to_canonical_slices
    from medfound.io import read_image

    img_path, _, _ = _study(tmp_path, flip_z=flip)
    assert file_to_canonical_slices(read_image(img_path), 2, [0, 4]) == ([29, 25] if flip else [0, 4])


def test_cross_subject_2d_experiment(cli, tmp_path):
    """Examples written as PNG slices, queries as PNG / geometry-free NIfTI slices of another volume."""
    from medfound.data.nnunet import write_dataset
    from medfound.io import read_image

    sets = []
    for i in range(2):
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        img_path, truth, _ = _study(folder, flip_z=False)
        sets.append(write_dataset(tmp_path / f"Dataset96{i}_Brain", [(f"brain{i}", read_image(img_path), truth)],
                                  {"background": 0, "organ": 1, "Left-Thalamus": 2}, {"0": "MR"}))
    out = tmp_path / "x2d"
    r = cli("experiment", "cross-subject-2d", "--support", sets[0].root, "--test", sets[1].root, "--output", out,
            "--sizes", "1,4", "--seeds", "1", "--queries", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 3  # sizes x queries x methods, the one held-out structure
    summary = json.loads((out / "summary.json").read_text())
    assert {r["method"] for r in summary["by_size"]} == {"incontext", "label-fusion", "mean-mask"}
    assert all(0 <= r["dice_mean"] <= 1 for r in summary["by_size"])
    assert list((out / "examples" / "imagesTr").glob("*.png")) and list((out / "queries").glob("*.png"))
    nifti = next((out / "queries").glob("*.nii.gz"))
    assert np.allclose(nib.load(nifti).affine, np.eye(4))  # no usable geometry


def test_segment_with_a_query_box_finds_the_target_where_the_box_says(cli, tmp_path):
    """The examples show the small target at one place; in the query it sits elsewhere, and the box says where."""
    from medfound.data.nnunet import write_dataset
    from medfound.io import read_image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_path, a_truth, _ = _study(tmp_path / "a", flip_z=False)
    b_path, b_truth, affine = _study(tmp_path / "b", flip_z=True, small_at=(10, 26))
    examples = write_dataset(tmp_path / "Dataset970_Examples", [("a", read_image(a_path), a_truth)],
                             {"background": 0, "organ": 1, "lesion": 2}, {"0": "MR"})
    k = int((b_truth == 2).sum((0, 1)).argmax())  # file slice with the most target
    xs, ys = np.nonzero(b_truth[:, :, k] == 2)
    box = f"{xs.min() - 1},{ys.min() - 1},{xs.max() + 1},{ys.max() + 1}"
    out = tmp_path / "out"
    r = cli("segment", "--support", examples.root, "--label", "lesion", "--input", b_path, "--output", out,
            "--query-box", box, "--slice", str(k), "--support-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    mask_img = nib.load(out / "study.nii.gz")
    assert mask_img.shape == b_truth.shape and np.allclose(mask_img.affine, affine)
    mask = np.asarray(mask_img.dataobj)
    assert set(np.unique(mask).tolist()) <= {0, 2}
    assert _dice(mask[:, :, k] == 2, b_truth[:, :, k] == 2) > 0.5
    assert not (mask == 2)[:, :, k][b_truth[:, :, k] == 1].any()  # the big structure is not the target
    bad = [
        (("--query-box", "100,100,120,120", "--slice", str(k), "--label", "lesion"), "outside"),
        (("--query-box", box, "--label", "lesion"), "--slice"),
        (("--slice", str(k), "--label", "lesion"), "--query-box"),
        (("--query-box", box, "--slice", str(k)), "--label"),
        (("--query-box", "1,2,3", "--slice", str(k), "--label", "lesion"), "--query-box"),
    ]
    for extra, says in bad:
        r = cli("segment", "--support", examples.root, "--input", b_path, "--output", tmp_path / "o", *extra)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-800:])
        assert not (tmp_path / "o").exists()

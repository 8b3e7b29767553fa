"""2D in-context segmentation across subjects: each example slice registered onto the query."""

import re

import numpy as np

from medfound.data.correspondence import deform_slice, register_slice, warp_slice


def _head(shape=(110, 120), centre=(55, 60), scale=1.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    y, x = (yy - centre[0]) / scale, (xx - centre[1]) / scale
    img = 100.0 * ((y / 40) ** 2 + (x / 48) ** 2 < 1) + 80.0 * (((y + 8) / 9) ** 2 + ((x - 12) / 7) ** 2 < 1)
    mask = ((y + 8) / 9) ** 2 + ((x - 12) / 7) ** 2 < 1
    return img.astype(np.float32), mask


def test_register_slice_recovers_shift_and_scale():
    fixed, fixed_mask = _head()
    moving, moving_mask = _head((140, 150), centre=(75, 70), scale=1.25)
    tx = register_slice(fixed, moving)
    assert tx is not None
    warped = warp_slice(moving_mask.astype(np.float32), tx, fixed.shape) > 0.5
    dice = 2 * (warped & fixed_mask).sum() / (warped.sum() + fixed_mask.sum())
    assert dice > 0.85
    register_slice(fixed, np.zeros_like(moving))  # a blank slice gives None or a transform, never an error


def test_deform_slice_takes_up_what_an_affine_cannot():
    """The spot moves relative to the head (another subject's anatomy): an affine aligns the heads and
    leaves the spot off; the deformation brings it onto the query's spot."""
    fixed, fixed_mask = _head()
    yy, xx = np.mgrid[:110, :120].astype(np.float32)
    moving = 100.0 * (((yy - 55) / 40) ** 2 + ((xx - 60) / 48) ** 2 < 1) \
        + 80.0 * (((yy - 52) / 9) ** 2 + ((xx - 67) / 7) ** 2 < 1)  # the spot 5 px lower and to the left
    moving_mask = ((yy - 52) / 9) ** 2 + ((xx - 67) / 7) ** 2 < 1
    moving = (moving * 2.5 + 10).astype(np.float32)  # another intensity scale, as a PNG export against a NIfTI

    def dice(tx):
        warped = warp_slice(moving_mask.astype(np.float32), tx, fixed.shape) > 0.5
        return 2 * (warped & fixed_mask).sum() / (warped.sum() + fixed_mask.sum())

    affine = register_slice(fixed, moving)
    assert affine is not None
    deformed = deform_slice(fixed, moving, affine)
    assert deformed.GetName() == "CompositeTransform"
    assert dice(deformed) > dice(affine) + 0.15


def test_segment_registers_2d_examples_onto_a_2d_query(cli, tmp_path):
    from medfound.data.nnunet import write_dataset
    from medfound.io import MedImage, read_image, write_image

    cases = []
    for i, (centre, scale) in enumerate((((55, 60), 1.0), ((60, 52), 0.9), ((50, 64), 1.1))):
        img, mask = _head(centre=centre, scale=scale)
        cases.append((f"ex{i}", MedImage(np.clip(img, 0, 255).astype(np.uint8), format="png"),
                      np.where(mask, 1, 0).astype(np.uint8)))
    examples = write_dataset(tmp_path / "Dataset980_Ex", cases, {"background": 0, "spot": 1}, {"0": "MR"},
                             file_ending=".png")
    q_img, q_mask = _head((150, 160), centre=(80, 70), scale=1.2)
    query = write_image(MedImage(np.clip(q_img, 0, 255).astype(np.uint8), format="png"), tmp_path / "query.png")
    out = tmp_path / "out"
    r = cli("segment", "--support", examples.root, "--input", query, "--output", out, "--support-size", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"registered: [1-3] of 3 example slice\(s\) \(2D affine \+ deformation\)", r.stderr)
    pred = read_image(out / "query.png").array > 0
    assert pred.shape == q_mask.shape
    assert 2 * (pred & q_mask).sum() / (pred.sum() + q_mask.sum()) > 0.6
    r = cli("segment", "--support", examples.root, "--input", query, "--output", tmp_path / "affine",
            "--support-size", "3", "--register-2d", "affine")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"example slice\(s\) \(2D affine\);", r.stderr)
    pred = read_image(tmp_path / "affine" / "query.png").array > 0
    assert 2 * (pred & q_mask).sum() / (pred.sum() + q_mask.sum()) > 0.6
    r = cli("segment", "--support", examples.root, "--input", query, "--output", tmp_path / "bad", "--register-2d", "elastic")
    assert r.returncode == 2 and "--register-2d must be affine or deformable" in r.stderr
    assert not (tmp_path / "bad").exists()

"""`medfound evaluate` agrees with MONAI on hand-made anisotropic cases, empty masks included."""

import csv
import json

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from conftest import run_cli
from medfound.eval.metrics import label_metrics, summarise
from medfound.io import MedImage, write_image
from medfound.io.image import affine_from_geometry

SPACING = (0.5, 1.0, 3.0)


def _img(arr):
    return MedImage(array=arr.astype(np.uint8), affine=affine_from_geometry(SPACING, (10, -20, 5), np.eye(3)))


def _cases():
    shape = (40, 30, 12)
    t1 = np.zeros(shape, np.uint8)
    t1[5:25, 5:20, 2:8] = 1
    t1[28:36, 10:20, 4:10] = 2
    p1 = np.zeros(shape, np.uint8)
    p1[7:27, 6:22, 3:8] = 1
    p1[30:37, 12:20, 5:11] = 2
    t2 = np.zeros(shape, np.uint8)
    t2[10:20, 10:20, 3:6] = 1  # label 2 absent in truth and prediction: both empty
    p2 = np.zeros(shape, np.uint8)
    p2[10:18, 12:20, 3:7] = 1
    t3 = np.zeros(shape, np.uint8)
    t3[5:10, 5:10, 5:7] = 2  # label 1 predicted but absent: one empty
    p3 = np.zeros(shape, np.uint8)
    p3[20:25, 5:10, 5:7] = 1
    p3[5:9, 5:10, 5:7] = 2
    return {"c1": (p1, t1), "c2": (p2, t2), "c3": (p3, t3)}


def _monai(p, t):
    yp = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
    yt = torch.from_numpy(np.stack([~t, t])[None].astype(np.float32))
    return (float(compute_dice(yp, yt, include_background=False)),
            float(compute_hausdorff_distance(yp, yt, percentile=95, spacing=list(SPACING))),
            float(compute_surface_dice(yp, yt, class_thresholds=[2.0], spacing=list(SPACING))))


def test_evaluate_matches_monai_and_keeps_empty_rows(tmp_path):
    for case, (p, t) in _cases().items():
        write_image(_img(p), tmp_path / "pred" / f"{case}.nii.gz")
        write_image(_img(t), tmp_path / "truth" / f"{case}.nii.gz")
    r = run_cli("evaluate", "--pred", tmp_path / "pred", "--truth", tmp_path / "truth", "--out", tmp_path / "m.csv",
                "--nsd-tolerance", "2")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert list(rows[0]) == ["case", "label", "dice", "iou", "hd95", "nsd"] and len(rows) == 6
    got = {(r["case"], int(r["label"])): r for r in rows}
    for case, (p, t) in _cases().items():
        for v in (1, 2):
            pb, tb = p == v, t == v
            row = got[(case, v)]
            if pb.any() and tb.any():
                d, h, n = _monai(pb, tb)
                assert float(row["dice"]) == pytest.approx(d, abs=1e-5)
                assert float(row["hd95"]) == pytest.approx(h, abs=1e-4)
                assert float(row["nsd"]) == pytest.approx(n, abs=1e-5)
                assert float(row["iou"]) == pytest.approx(d / (2 - d), abs=1e-5)
    assert float(got[("c2", 2)]["dice"]) == 1.0 and float(got[("c2", 2)]["hd95"]) == 0.0
    assert float(got[("c3", 1)]["dice"]) == 0.0 and got[("c3", 1)]["hd95"] == "nan"
    summary = json.loads((tmp_path / "m_summary.json").read_text())
    assert summary["labels"]["1"]["hd95"]["n_undefined"] == 1 and summary["cases"] == 3
    assert "Traceback" not in r.stderr and "dice" in r.stdout


def test_anisotropic_spacing_changes_distances():
    t = np.zeros((20, 20, 10), bool)
    t[5:10, 5:10, 3:6] = True
    p = np.roll(t, 2, axis=2)  # two slices off along the 3 mm axis
    assert label_metrics(p, t, (1, 1, 3))["hd95"] == pytest.approx(6.0)
    assert label_metrics(p, t, (1, 1, 1))["hd95"] == pytest.approx(2.0)


def test_evaluate_bad_input(tmp_path):
    (p, t) = _cases()["c1"]
    write_image(_img(t), tmp_path / "truth" / "c1.nii.gz")
    write_image(_img(t), tmp_path / "truth" / "c2.nii.gz")
    write_image(_img(p), tmp_path / "pred" / "c1.nii.gz")
    r = run_cli("evaluate", "--pred", tmp_path / "pred", "--truth", tmp_path / "truth",
                     "--out", tmp_path / "m.csv")
    assert r.returncode == 2 and "c2" in r.stderr and not (tmp_path / "m.csv").exists()
    img = _img(p)
    img.affine[0, 0] = 0.7
    write_image(img, tmp_path / "pred" / "c2.nii.gz")
    r = run_cli("evaluate", "--pred", tmp_path / "pred", "--truth", tmp_path / "truth",
                     "--out", tmp_path / "m.csv")
    assert r.returncode == 2 and "geometry" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_summary_ci():
    s = summarise([0.5, 0.6, 0.7, float("nan")])
    assert s["n"] == 3 and s["n_undefined"] == 1 and s["ci_low"] <= s["mean"] <= s["ci_high"]


@pytest.mark.parametrize("shape,spacing", [((48, 40), (0.7, 1.3)), ((30, 26, 12), (0.8, 1.0, 2.5))])
def test_label_metrics_one_boundary_pass_equals_monai(shape, spacing):
    """HD95 and NSD share one edge/distance pass; each must still equal MONAI's own function."""
    from scipy.ndimage import binary_opening, gaussian_filter

    from medfound.eval.metrics import label_metrics

    rng = np.random.default_rng(len(shape))
    for _ in range(3):
        p = binary_opening(gaussian_filter(rng.normal(size=shape), 3) > 0.02)
        t = binary_opening(gaussian_filter(rng.normal(size=shape), 3) > 0.02)
        yp = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
        yt = torch.from_numpy(np.stack([~t, t])[None].astype(np.float32))
        got = label_metrics(p, t, spacing, tolerance_mm=1.5)
        assert got["hd95"] == pytest.approx(float(compute_hausdorff_distance(yp, yt, percentile=95, spacing=list(spacing))), abs=1e-4)
        assert got["nsd"] == pytest.approx(float(compute_surface_dice(yp, yt, class_thresholds=[1.5], spacing=list(spacing))), abs=1e-6)
        assert got["dice"] == pytest.approx(float(compute_dice(yp, yt, include_background=False)), abs=1e-6)

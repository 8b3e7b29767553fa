"""Normalisation by modality, canonical reorientation, and physical-size square slicing."""

import numpy as np
import pytest

from medfound.data.normalize import CT_WINDOWS, normalize, spec_for
from medfound.data.orientation import from_canonical, to_canonical
from medfound.data.slicing import from_square, iter_slices, square_geometry, to_square


def test_ct_window_clips_and_scales():
    hu = np.array([-2000, -160, 40, 240, 3000], np.float32)
    out = normalize(hu, "CT", "soft_tissue")  # level 40, width 400 -> [-160, 240]
    assert np.allclose(out, [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError):
        spec_for("CT", "nonsense")
    assert set(CT_WINDOWS) >= {"lung", "bone", "brain", "soft_tissue"}


def test_mr_percentiles_ignore_background_and_outliers():
    rng = np.random.default_rng(0)
    vol = np.zeros((40, 40, 10), np.float32)
    vol[10:30, 10:30] = rng.normal(500, 50, (20, 20, 10))
    vol[0, 0, 0] = 1e6  # a hot pixel must not squash the range
    out = normalize(vol, "MR")
    inside = out[10:30, 10:30]
    assert 0.3 < inside.mean() < 0.7 and out.max() == 1.0 and out.min() == 0.0
    # Scaling the raw units changes nothing (MR units are arbitrary).
    assert np.allclose(normalize(vol * 7.3, "MR"), out, atol=1e-5)


def test_xray_and_us_per_image():
    img = np.linspace(100, 4000, 1000).reshape(40, 25)
    out = normalize(img, "XR")
    assert out.min() == 0 and out.max() == 1
    assert spec_for("US").method == "percentile"


def test_canonical_roundtrip(oblique_ct):
    image, label = oblique_ct
    can, ornt = to_canonical(image.with_array(label))
    assert can.orientation == "RAS"
    assert np.array_equal(from_canonical(can.array, ornt), label)
    # A voxel keeps its world position through the reorientation.
    idx = np.array([3, 5, 7])
    world = image.affine @ [*idx, 1]
    can_idx = np.linalg.solve(can.affine, world)[:3]
    assert np.allclose(can_idx, np.round(can_idx), atol=1e-6)
    assert can.array[tuple(np.round(can_idx).astype(int))] == label[tuple(idx)]


def test_square_keeps_physical_aspect_and_inverts():
    sl = np.zeros((100, 40), np.float32)  # 100 x 0.5 mm by 40 x 2 mm: 50 x 80 mm
    sl[20:60, 10:30] = 1
    sq, geom = to_square(sl, (0.5, 2.0), 64, nearest=True)
    assert sq.shape == (64, 64)
    assert geom.resized == (40, 64)  # 50 mm -> 40 px, 80 mm -> 64 px: square pixels
    back = from_square(sq, geom, nearest=True)
    assert back.shape == sl.shape
    assert (back == sl).mean() > 0.97
    assert square_geometry((512, 512), (0.7, 0.7), 224).offset == (0, 0)


def test_iter_slices_axes(oblique_ct):
    image, _ = oblique_ct
    slices = list(iter_slices(image, axis=1))
    assert len(slices) == image.shape[1]
    k, s, spacing = slices[3]
    assert s.shape == (image.shape[0], image.shape[2]) and np.allclose(spacing, (0.8, 2.5))

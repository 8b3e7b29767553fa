"""The box's neighbourhood that a zooming SAM sees: one definition for training and inference."""

import numpy as np

from medfound.data.box_crop import box_window


def test_window_is_square_in_mm_centred_and_bounded():
    # anisotropic pixels: 1 mm along the first axis, 2 mm along the second
    win = box_window((40, 40, 99, 69), (200, 100), (1.0, 2.0), zoom=2.0)
    side_mm = np.array(win.shape) * np.array([1.0, 2.0])
    assert abs(side_mm[0] - side_mm[1]) <= 2.0                     # square in mm, to a pixel
    assert abs(side_mm[0] - 2.0 * 60) <= 2.0                       # zoom x the larger physical side (60 mm)
    small = box_window((40, 40, 44, 42), (200, 100), (1.0, 2.0), zoom=2.0)
    assert small.shape[0] >= 0.25 * 200 - 1                        # ...but at least a quarter of the extent
    centre = win.start + (np.array(win.shape) - 1) / 2
    assert np.allclose(centre, (69.5, 54.5), atol=0.5)              # centred on the box
    whole = box_window((0, 0, 199, 99), (200, 100), (1.0, 2.0), zoom=3.0)
    assert max(np.array(whole.shape) * np.array([1.0, 2.0])) <= 200.0  # never more than the slice's extent


def test_cut_pads_outside_the_slice_and_overlap_pastes_back():
    img = np.arange(30 * 20, dtype=np.float32).reshape(30, 20) + 1
    win = box_window((0, 0, 5, 5), img.shape, (1.0, 1.0), zoom=4.0)  # a box in the corner: the window leaves the slice
    assert (win.start < 0).any()
    crop = win.cut(img)
    assert crop.shape == win.shape and (crop == 0).any()           # zero where the window leaves the slice
    in_slice, in_crop = win.overlap(img.shape)
    assert np.array_equal(crop[in_crop], img[in_slice])             # the same pixels, both ways
    out = np.zeros_like(img)
    out[in_slice] = crop[in_crop]
    assert np.array_equal(out[in_slice], img[in_slice])
    x, y = 3, 4  # a slice pixel lands on the crop pixel holding its value, for a point and a box alike
    cx, cy = win.to_crop((x, y)).astype(int)
    assert crop[cx, cy] == img[x, y]
    assert np.array_equal(win.to_crop((x, y, x + 1, y + 2)), [cx, cy, cx + 1, cy + 2])
    far = box_window((500, 500, 510, 510), img.shape, (1.0, 1.0), zoom=1.0)
    assert far.overlap(img.shape) is None and not far.cut(img).any()

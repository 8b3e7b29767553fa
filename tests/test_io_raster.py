"""PNG, JPEG and TIFF: 2D images (and TIFF stacks), (rows, cols) -> (i, j) and back."""

import numpy as np
import tifffile
from PIL import Image

from medfound.io import read_image, write_mask


def test_png_gray16_and_mask_roundtrip(tmp_path):
    arr = (np.arange(30 * 20).reshape(30, 20) * 50).astype(np.uint16)  # rows=30, cols=20
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert img.shape == (20, 30) and img.array[3, 7] == arr[7, 3]
    write_mask((img.array > 10000).astype(np.uint8), img, tmp_path / "m.png")
    m = np.asarray(Image.open(tmp_path / "m.png"))
    assert m.shape == arr.shape and np.array_equal(m, (arr > 10000).astype(np.uint8))


def test_rgb_jpeg_becomes_luminance(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    img = read_image(tmp_path / "c.jpg")
    assert img.shape == (24, 16) and img.format == "jpeg"
    assert abs(float(img.array.mean()) - 0.587 * 200) < 3


def test_tiff_stack_is_3d(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, (5, 12, 9)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    img = read_image(tmp_path / "s.tif")
    assert img.shape == (9, 12, 5) and img.array[2, 4, 1] == stack[1, 4, 2]


def test_sniffing_ignores_misleading_extension(tmp_path):
    arr = np.full((8, 8), 7, np.uint8)
    Image.fromarray(arr).save(tmp_path / "really_png.dat", format="PNG")
    assert read_image(tmp_path / "really_png.dat").format == "png"
    from medfound.io.formats import sniff_format

    (tmp_path / "fake.nii.gz").write_bytes(b"this is not a nifti")
    assert sniff_format(tmp_path / "fake.nii.gz") is None

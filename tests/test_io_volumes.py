"""NIfTI, MGZ, NRRD and MHA: reading real files and round-trips with non-trivial affines."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medfound.io import MedImage, read_image, write_image, write_mask
from medfound.io.image import affine_from_geometry


def _oblique_affine(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return affine_from_geometry((0.7, 1.3, 2.9), (-103.25, 41.5, -17.75), q)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".mgz", ".nrrd", ".mha"])
def test_roundtrip_keeps_affine_and_values(tmp_path, ext):
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 2000, size=(17, 11, 7)).astype(np.int16)
    img = MedImage(array=arr, affine=_oblique_affine(), modality="CT")
    write_image(img, tmp_path / f"a{ext}")
    back = read_image(tmp_path / f"a{ext}")
    # Second generation: a file read -> written -> read keeps its affine to 1e-6 exactly.
    write_mask((back.array > 0).astype(np.uint8), back, tmp_path / f"m{ext}")
    mask = read_image(tmp_path / f"m{ext}")
    assert np.allclose(back.affine, img.affine, atol=1e-4)  # float32 header storage
    assert np.abs(mask.affine - back.affine).max() < 1e-6
    assert np.array_equal(back.array, arr)
    assert np.array_equal(mask.array, (arr > 0).astype(np.uint8))
    assert mask.shape == back.shape


def test_nrrd_matches_simpleitk_geometry_on_real_file(samples):
    # pyradiomics' lung CT, written to NIfTI by `samples`: world position of a voxel must agree
    # with SimpleITK's own physical point for the same index (LPS -> RAS flip).
    from medfound.data.samples import PYRADIOMICS_SDIST, sample_cache_dir
    import tarfile

    with tarfile.open(sample_cache_dir() / PYRADIOMICS_SDIST) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("lung1_image.nrrd"))
        tar.extractall(samples / "nrrd", members=[member], filter="data")
    nrrd = next((samples / "nrrd").rglob("lung1_image.nrrd"))
    img = read_image(nrrd)
    ref = sitk.ReadImage(str(nrrd))
    idx = (100, 200, 30)
    lps = np.array(ref.TransformIndexToPhysicalPoint(idx))
    ras = img.affine @ np.array([*idx, 1.0])
    assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)
    assert img.array[idx] == sitk.GetArrayFromImage(ref)[idx[::-1]]
    # ... and the NIfTI the samples wrote from it sits in the same place.
    nii = read_image(samples / "Dataset002_Lesions" / "imagesTr" / "lung1_0000.nii.gz")
    assert np.allclose(nii.affine, img.affine, atol=1e-4)
    assert np.array_equal(nii.array, img.array)


def test_cross_format_mask_lands_on_same_world_voxels(tmp_path, oblique_ct):
    image, label = oblique_ct
    write_image(image, tmp_path / "ct.nrrd")
    src = read_image(tmp_path / "ct.nrrd")
    write_mask(label, src, tmp_path / "mask.nii.gz")
    m = read_image(tmp_path / "mask.nii.gz")
    assert np.allclose(m.affine, src.affine, atol=1e-5)
    assert np.array_equal(m.array, label)
    n = nib.load(str(tmp_path / "mask.nii.gz"))
    assert int(n.header["sform_code"]) > 0 and int(n.header["qform_code"]) > 0


def test_nifti_header_codes_preserved(tmp_path):
    arr = np.zeros((5, 6, 7), np.float32)
    n = nib.Nifti1Image(arr, _oblique_affine(2))
    n.set_sform(_oblique_affine(2), code=4)  # MNI
    n.set_qform(_oblique_affine(2), code=1)
    nib.save(n, tmp_path / "x.nii.gz")
    img = read_image(tmp_path / "x.nii.gz")
    write_mask(np.ones(img.shape, np.uint8), img, tmp_path / "y.nii.gz")
    h = nib.load(str(tmp_path / "y.nii.gz")).header
    assert int(h["sform_code"]) == 4 and int(h["qform_code"]) == 1
    assert np.abs(nib.load(str(tmp_path / "y.nii.gz")).affine - img.affine).max() < 1e-6


def test_real_mgz_and_template(tmp_path):
    import importlib.util

    base = Path(list(importlib.util.find_spec("nilearn").submodule_search_locations)[0]) / "datasets" / "data"
    t1 = read_image(base / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    assert t1.shape == (197, 233, 189) and t1.orientation == "RAS"
    assert np.allclose(t1.spacing, (1, 1, 1))
    # The real test.mgz is 4D: a clear error, not a crash.
    from medfound.errors import InputError

    with pytest.raises(InputError, match="4D"):
        read_image(base / "test.mgz")
    # An MGZ written from a real image reads back on the same grid.
    sub = MedImage(array=t1.array[40:120, 50:150, 60:100].copy(), affine=t1.affine @ np.array(
        [[1, 0, 0, 40], [0, 1, 0, 50], [0, 0, 1, 60], [0, 0, 0, 1]], float), modality="MR")
    write_image(sub, tmp_path / "t1.mgz")
    back = read_image(tmp_path / "t1.mgz")
    assert back.format == "mgz" and np.allclose(back.affine, sub.affine, atol=1e-5)
    assert np.allclose(back.array, sub.array)


def test_summary_reports_geometry(oblique_ct):
    image, _ = oblique_ct
    s = image.summary()
    assert s["shape"] == [40, 36, 12] and len(s["orientation"]) == 3
    assert np.allclose(s["spacing"], [0.8, 0.8, 2.5])

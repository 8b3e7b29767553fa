"""DICOM: single files, multi-frame, series folders sorted by position, and DICOM-SEG output."""


import numpy as np
import pydicom
import pytest

from helpers import write_dicom_series
from medfound.errors import InputError
from medfound.io import read_image
from medfound.io.dicomseg import write_dicom_seg


def test_single_ct_file_in_hounsfield(pydicom_files):
    f = pydicom_files["CT_small.dcm"]
    img = read_image(f)
    ds = pydicom.dcmread(f)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert img.modality == "CT" and img.shape == (128, 128)
    assert np.array_equal(img.array, hu.T)
    # World position of pixel (col=5, row=9) from the DICOM definition, LPS -> RAS.
    ipp, iop, ps = (np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float),
                    np.array(ds.PixelSpacing, float))
    lps = ipp + 5 * ps[1] * iop[:3] + 9 * ps[0] * iop[3:]
    assert np.allclose((img.affine @ [5, 9, 0, 1])[:3], lps * [-1, -1, 1], atol=1e-6)


def test_enhanced_multiframe_positions_and_rescale(pydicom_files):
    img = read_image(pydicom_files["eCT_Supplemental.dcm"])
    assert img.shape == (512, 512, 2) and img.modality == "CT"
    assert img.array.min() == -1024  # rescale from the functional groups
    assert np.isclose(img.spacing[2], 10.0)
    mr = read_image(pydicom_files["emri_small.dcm"])
    assert mr.shape == (64, 64, 10) and mr.modality == "MR"


def test_cine_and_radiograph(pydicom_files):
    us = read_image(pydicom_files["OBXXXX1A_2frame.dcm"])
    assert us.shape == (800, 600, 2) and us.meta["frames_are_time"] and us.modality == "US"
    cr = read_image(pydicom_files["RG1_UNCR.dcm"])
    assert cr.modality == "XR" and cr.ndim == 2


def test_compressed_decodes_like_uncompressed(pydicom_files):
    a = read_image(pydicom_files["MR_small_RLE.dcm"]).array
    b = read_image(pydicom_files["MR_small.dcm"]).array
    c = read_image(pydicom_files["MR_small_jp2klossless.dcm"]).array
    assert np.array_equal(a, b) and np.array_equal(b, c)


def test_series_sorted_by_position_not_name(tmp_path, oblique_ct):
    image, _ = oblique_ct
    n = image.shape[2]
    names = [f"IMG{(7 * k) % n:04d}.dcm" for k in range(n)]  # file names in scrambled order
    write_dicom_series(image, tmp_path / "series", names=names)
    got = read_image(tmp_path / "series")
    assert got.format == "dicom" and got.modality == "CT"
    assert got.shape == image.shape
    assert np.array_equal(got.array, image.array)
    assert np.allclose(got.affine, image.affine, atol=1e-5)
    assert len(got.meta["dicom_files"]) == n


def test_folder_with_two_series(tmp_path, oblique_ct):
    image, _ = oblique_ct
    write_dicom_series(image, tmp_path / "study" / "a", series_uid="1.2.3.4.1")
    write_dicom_series(image, tmp_path / "study" / "b", series_uid="1.2.3.4.2")
    with pytest.raises(InputError, match="2 DICOM series"):
        read_image(tmp_path / "study")
    one = read_image(tmp_path / "study", series_uid="1.2.3.4.2")
    assert one.meta["series_uid"] == "1.2.3.4.2"


def test_dicom_seg_for_series_roundtrip(tmp_path, oblique_ct):
    import highdicom as hd

    image, label = oblique_ct
    write_dicom_series(image, tmp_path / "series")
    src = read_image(tmp_path / "series")
    out = write_dicom_seg(label, src, tmp_path / "seg.dcm", labels={1: "organ", 2: "kidney", 3: "lesion", 4: "bone"})
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 4
    assert seg.get_segment_description(1).segment_label == "organ"
    # Each referenced source frame holds exactly the mask slice of its position.
    files = src.meta["dicom_files"]
    for k in (0, image.shape[2] // 2, image.shape[2] - 1):
        uid = pydicom.dcmread(files[k]).SOPInstanceUID
        vol = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], combine_segments=True)
        assert np.array_equal(vol[0], label[:, :, k].T)


def test_dicom_seg_for_single_real_file(tmp_path, pydicom_files):
    import highdicom as hd

    src = read_image(pydicom_files["CT_small.dcm"])
    mask = (src.array > 100).astype(np.uint8)
    seg = hd.seg.segread(write_dicom_seg(mask, src, tmp_path / "s.dcm"))
    assert np.array_equal(seg.pixel_array.reshape(mask.T.shape), mask.T)


def test_bad_dicoms(tmp_path, pydicom_files):
    with pytest.raises(InputError, match="pixel data"):
        read_image(pydicom_files["emri_small_jpeg_2k_lossless_too_short.dcm"])
    with pytest.raises(InputError, match="pixel data"):
        read_image(pydicom_files["MR_truncated.dcm"])
    ds = pydicom.dcmread(pydicom_files["CT_small.dcm"])
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(InputError, match="no pixel data"):
        read_image(tmp_path / "nopix.dcm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path / "empty")

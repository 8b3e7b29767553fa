"""The viewer: JSON API (uploads, bad files, safety, concurrency, undo, downloads) and, where Debian's
Chromium is installed, the page driven by Playwright in a real headless browser."""

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfound.data.phantoms import make_phantom
from medfound.viewer.browser import chromium_path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medfound.data.nnunet import write_dataset
    from medfound.io import write_image

    root = tmp_path_factory.mktemp("viewer")
    cases = []
    for i in range(2):
        image, label = make_phantom("MR", shape=(48, 44, 16), seed=20 + i)
        image.format = "nifti"
        cases.append((f"case{i}", image, label))
    support = write_dataset(root / "Dataset950_Support", cases, {"background": 0, "organ": 1, "kidney": 2,
                                                                 "lesion": 3, "bone": 4}, {"0": "MR"}).root
    image, label = make_phantom("MR", shape=(48, 44, 16), seed=99, oblique=True)
    study = write_image(image, root / "study.nii.gz")
    return root, support, study, label


@pytest.fixture(scope="module")
def client(data, tmp_path_factory):
    from fastapi.testclient import TestClient

    from medfound.viewer.app import create_app

    root, support, _, _ = data
    app = create_app(tmp_path_factory.mktemp("work"), supports=[support], sam="tiny", max_upload_mb=2)
    return TestClient(app, headers={"x-medfound-token": app.state.token})


def test_sam_flip_reaches_the_session(data, tmp_path):
    """serve --sam-flip: the viewer's SAM answers with mirror averaging."""
    from fastapi.testclient import TestClient

    from medfound.viewer.app import create_app

    _, _, study, _ = data
    app = create_app(tmp_path / "work", sam="tiny", sam_flip=True)
    client = TestClient(app, headers={"x-medfound-token": app.state.token})
    sid = _upload(client, study).json()["id"]
    r = client.post(f"/api/studies/{sid}/sam", json={"slice": 5, "points": [[20, 8, 1]], "label": 1})
    assert r.status_code == 200, r.text
    assert app.state.store.get(sid).sam_session.flip is True


def test_sam_box_with_add_keeps_the_other_piece(data, tmp_path):
    """A second box with ``add`` (shift-drag) is another piece of the label: the first piece stays;
    without it the box replaces the label on that slice, as before."""
    from fastapi.testclient import TestClient

    from medfound.viewer.app import create_app

    _, _, study, _ = data
    app = create_app(tmp_path / "work")  # the shipped small SAM: it answers a box near the box
    client = TestClient(app, headers={"x-medfound-token": app.state.token})
    sid = _upload(client, study).json()["id"]
    st = app.state.store.get(sid)
    st.mask_slice(5)[:3, :3] = 3  # a first piece, far from the box below
    r = client.post(f"/api/studies/{sid}/sam", json={"slice": 5, "box": [30, 4, 40, 12], "label": 3, "add": True})
    assert r.status_code == 200, r.text
    assert (st.mask_slice(5)[:3, :3] == 3).all() and (st.mask_slice(5) == 3).sum() >= r.json()["pixels"]
    before = st.mask_slice(5).copy()
    r = client.post(f"/api/studies/{sid}/sam", json={"slice": 5, "box": [30, 4, 40, 12], "label": 3})
    assert r.status_code == 200, r.text
    assert (st.mask_slice(5) == 3).sum() == r.json()["pixels"] > 0  # the label is this answer alone
    assert not (st.mask_slice(5)[:3, :3] == 3).any()
    assert client.post(f"/api/studies/{sid}/undo").status_code == 200
    assert np.array_equal(st.mask_slice(5), before)  # undo brings the piece back


def _upload(client, path: Path):
    return client.post("/api/studies", files=[("files", (path.name, path.read_bytes()))])


def test_upload_slices_incontext_undo_download(client, data):
    _, support, study, truth = data
    r = _upload(client, study)
    assert r.status_code == 201, r.text
    info = r.json()
    sid, n = info["id"], info["slices"]
    assert len(sid) == 32 and info["presets"] and n == info["shape"][2]
    png = client.get(f"/api/studies/{sid}/slice/{n // 2}.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    r = client.post(f"/api/studies/{sid}/incontext", json={"support": "Dataset950_Support", "labels": [1],
                                                          "support_size": 8})
    assert r.status_code == 200, r.text
    assert r.json()["volumes_ml"].get("organ", 0) > 0
    r = client.post(f"/api/studies/{sid}/sam", json={"slice": n // 2, "box": [10, 10, 30, 30], "label": 2})
    assert r.status_code == 200, r.text
    assert client.post(f"/api/studies/{sid}/undo").json()["undo"] == 1
    d = client.get(f"/api/studies/{sid}/download?format=nifti")
    assert d.status_code == 200
    out = Path(data[0]) / "dl.nii.gz"
    out.write_bytes(d.content)
    m, ref = nib.load(out), nib.load(study)
    assert m.shape == ref.shape and np.allclose(m.affine, ref.affine)  # the input's geometry, oblique included
    pred = np.asarray(m.dataobj) == 1
    assert pred.any() and (pred & (truth == 1)).sum() > 0.3 * pred.sum()


def test_bad_uploads_answer_4xx_and_service_stays_up(client, data):
    r = client.post("/api/studies", files=[("files", ("scan.nii.gz", b"definitely not an image"))])
    assert r.status_code == 400 and "scan.nii.gz" in r.json()["detail"]
    r = client.post("/api/studies", files=[("files", ("big.nii", b"\0" * (3 * 1024 * 1024)))])
    assert r.status_code == 413
    # a PNG named .nii is read by content, not by its extension
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 255).astype(np.uint8)).save(buf, format="PNG")
    r = client.post("/api/studies", files=[("files", ("really_a_png.nii", buf.getvalue()))])
    assert r.status_code == 201 and r.json()["slices"] == 1
    assert client.get("/api/studies/..%2F..%2Fetc/slice/0.png").status_code == 404  # ids, never paths
    assert client.get("/api/studies/" + "0" * 32).status_code == 404
    assert client.post(f"/api/studies/{r.json()['id']}/incontext", json={"support": "../../etc"}).status_code == 404
    assert client.get("/api/resources").status_code == 200


def test_concurrent_requests_keep_studies_apart(client, data):
    from concurrent.futures import ThreadPoolExecutor

    _, _, study, _ = data
    ids = [_upload(client, study).json()["id"] for _ in range(2)]

    def prompt(args):
        sid, lab = args
        return client.post(f"/api/studies/{sid}/sam", json={"slice": 5, "box": [5, 5, 30, 30], "label": lab}).status_code

    with ThreadPoolExecutor(4) as ex:
        codes = list(ex.map(prompt, [(ids[0], 3), (ids[1], 4)] * 3))
    assert set(codes) == {200}
    a = set(client.get(f"/api/studies/{ids[0]}").json()["labels"])
    b = set(client.get(f"/api/studies/{ids[1]}").json()["labels"])
    assert "4" not in a and "3" not in b


@pytest.mark.skipif(chromium_path() is None, reason="Debian chromium not installed (make install adds it)")
def test_browser_box_and_example_set(data, tmp_path):
    from playwright.sync_api import sync_playwright

    from medfound.viewer.browser import drag_box, open_page, served, wait_status

    root, support, study, _ = data
    with served(tmp_path, "--support", str(support)) as url, sync_playwright() as p:  # plain serve: shipped SAM
        browser, page = open_page(p, url)
        page.set_input_files("#study-file", str(study))
        page.click("#upload")
        wait_status(page, "upload: done", 30000)
        assert "medfound default" in page.locator("#sam-note").inner_text()
        drag_box(page)  # SAM answers and the overlay is redrawn
        wait_status(page, "SAM box: done", 30000)
        first = int(page.locator("#view").get_attribute("data-mask-pixels"))
        assert first > 0
        drag_box(page, (0.75, 0.75), (0.95, 0.95), shift=True)  # another piece: the first one stays
        wait_status(page, "SAM box, another piece: done", 30000)
        assert int(page.locator("#view").get_attribute("data-mask-pixels")) >= first
        page.select_option("#support", "Dataset950_Support")
        page.click("#incontext")
        wait_status(page, "example set: done", 180000)  # four labels, mirrored and refined: ~30 s on 2 busy cores
        assert int(page.locator("#view").get_attribute("data-mask-pixels")) > 0
        assert "organ" in page.locator("#volumes").inner_text()
        with page.expect_download() as dl:
            page.click("#download")
        path = tmp_path / "browser_mask.nii.gz"
        dl.value.save_as(path)
        browser.close()
    m, ref = nib.load(path), nib.load(study)
    assert m.shape == ref.shape and np.allclose(m.affine, ref.affine)
    assert (np.asarray(m.dataobj) > 0).any()


def test_dicom_series_upload_and_dicom_seg_download(client, tmp_path):
    import pydicom
    from helpers import write_dicom_series

    image, _ = make_phantom("CT", shape=(40, 36, 10), seed=5)
    image = image.with_array(image.array.astype(np.int16))
    files = write_dicom_series(image, tmp_path / "series", names={k: f"x{(k * 7) % 10}.dcm" for k in range(10)})
    r = client.post("/api/studies", files=[("files", (f.name, f.read_bytes())) for f in files])
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["format"] == "dicom" and info["slices"] == 10 and "lung" in info["presets"]
    sid = info["id"]
    r = client.post(f"/api/studies/{sid}/sam", json={"slice": 5, "points": [[20, 18, 1]], "label": 1})
    assert r.status_code == 200, r.text
    if r.json()["pixels"] == 0:  # the random tiny SAM may answer a point with nothing: a slice-wide box then
        r = client.post(f"/api/studies/{sid}/sam", json={"slice": 5, "box": [1, 1, 39, 35], "label": 1})
    if r.json()["pixels"] == 0:  # still nothing: paint from the example set so the SEG has a segment
        r = client.post(f"/api/studies/{sid}/incontext", json={"support": "Dataset950_Support", "labels": [1]})
    assert client.get(f"/api/studies/{sid}").json()["volumes_ml"], r.text
    d = client.get(f"/api/studies/{sid}/download?format=dicom-seg")
    assert d.status_code == 200, d.text
    seg = pydicom.dcmread(io.BytesIO(d.content))
    assert seg.Modality == "SEG" and len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) >= 1
    nifti = client.get(f"/api/studies/{sid}/download?format=nifti")
    assert nifti.status_code == 200 and nifti.content[:2] == b"\x1f\x8b"
    assert client.get(f"/api/studies/{sid}/download?format=stl").status_code == 400


def test_uploaded_example_set_segments_a_study(client, data, tmp_path):
    from medfound.io import write_image

    _, _, study, _ = data
    image, label = make_phantom("MR", shape=(48, 44, 16), seed=21)
    write_image(image, tmp_path / "img.nii.gz")
    write_image(image.with_array(label), tmp_path / "msk.nii.gz")
    r = client.post("/api/supports", files=[("images", ("img.nii.gz", (tmp_path / "img.nii.gz").read_bytes())),
                                            ("masks", ("msk.nii.gz", (tmp_path / "msk.nii.gz").read_bytes()))])
    assert r.status_code == 201, r.text
    sid = _upload(client, study).json()["id"]
    r2 = client.post(f"/api/studies/{sid}/incontext", json={"support": r.json()["id"], "labels": [1], "support_size": 4})
    assert r2.status_code == 200 and r2.json()["volumes_ml"], r2.text
    bad = client.post("/api/supports", files=[("images", ("img.nii.gz", b"junk")),
                                              ("masks", ("msk.nii.gz", (tmp_path / "msk.nii.gz").read_bytes()))])
    assert bad.status_code == 400 and "img.nii.gz" in bad.json()["detail"]

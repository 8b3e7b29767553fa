"""The user's own archive against a real PACS (Orthanc + DICOMweb): read, push back as DICOM-SEG,
batch a query; DICOM-SEG checked by independent readers (dciodvfy, highdicom, dcmqi)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import run_cli as cli
from conftest import run_cli_subprocess
from helpers import write_dicom_series
from pacs import PASSWORD, USER, orthanc, proxy, self_signed, why_no_orthanc

from medfound.io import read_image

pytestmark = pytest.mark.skipif(why_no_orthanc() is not None, reason=why_no_orthanc() or "")
BIN = Path(sys.executable).parent


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("medfound: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, samples):
    """Orthanc holding two CT series (phantoms, written as DICOM) and one corrupt series; the
    environment carries the test user's credentials and a private cache."""
    from medfound.io.dicomweb import parse, store

    root = tmp_path_factory.mktemp("pacs")
    env = {"MEDFOUND_DICOMWEB_USER": USER, "MEDFOUND_DICOMWEB_PASSWORD": PASSWORD,
           "MEDFOUND_CACHE": str(root / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    images = samples / "Dataset100_Phantoms" / "imagesTr"
    series = {}
    with orthanc(root / "orthanc") as server:
        ref = parse(server.root)
        for name in ("phantom_ct_001", "phantom_ct_002", "corrupt"):
            src = read_image(images / f"{'phantom_ct_000' if name == 'corrupt' else name}_0000.nii.gz")
            files = write_dicom_series(src.with_array(np.clip(src.array, -1024, 3000).astype(np.int16)), root / name)
            if name == "corrupt":  # one slice's pixel data cut to a third: the PACS takes it, no reader can
                ds = pydicom.dcmread(files[3])
                ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
                ds.save_as(files[3])
            store(ref, files)
            first = pydicom.dcmread(files[0])
            series[name] = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID), root / name)
        # a real CT (pyradiomics' lung case) from another year, outside the batch query's dates
        ct = read_image(samples / "Dataset002_Lesions" / "imagesTr" / "lung2_0000.nii.gz")
        files = write_dicom_series(ct.with_array(np.asarray(ct.array).astype(np.int16)), root / "lung2")
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyDate = "20190101"
            ds.save_as(f)
        store(ref, files)
        first = pydicom.dcmread(files[0])
        series["lung2"] = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID), root / "lung2")
        yield server, series, env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_segment_push_dicom_seg_checked_by_three_readers(pacs, samples, tmp_path):
    server, series, env = pacs
    study, uid, local = series["phantom_ct_002"]
    url = f"{server.root}/studies/{study}"
    support = samples / "Dataset100_Phantoms"
    r = cli("segment", "--support", support, "--label", "organ", "--input", url, "--output", tmp_path / "out",
            "--push", "--rtstruct", "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    nifti, seg = tmp_path / "out" / f"{uid}.nii.gz", tmp_path / "out" / f"{uid}_seg.dcm"
    assert nifti.is_file() and seg.is_file() and "stored in the PACS" in r.stdout
    # in the PACS: a SEG series in the same study that references the source series
    from medfound.io.dicomweb import client, parse

    web = client(parse(server.root))
    segs = web.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
    assert len(segs) == 1
    assert len(web.search_for_series(study_instance_uid=study, search_filters={"Modality": "RTSTRUCT"})) == 1
    # the study now holds results too; as an input it is still its one image series
    from medfound.io.read import inputs_of

    assert [case for case, _ in inputs_of(url)] == [uid]
    seg_uid = segs[0]["0020000E"]["Value"][0]
    stored = next(iter(web.iter_series(study, seg_uid)))
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    source = pydicom.dcmread(sorted(local.iterdir())[0], stop_before_pixels=True)
    assert stored.FrameOfReferenceUID == source.FrameOfReferenceUID
    algo = stored.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "medfound" in str(algo.AlgorithmName) and str(algo.AlgorithmVersion)
    assert stored.SegmentSequence[0].SegmentLabel == "organ"
    stored_file = tmp_path / "stored_seg.dcm"
    stored.save_as(stored_file, enforce_file_format=True)
    mask = np.asarray(read_image(nifti).array) > 0
    assert mask.any()
    # dciodvfy (dicom3tools) and dcmqi's segimage2itkimage, voxel for voxel against the NIfTI output
    _check_seg_with_dcmqi(stored_file, nifti, tmp_path / "dcmqi")
    # highdicom, frames matched to the source images by SOP Instance UID
    from medfound.io.dicomseg import read_dicom_seg

    back, names = read_dicom_seg(stored_file, read_image(local))
    assert names == {1: "organ"} and np.array_equal(back > 0, mask)
    # the pushed SEG is an example set straight from the PACS (the series it references comes with it)
    other_study, other_uid, _ = series["phantom_ct_001"]
    r = cli("segment", "--support", f"{url}/series/{seg_uid}", "--input", f"{server.root}/studies/{other_study}/series/{other_uid}",
            "--output", tmp_path / "from_pacs", "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.asarray(read_image(tmp_path / "from_pacs" / f"{other_uid}.nii.gz").array).any()


def _check_seg_with_dcmqi(seg_file: Path, nifti: Path, tmp: Path) -> None:
    """dciodvfy finds no error, and dcmqi's segimage2itkimage gives the NIfTI mask's voxels back."""
    if shutil.which("dciodvfy"):
        v = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True)
        assert "Error" not in v.stdout + v.stderr, (v.stdout + v.stderr)[-2000:]
    tmp.mkdir()
    c = subprocess.run([str(BIN / "segimage2itkimage"), "--inputDICOM", str(seg_file), "--outputDirectory", str(tmp),
                        "-t", "nifti"], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr[-2000:]
    out, ours = read_image(tmp / "1.nii.gz"), read_image(nifti)
    assert out.shape == ours.shape and np.abs(out.affine - ours.affine).max() < 1e-4
    assert np.array_equal(np.asarray(out.array) > 0, np.asarray(ours.array) > 0)


def test_sam_box_on_a_real_ct_pushed_back(pacs, samples, tmp_path):
    server, series, env = pacs
    study, uid, local = series["lung2"]
    lesion = np.asarray(read_image(samples / "Dataset002_Lesions" / "labelsTr" / "lung2.nii.gz").array) > 0
    k = int(np.argmax(lesion.sum(axis=(0, 1))))
    ii, jj = np.nonzero(lesion[:, :, k])
    box = f"{ii.min() - 3},{jj.min() - 3},{ii.max() + 3},{jj.max() + 3}"
    r = cli("sam", "segment", "--input", f"{server.root}/studies/{study}/series/{uid}", "--box", box, "--slice", k,
            "--output", tmp_path / "out", "--push", "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stored in the PACS" in r.stdout
    nifti, seg = tmp_path / "out" / f"{uid}.nii.gz", tmp_path / "out" / f"{uid}_seg.dcm"
    mask = np.asarray(read_image(nifti).array) > 0
    assert mask[:, :, k].any() and (mask & lesion).sum() > 0.3 * lesion[:, :, k].sum()
    _check_seg_with_dcmqi(seg, nifti, tmp_path / "dcmqi")


def test_inspect_and_ingest_from_the_pacs(pacs, tmp_path):
    server, series, env = pacs
    study, uid, local = series["phantom_ct_001"]
    r = cli("data", "inspect", f"{server.root}/studies/{study}", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert '"shape"' in r.stdout and str(read_image(local).shape[2]) in r.stdout
    r = cli("data", "ingest", f"ct:{server.root}?Modality=CT", "--output", tmp_path / "pool", "--image-size", "32", env=env)
    assert r.returncode == 0, r.stderr
    assert "images" in r.stdout and "1 file(s) skipped" in r.stdout  # the corrupt slice, named in the manifest


def test_bad_dicomweb_sources_are_one_line_errors(pacs, tmp_path):
    server, series, env = pacs
    study, uid, _ = series["phantom_ct_001"]
    url = f"{server.root}/studies/{study}/series/{uid}"
    out = tmp_path / "out"
    fresh = env | {"MEDFOUND_CACHE": str(tmp_path / "cache")}
    cases = [
        (fresh | {"MEDFOUND_DICOMWEB_PASSWORD": "wrong"}, url, ["HTTP 401", url]),
        (fresh, f"{server.root}/studies/1.2.3.4.5", ["no such study"]),
        (fresh, f"{server.root}/studies/{study}/series/1.2.3.4.5", ["no such series"]),
        (fresh, url.replace(f":{server.port}/", ":9/"), ["cannot connect"]),
        (fresh, url.replace("dicomweb+http://", f"dicomweb+http://{USER}:{PASSWORD}@"), ["credentials in the address"]),
    ]
    for e, source, words in cases:
        r = cli("sam", "segment", "--input", source, "--box", "10,10,30,30", "--slice", "3", "--output", out, env=e)
        one_line_error(r, *words)
        assert PASSWORD not in r.stderr and not out.exists()
    # a retrieve cut off half way: reported, and nothing half-written is left in the cache
    with proxy(server.port, cut=True) as port:
        cut = url.replace(f":{server.port}/", f":{port}/")
        r = cli("sam", "segment", "--input", cut, "--box", "10,10,30,30", "--slice", "3", "--output", out, env=fresh)
    one_line_error(r, "truncated")
    assert not out.exists()
    assert not any(p.name == ".complete" for p in (tmp_path / "cache").rglob("*"))
    assert not [p for p in (tmp_path / "cache" / "dicomweb").iterdir() if not p.name.startswith(".")]
    # --push needs a PACS to push to
    r = cli("predict", "--model", tmp_path, "--input", tmp_path, "--output", out, "--push", env=fresh)
    one_line_error(r, "--push")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (for a test certificate)")
def test_dicomweb_over_https(pacs, tmp_path):
    server, series, env = pacs
    study, uid, local = series["phantom_ct_001"]
    server_pem, ca = self_signed(tmp_path / "tls")
    with proxy(server.port, certificate=server_pem) as port:
        url = f"dicomweb+https://127.0.0.1:{port}/dicom-web/studies/{study}/series/{uid}"
        fresh = env | {"MEDFOUND_CACHE": str(tmp_path / "cache")}
        one_line_error(cli("data", "inspect", url, env=fresh), "certificate", "REQUESTS_CA_BUNDLE")
        r = cli("data", "inspect", url, "--json", env=fresh | {"REQUESTS_CA_BUNDLE": str(ca)})
        assert r.returncode == 0, r.stderr
        assert str(list(read_image(local).shape)).replace(" ", "") in r.stdout.replace(" ", "").replace("\n", "")


def test_batch_survives_a_bad_series_resumes_and_runs_on_dask(pacs, samples, tmp_path):
    server, series, env = pacs
    query = f"{server.root}?Modality=CT&StudyDate=20250101-20271231"
    support = samples / "Dataset100_Phantoms"
    args = ["--query", query, "--support", support, "--label", "organ", "--support-size", "4"]
    r = cli("batch", "segment", *args, "--out", tmp_path / "b", "--workers", "2", env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    rows = {row["series_uid"]: row for row in csv.DictReader(open(tmp_path / "b" / "batch.csv"))}
    bad = series["corrupt"][1]
    assert len(rows) == 3 and rows[bad]["status"] == "failed" and "pixel data" in rows[bad]["error"]
    assert f"{bad}" in r.stderr and "2 series done, 1 failed" in r.stderr
    good = [u for u in rows if u != bad]
    for u in good:
        assert rows[u]["status"] == "done" and (tmp_path / "b" / u / f"{u}_seg.dcm").is_file()
    # a rerun does only the failed one
    r = cli("batch", "segment", *args, "--out", tmp_path / "b", env=env)
    assert r.returncode == 2 and "1 series to run, 2 done before" in r.stderr, r.stderr[-2000:]
    again = {row["series_uid"]: row for row in csv.DictReader(open(tmp_path / "b" / "batch.csv"))}
    assert all(again[u]["seconds"] == rows[u]["seconds"] for u in good)
    # the same batch on a Dask cluster of two local workers: same masks
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        # a fresh interpreter: a process forked from this one would inherit the cluster's event loop
        r = run_cli_subprocess("batch", "segment", *args, "--out", tmp_path / "d", "--scheduler",
                               cluster.scheduler_address, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    dask_rows = {row["series_uid"]: row for row in csv.DictReader(open(tmp_path / "d" / "batch.csv"))}
    assert {u: r_["status"] for u, r_ in dask_rows.items()} == {u: r_["status"] for u, r_ in rows.items()}
    for u in good:
        a = np.asarray(read_image(tmp_path / "b" / u / f"{u}.nii.gz").array)
        b = np.asarray(read_image(tmp_path / "d" / u / f"{u}.nii.gz").array)
        assert np.array_equal(a, b)


def test_viewer_opens_a_series_from_the_pacs(pacs, tmp_path):
    from fastapi.testclient import TestClient

    from medfound.viewer.app import create_app

    server, series, env = pacs
    study, uid, local = series["phantom_ct_001"]
    app = create_app(tmp_path / "work", sam="tiny", pacs=server.root)
    client = TestClient(app, headers={"x-medfound-token": app.state.token})
    assert client.get("/api/resources").json()["pacs"] is True
    listed = client.get("/api/pacs/series", params={"study": study}).json()["series"]
    assert [s["series_uid"] for s in listed] == [uid] and listed[0]["modality"] == "CT"
    r = client.post("/api/pacs/open", json={"study": study, "series": uid})
    assert r.status_code == 201, r.text
    assert tuple(r.json()["shape"]) == read_image(local).shape
    # only UIDs reach the PACS's address; unknown ones are the PACS's one-line answer
    assert client.post("/api/pacs/open", json={"study": "../../x", "series": uid}).status_code == 400
    r = client.post("/api/pacs/open", json={"study": study, "series": "1.2.3.4"})
    assert r.status_code == 400 and "no such series" in r.json()["detail"]
    bare = create_app(tmp_path / "work2", sam="tiny")
    assert TestClient(bare).get("/api/pacs/series", params={"study": study}).status_code == 404

"""The viewer as a hostile client would try it: oversized bodies, decompression bombs, bad prompts,
malformed JSON, forged hosts and cross-origin posts, leaked paths. Each answers 4xx and changes nothing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfound.data.phantoms import make_phantom


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from medfound.data.nnunet import write_dataset
    from medfound.io import write_image

    root = tmp_path_factory.mktemp("vsafe")
    image, label = make_phantom("MR", shape=(40, 36, 10), seed=4)
    image.format = "nifti"
    write_image(image, root / "study.nii.gz")
    write_image(image.with_array(label.astype(np.uint8)), root / "mask.nii.gz")
    support = write_dataset(root / "Dataset960_S", [("c0", image, label)],
                            {"background": 0, "organ": 1, "kidney": 2, "lesion": 3, "bone": 4}, {"0": "MR"}).root
    return root, support


def _app(tmp_path, support=None, **kw):
    from fastapi.testclient import TestClient

    from medfound.viewer.app import create_app

    kw.setdefault("max_upload_mb", 1)
    app = create_app(tmp_path / "work", supports=[support] if support else None, sam="tiny", **kw)
    return app, TestClient(app, headers={"x-medfound-token": app.state.token})


def _upload(client, path: Path, name: str | None = None):
    return client.post("/api/studies", files=[("files", (name or path.name, path.read_bytes()))])


def _no_server_paths(r, tmp_path):
    assert str(tmp_path) not in r.text and "/work" not in r.json()["detail"], r.text


# 4. The upload cap acts before the body is read.

def test_upload_cap_from_content_length_and_while_streaming(files, tmp_path):
    _, client = _app(tmp_path)
    sent = []

    def body(chunks=60):
        for _ in range(chunks):
            sent.append(1)
            yield b"\0" * 2**20

    r = client.post("/api/studies", content=body(), headers={"content-length": str(60 * 2**20),
                                                             "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and len(sent) <= 1  # refused from the header: the body is not read
    # Streamed without a length (chunked): driven at the ASGI level, since the test client reads bodies whole.
    import asyncio

    app, _ = _app(tmp_path / "stream")
    pulled, replies = [], []

    head = b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.nii"\r\n\r\n'

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": (head if len(pulled) == 1 else b"") + b"\0" * 2**20,
                "more_body": len(pulled) < 60}

    async def send(message):
        replies.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/studies", "raw_path": b"/api/studies", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"x-medfound-token", app.state.token.encode()),
                         (b"content-type", b"multipart/form-data; boundary=x")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    assert replies[0]["status"] == 413 and len(pulled) < 5, len(pulled)  # reading stopped at the cap


# 5. Voxels, memory, undo, closing and expiry.

def test_voxel_cap_memory_budget_delete_and_expiry(files, tmp_path):
    root, _ = files
    bomb = tmp_path / "bomb.nii.gz"  # 3 KB on disk, 64^3 voxels unpacked
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4)), str(bomb))
    app, client = _app(tmp_path, max_voxels=100_000)
    r = _upload(client, bomb)
    assert r.status_code == 400 and "limit of 100,000 voxels" in r.json()["detail"]
    assert not any((tmp_path / "work" / "studies").iterdir())
    sid = _upload(client, root / "study.nii.gz").json()["id"]
    assert (tmp_path / "work" / "studies" / sid).is_dir()
    assert client.delete(f"/api/studies/{sid}").status_code == 200
    assert client.get(f"/api/studies/{sid}").status_code == 404 and not (tmp_path / "work" / "studies" / sid).exists()
    # memory budget: one study fits, a second does not
    sid = _upload(client, root / "study.nii.gz").json()["id"]
    study_mb = app.state.store.nbytes / 2**20
    app2, client2 = _app(tmp_path / "b", memory_mb=study_mb * 1.5)
    assert _upload(client2, root / "study.nii.gz").status_code == 201
    r = _upload(client2, root / "study.nii.gz")
    assert r.status_code == 400 and "memory budget" in r.json()["detail"]
    # idle expiry
    app3, client3 = _app(tmp_path / "c", idle_minutes=0.5 / 60)
    sid = _upload(client3, root / "study.nii.gz").json()["id"]
    time.sleep(0.8)
    assert client3.get(f"/api/studies/{sid}").status_code == 404


def test_undo_keeps_only_the_touched_slice(files, tmp_path):
    root, _ = files
    app, client = _app(tmp_path)
    sid = _upload(client, root / "study.nii.gz").json()["id"]
    for k in range(3):
        assert client.post(f"/api/studies/{sid}/sam", json={"slice": k, "box": [5, 5, 30, 30]}).status_code == 200
    st = app.state.store.get(sid)
    assert len(st.undo) == 3 and all(u.slices == [k] for k, u in enumerate(st.undo))
    before = st.mask.copy()
    st.mask[:, :, 1] = 7
    assert client.post(f"/api/studies/{sid}/undo").status_code == 200  # undoes slice 2's prompt only
    assert (st.mask[:, :, 1] == 7).all() and not st.mask[:, :, 2].any() and (st.mask[:, :, 0] == before[:, :, 0]).all()


# 6-8. Prompts and request bodies.

BAD_PROMPTS = [{"slice": 3, "box": [500, 500, 600, 600]}, {"slice": 3, "box": [30, 30, 5, 5]},
               {"slice": 3, "points": [[500, 4, 1]]}, {"slice": 3, "box": [5, 5, 30, 30], "points": [[4, 4, 2]]}]


@pytest.mark.parametrize("body", BAD_PROMPTS, ids=["outside", "inverted", "point-outside", "point-label"])
def test_invalid_prompt_is_400_and_keeps_the_drawn_label(files, tmp_path, body):
    root, _ = files
    _, client = _app(tmp_path)
    sid = _upload(client, root / "study.nii.gz").json()["id"]
    ok = client.post(f"/api/studies/{sid}/sam", json={"slice": 3, "box": [2, 2, 35, 33], "label": 1})
    assert ok.status_code == 200 and ok.json()["undo"] == 1
    drawn = client.get(f"/api/studies/{sid}/mask/3.png").content
    r = client.post(f"/api/studies/{sid}/sam", json=body)
    assert r.status_code == 400, r.text
    assert client.get(f"/api/studies/{sid}/mask/3.png").content == drawn
    assert client.get(f"/api/studies/{sid}").json()["undo"] == 1


MALFORMED = [('{"slice": 3, "box": [1, 2, 3]}', "sam"), ('{"slice": 3, "box": [1, 2, 3, 4, 5]}', "sam"),
             ('{"slice": 3, "box": []}', "sam"), ('{"slice": 3, "points": [[1, 2]]}', "sam"),
             ('{"slice": 3, "points": [[1, 2, NaN]]}', "sam"), ('{"slice": NaN, "box": [1, 2, 3, 4]}', "sam"),
             ('{"slice": 3, "box": [NaN, 2, 3, 4]}', "sam"), ('{"slice": 3, "box": [1, 2, Infinity, 4]}', "sam"),
             ('{"support": "Dataset960_S", "support_size": -5}', "incontext"),
             ('{"support": "Dataset960_S", "support_size": 0}', "incontext"),
             ('{"support": "Dataset960_S", "support_size": 1000000000}', "incontext"),
             ('{"model": NaN}', "predict"), ("not json", "sam")]


def test_malformed_bodies_are_4xx_never_500(files, tmp_path):
    root, support = files
    _, client = _app(tmp_path, support)
    sid = _upload(client, root / "study.nii.gz").json()["id"]
    for body, endpoint in MALFORMED:
        r = client.post(f"/api/studies/{sid}/{endpoint}", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), (body, r.status_code, r.text)
        assert isinstance(r.json()["detail"], str) and "NaN" not in r.json()["detail"]
    assert client.get(f"/api/studies/{sid}").json()["undo"] == 0


# 9-11. Uploaded files: validated like `data check`, named by the client's names, nothing else.

def test_support_masks_validated_as_data_check(files, tmp_path):
    root, _ = files
    _, client = _app(tmp_path)
    img = nib.load(root / "study.nii.gz")
    lab = np.asarray(nib.load(root / "mask.nii.gz").dataobj)
    cases = {"negative": (lab.astype(np.int16) - 3, img.affine), "fraction": (lab + 0.5, img.affine),
             "moved": (lab, img.affine @ np.diag([1, 1, 1.2, 1]))}
    for name, (arr, affine) in cases.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32 if name == "fraction" else arr.dtype), affine), str(path))
        r = client.post("/api/supports", files=[("images", ("img.nii.gz", (root / "study.nii.gz").read_bytes())),
                                                ("masks", (path.name, path.read_bytes()))])
        assert r.status_code == 400 and path.name in r.json()["detail"], (name, r.text)
        _no_server_paths(r, tmp_path)


def test_errors_name_client_files_only(files, tmp_path, pydicom_files):
    from helpers import write_dicom_series

    _, client = _app(tmp_path)
    r = client.post("/api/studies", files=[("files", ("", b"\x89PNG garbage" * 50))])
    assert r.status_code in (400, 422) and len(r.text) < 400 and "garbage" not in r.text
    image, _ = make_phantom("CT", shape=(32, 30, 6), seed=1)
    series = write_dicom_series(image.with_array(image.array.astype(np.int16)), tmp_path / "s")
    parts = [(f.name, f.read_bytes()) for f in series]
    parts[3] = (parts[3][0], parts[3][1][:-3000])  # one damaged slice in the middle of the series
    r = client.post("/api/studies", files=[("files", p) for p in parts])
    assert r.status_code == 400 and series[3].name in r.json()["detail"], r.text
    _no_server_paths(r, tmp_path)
    parts = [(f.name, f.read_bytes()) for f in series] + [("readme.txt", b"hello"), ("thumbs.db", b"\0\1")]
    r = client.post("/api/studies", files=[("files", p) for p in parts])
    assert r.status_code == 201 and r.json()["ignored_files"] == ["readme.txt", "thumbs.db"], r.text


# 12. Host header and cross-origin posts.

def test_host_and_token_checked(files, tmp_path):
    root, _ = files
    app, client = _app(tmp_path, allowed_hosts=["127.0.0.1", "localhost"])
    data = (root / "study.nii.gz").read_bytes()
    ok = client.post("/api/studies", files=[("files", ("s.nii.gz", data))], headers={"host": "127.0.0.1:8000"})
    assert ok.status_code == 201
    evil = client.get("/api/resources", headers={"host": "evil.example:8000"})
    assert evil.status_code == 400
    from fastapi.testclient import TestClient

    bare = TestClient(app)  # a cross-origin form post carries no token
    r = bare.post("/api/studies", files=[("files", ("s.nii.gz", data))], headers={"host": "localhost"})
    assert r.status_code == 403
    r = bare.post("/api/studies", files=[("files", ("s.nii.gz", data))],
                  headers={"host": "localhost", "x-medfound-token": "guess"})
    assert r.status_code == 403
    page = bare.get("/", headers={"host": "localhost"}).text
    assert app.state.token in page  # the viewer's own page carries it


# 18. No page that needs the internet.

def test_api_docs_page_not_served_but_schema_is(tmp_path):
    _, client = _app(tmp_path)
    assert client.get("/api/docs").status_code == 404
    assert client.get("/api/openapi.json").json()["info"]["title"] == "medfound viewer"


# 13. The temporary work folder goes when the server stops.

def test_serve_removes_its_temporary_workdir_on_shutdown(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "medfound", "serve", "--port", str(port), "--sam-model", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        work = Path(line.split("(studies in ")[1].rstrip(")\n"))
        assert work.is_dir()
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/resources", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not work.exists()

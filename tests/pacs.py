"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin on 127.0.0.1, a free port, a
temporary storage folder and a generated configuration (authentication on, one test user); and a
proxy in front of it that cuts retrieve responses short, to test truncated transfers."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER, PASSWORD = "medfound", "s3cret-test"


def dicomweb_plugin() -> Path | None:
    for d in PLUGIN_DIRS:
        for f in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return f
    return None


def why_no_orthanc() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else the reason to skip."""
    if not Path(ORTHANC).is_file():
        return "Orthanc is not installed (Debian package orthanc; `make install` adds it where apt is available)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pacs:
    port: int
    folder: Path

    @property
    def root(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def rest(self, path: str) -> object:
        """GET Orthanc's own REST API (as the test user)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        mgr = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        mgr.add_password(None, f"http://127.0.0.1:{self.port}/", USER, PASSWORD)
        opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(mgr))
        with opener.open(req, timeout=20) as r:
            return json.loads(r.read())


@contextlib.contextmanager
def orthanc(folder: Path) -> Iterator[Pacs]:
    """Start Orthanc on a free loopback port; stop it (and nothing else) afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "medfound-tests", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": port, "RemoteAccessAllowed": False, "DicomServerEnabled": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(dicomweb_plugin())], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "OrthancExplorerEnabled": False, "WebDavEnabled": False, "HttpCompressionEnabled": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = open(folder / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    pacs = Pacs(port, folder)
    try:
        for _ in range(200):
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                pacs.rest("/system")
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("Orthanc did not answer within 10 s")
        yield pacs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def truncating_proxy(upstream_port: int) -> Iterator[int]:
    """A loopback HTTP proxy to ``upstream_port`` that passes searches through and sends only half of
    every retrieve (WADO-RS) body, with the full Content-Length, then hangs up."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
            req = urllib.request.Request(f"http://127.0.0.1:{upstream_port}{self.path}", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=20) as r:
                    status, head, body = r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                status, head, body = e.code, e.headers, e.read()
            self.send_response(status)
            for k, v in head.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = "/series/" in self.path and "/instances" not in self.path and status == 200
            self.wfile.write(body[: len(body) // 2] if cut else body)
            self.wfile.flush()
            if cut:
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()

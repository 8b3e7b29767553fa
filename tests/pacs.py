"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin on 127.0.0.1, a free port, a
temporary storage folder and a generated configuration (authentication on, one test user); and a
proxy in front of it that speaks HTTPS, or cuts retrieve responses short to test truncated transfers."""

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
def proxy(upstream_port: int, cut: bool = False, certificate: Path | None = None) -> Iterator[int]:
    """A loopback HTTP proxy to ``upstream_port``; with ``cut`` it sends only half of every retrieve
    (WADO-RS) body, with the full Content-Length, then hangs up; with ``certificate`` (a PEM holding the
    certificate and its key) it speaks HTTPS, as a TLS-terminating front of a PACS does."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self, method: str):
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
            data = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0)) if method == "POST" else None
            req = urllib.request.Request(f"http://127.0.0.1:{upstream_port}{self.path}", data=data, headers=headers,
                                         method=method)
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
            chop = cut and "/series/" in self.path and "/instances" not in self.path and status == 200
            if chop:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if chop else body)
            self.wfile.flush()
            if chop:
                self.close_connection = True

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._forward("GET")

        def do_POST(self):  # noqa: N802
            self._forward("POST")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if certificate is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(certificate))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(PEM of certificate + key for the server, PEM of the certificate for clients) for 127.0.0.1."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    both = folder / "server.pem"
    both.write_text(cert.read_text() + key.read_text())
    return both, cert

"""Drive the viewer page in Debian's headless Chromium through Playwright (no browser download):
what the browser tests and the demo's screenshot share."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or (("/usr/bin/chromium") if Path("/usr/bin/chromium").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(workdir: Path, *serve_args: str, timeout: float = 120):
    """``medfound serve`` in a subprocess on a free local port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medfound", "serve", "--port", str(port), "--workdir", str(workdir),
                             *serve_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > timeout:
                    raise RuntimeError(f"medfound serve did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_status(page, text: str, timeout_ms: int = 120000) -> None:
    """Wait until the page's status line reports ``text`` (actions end with '<name>: done in ...')."""
    page.wait_for_function(f"document.getElementById('status').textContent.includes({text!r})", timeout=timeout_ms)


def open_page(playwright, url: str):
    browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
    page = browser.new_page(viewport={"width": 1200, "height": 860})
    page.goto(url)
    return browser, page


def drag_box(page, frac0=(0.3, 0.3), frac1=(0.7, 0.7), shift: bool = False) -> None:
    """Drag a box over the slice between two fractions of its size; ``shift`` holds Shift (another piece)."""
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + box["width"] * frac0[0], box["y"] + box["height"] * frac0[1])
    if shift:
        page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * frac1[0], box["y"] + box["height"] * frac1[1], steps=5)
    page.mouse.up()
    if shift:
        page.keyboard.up("Shift")


def screenshot_example_set(workdir: Path, study: Path, support: Path, out_png: Path, support_size: int = 8) -> Path:
    """Open ``study``, segment it from ``support`` on the page, and save a screenshot of the result."""
    from playwright.sync_api import sync_playwright

    with served(workdir, "--support", str(support)) as url, sync_playwright() as p:
        browser, page = open_page(p, url)
        page.set_input_files("#study-file", str(study))
        page.click("#upload")
        wait_status(page, "upload: done")
        page.select_option("#support", support.name)
        page.fill("#support-size", str(support_size))
        page.click("#incontext")
        wait_status(page, "example set: done", 600000)
        page.screenshot(path=str(out_png))
        browser.close()
    return out_png

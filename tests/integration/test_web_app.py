"""The browser page end to end: real TorchServe, the Streamlit app, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from testkit.harness import ROOT, VENV_BIN, Server, free_ports, missing_system_tool
from testkit.imaging import encode, lesion_rgb

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing_system_tool("Debian's chromium is needed for the browser test: sudo apt-get install -y chromium")
    return path


class Switch:
    """A TCP forwarder to the server that can be cut (connections refused) and restored: the endpoint
    going down and coming back, as the page sees it, without restarting TorchServe."""

    def __init__(self, target_port: int) -> None:
        self.port = free_ports(1)[0]
        self.target = target_port
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            if self.listener is not s:
                conn.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@dataclass
class App:
    url: str
    proc: subprocess.Popen[bytes]
    switch: Switch


@pytest.fixture(scope="module")
def app(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    switch = Switch(int(server.url.rsplit(":", 1)[1]))
    port = free_ports(1)[0]
    home = tmp_path_factory.mktemp("app-home")
    cmd = [str(VENV_BIN / "streamlit"), "run", "client/app.py", "--server.port", str(port), "--",
           "--url", f"http://127.0.0.1:{switch.port}", "--key-file", str(server.key_file)]
    log = open(home / "streamlit.log", "wb")
    env = {**os.environ, "HOME": str(home)}
    env.pop("TS_TOKEN", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/_stcore/health", timeout=2).text.strip() == "ok":
                break
        except requests.RequestException:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"streamlit did not start: {(home / 'streamlit.log').read_text()[-2000:]}")
    yield App(url, proc, switch)
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)
    switch.down()


def wait_for_probability(page, expected: float, timeout: float = 90) -> bool:  # noqa: ANN001
    """True once the page shows `expected` (to its 6 printed decimals). Streamlit keeps the previous
    run's elements on screen while it reruns, so the first .probability seen may be a stale one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(abs(float(v) - expected) <= 5e-7 for v in page.locator(".probability").all_inner_texts()):
            return True
        time.sleep(0.2)
    return False


def test_page_scores_like_the_api_and_keeps_the_key(app: App, server: Server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    good = encode(lesion_rgb(240, 320, seed=1))  # a photo whose demo heatmap is not empty
    later = encode(lesion_rgb(300, 400, seed=62))
    api = {k: server.predict(d).json()["probability"] for k, d in (("good", good), ("later", later))}
    keys = set(server.keys().values())
    frames: list[bytes] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 900, "height": 1300})
        page.on("websocket", lambda ws: ws.on(
            "framereceived", lambda f: frames.append(f if isinstance(f, bytes) else f.encode())))
        page.goto(app.url)
        page.get_by_text("Not a diagnostic device").wait_for(timeout=60_000)
        upload = page.locator('input[type="file"]')

        # 1. a photo: the page's probability is the API's for the same bytes, the heatmap is shown
        upload.set_input_files([{"name": "lesion.jpg", "mimeType": "image/jpeg", "buffer": good}])
        assert wait_for_probability(page, api["good"]), page.locator(".probability").all_inner_texts()
        text = page.inner_text("body")
        assert "DEMO MODEL" in text and "TTA views: 8" in text and "threshold 0.5" in text
        assert "0.0-demo" in text and "LayerCAM: " in text  # the overlay's caption names the archive's method
        page.get_by_role("img").nth(1).wait_for(timeout=30_000)  # photo + heatmap overlay
        screenshot = os.environ.get("WEB_APP_SCREENSHOT")
        if screenshot:
            page.screenshot(path=screenshot, full_page=True)

        # 2. a corrupt file: the endpoint's own message, no traceback
        upload.set_input_files([{"name": "broken.jpg", "mimeType": "image/jpeg",
                                 "buffer": b"\xff\xd8\xff\xe0 not really a jpeg"}])
        page.get_by_text("could not score this file").first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        assert "HTTP 400" in text and ("corrupt" in text or "unreadable image" in text)
        assert "Traceback" not in text

        # 3. the endpoint goes down: a clear message; it comes back: Retry scores the photo
        app.switch.down()
        upload.set_input_files([{"name": "later.jpg", "mimeType": "image/jpeg", "buffer": later}])
        page.get_by_text("did not answer").first.wait_for(timeout=60_000)
        assert "cannot connect" in page.inner_text("body")
        app.switch.up()
        page.get_by_role("button", name="Retry").first.click()
        assert wait_for_probability(page, api["later"]), page.locator(".probability").all_inner_texts()

        # 4. the key never reached the browser: not in the page, not in any websocket frame
        html = page.content()
        browser.close()
    for key in keys:
        assert key not in html
        assert not any(key.encode() in f for f in frames)
    assert frames, "no websocket traffic was captured: the key check would be vacuous"
    rss = psutil.Process(app.proc.pid).memory_info().rss / 2**20
    print(f"streamlit RSS after the session: {rss:.0f} MiB")


def test_app_listens_on_loopback_only(app: App) -> None:
    conns = [c for c in psutil.Process(app.proc.pid).net_connections("tcp") if c.status == "LISTEN"]
    assert conns and all(c.laddr.ip in ("127.0.0.1", "::1") for c in conns)
    assert re.search(r"maxUploadSize\s*=\s*26\b", (ROOT / ".streamlit" / "config.toml").read_text())

"""A model registration that names a host is refused by the server itself, before it connects anywhere (issue #40).
Java fetches a file: URL with a host over FTP (port 21), so the test listens on 127.0.0.1:21 and asserts that
nobody came, besides the server's refusal; the URL names no host outside loopback."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import requests

from testkit.harness import Server

pytestmark = pytest.mark.integration


class Listener:
    """Counts the connections made to 127.0.0.1:21 (FTP) while it runs; None when the port cannot be bound (it
    needs root or CAP_NET_BIND_SERVICE, or something else holds it)."""

    def __init__(self) -> None:
        self.connections = 0
        self.sock: socket.socket | None = socket.socket()
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 21))
            self.sock.listen(8)
            self.sock.settimeout(0.2)
        except OSError:
            self.sock.close()
            self.sock = None
            return
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()  # type: ignore[union-attr]
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        if self.sock is not None:
            self.stop.set()
            self.thread.join(timeout=5)
            self.sock.close()


def test_a_file_url_naming_a_host_is_refused_before_any_connection(server: Server, tmp_path: Path) -> None:
    store = tmp_path / "x" / "model_store"
    store.mkdir(parents=True)
    (store / "evil.mar").write_bytes(b"not fetched")
    headers = {"Authorization": f"Bearer {server.keys()['management']}"}
    listener = Listener()
    try:
        urls = [f"file://127.0.0.1{store}/evil.mar", f"FILE://localhost{store}/evil.mar"]
        answers = [requests.post(f"{server.management}/models", params={"url": u}, headers=headers, timeout=60)
                   for u in urls]
    finally:
        listener.close()
    for url, r in zip(urls, answers, strict=True):
        assert r.status_code in (400, 404) and "does not match any allowed URL" in r.text, (url, r.status_code, r.text)
    if listener.sock is None:
        print("127.0.0.1:21 could not be bound here (not root): the refusal message alone was checked")
    else:
        assert listener.connections == 0, "the server connected to the host named in the URL"
    models = requests.get(f"{server.management}/models", headers=headers, timeout=30).json()["models"]
    assert "evil" not in {m["modelName"] for m in models} and "melanoma" in {m["modelName"] for m in models}

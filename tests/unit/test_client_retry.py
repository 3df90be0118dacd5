"""The client's retries against a shedding server (a loopback stub, no TorchServe): a 503 is retried no sooner
than its Retry-After asks, with backoff otherwise, and a 4xx is not retried."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import client.tsclient as tsclient
from client.tsclient import Client, ClientError, retry_after


class Stub(BaseHTTPRequestHandler):
    answers: list[tuple[int, dict[str, str], dict]] = []
    seen = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, headers, body = Stub.answers[min(Stub.seen, len(Stub.answers) - 1)]
        Stub.seen += 1
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Stub.seen = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(tsclient.time, "sleep", slept.append)
    return slept


BUSY = (503, {"Retry-After": "2"}, {"error": "busy: 4 requests are being scored; retry after 2 s", "code": 503})
OK = (200, {}, {"probability": 0.25})


def test_retry_after_is_honoured(stub: str, sleeps: list[float]) -> None:
    Stub.answers = [BUSY, BUSY, OK]
    assert Client(stub, token="k", backoff=0.01).predict_bytes(b"img")["probability"] == 0.25
    assert Stub.seen == 3 and len(sleeps) == 2
    assert all(2.0 <= s <= 3.0 for s in sleeps), sleeps  # Retry-After (2 s) plus up to 50 % jitter


def test_backoff_without_retry_after_and_giving_up(stub: str, sleeps: list[float]) -> None:
    Stub.answers = [(503, {}, {"message": "Model has no worker to serve inference request"})]
    with pytest.raises(ClientError) as e:
        Client(stub, token="k", retries=3, backoff=0.5).predict_bytes(b"img")
    assert e.value.status == 503 and Stub.seen == 4
    # 0.5, 1, 2 s, each times a jitter in [0.5, 1.5)
    assert [0.25 * 2**i <= s < 0.75 * 2**i for i, s in enumerate(sleeps)] == [True] * 3, sleeps


def test_client_errors_are_not_retried(stub: str, sleeps: list[float]) -> None:
    Stub.answers = [(415, {}, {"error": "not an image", "code": 415})]
    with pytest.raises(ClientError, match="not an image"):
        Client(stub, token="k").predict_bytes(b"img")
    assert Stub.seen == 1 and sleeps == []


@pytest.mark.parametrize(("header", "seconds"), [("2", 2.0), ("0", 0.0), ("-5", 0.0), ("3600", 30.0),
                                                 ("Wed, 21 Oct 2026 07:28:00 GMT", 0.0), (None, 0.0)])
def test_retry_after_parsing(header: str | None, seconds: float) -> None:
    r = requests.Response()
    if header is not None:
        r.headers["Retry-After"] = header
    assert retry_after(r) == seconds


def test_a_worker_that_died_is_retried_a_handler_error_is_not(stub: str, sleeps: list[float]) -> None:
    """TorchServe answers 500 "Worker died." for a request whose worker died under it (a restart, kill -9):
    retried, as a prediction is idempotent. The handler's own 500 (the model failed) is final."""
    died = (500, {}, {"code": 500, "type": "InternalServerException", "message": "Worker died."})
    Stub.answers = [died, OK]
    assert Client(stub, token="k", backoff=0.01).predict_bytes(b"img")["probability"] == 0.25
    assert Stub.seen == 2
    Stub.seen = 0
    Stub.answers = [(500, {}, {"error": "the model failed on this batch; see the server log", "code": 500}), OK]
    with pytest.raises(ClientError) as e:
        Client(stub, token="k", backoff=0.01).predict_bytes(b"img")
    assert e.value.status == 500 and Stub.seen == 1

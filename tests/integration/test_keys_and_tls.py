"""Keys that expire (token_expiration_min=1) and HTTPS straight from TorchServe."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testkit.harness import ROOT, Server, free_ports, start_server, stop_server
from testkit.imaging import encode, lesion_rgb

pytestmark = pytest.mark.integration
PREDICT = [sys.executable, str(ROOT / "client" / "predict.py")]


def run_predict(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PREDICT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def short_keys(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # TorchServe reads token_expiration_min as a double (seconds = min x 60): 30 s keys keep the wait short
    srv = start_server(demo_store, tmp_path_factory.mktemp("keys"), {"token_expiration_min": "0.5"})
    yield srv
    stop_server(srv)


@pytest.mark.slow
def test_clients_survive_key_expiry(short_keys: Server, tmp_path: Path) -> None:
    srv = short_keys
    images = []
    for s in range(4):
        images.append(tmp_path / f"l{s}.jpg")
        images[-1].write_bytes(encode(lesion_rgb(seed=40 + s)))
    local = ["--url", srv.url, "--management-url", srv.management, "--key-file", str(srv.key_file), "--json"]
    first = run_predict(str(images[0]), *local)
    assert first.returncode == 0, first.stderr
    p0 = json.loads(first.stdout)["probability"]

    old = srv.keys()["inference"]
    remote_copy = tmp_path / "remote_key_file.json"  # what a remote client holds: no API key
    remote_copy.write_text(json.dumps({"inference": {"key": old}}))
    health = start_health(srv, tmp_path)
    try:
        wait_until_expired(srv.key_file)  # past the expiry of the inference and management keys
        r = srv.predict(images[0].read_bytes(), headers={"Authorization": f"Bearer {old}"})
        assert r.status_code == 400 and "InvalidKeyException" in r.text

        # The local client (can read the API key) rotates once and scores all four, in parallel.
        after = run_predict(*map(str, images), *local, "--workers", "4")
        assert after.returncode == 0, after.stderr
        rows = [json.loads(line) for line in after.stdout.splitlines()]
        assert len(rows) == 4 and abs(rows[0]["probability"] - p0) <= 1e-9
        new = srv.keys()["inference"]
        assert new != old
        assert old not in after.stdout + after.stderr and new not in after.stdout + after.stderr
        # the old key stays refused; the new one works
        assert srv.predict(images[0].read_bytes(), headers={"Authorization": f"Bearer {old}"}).status_code == 400
        assert srv.predict(images[0].read_bytes()).status_code == 200

        # A remote client without the API key: one clear line, non-zero exit, no key printed.
        remote = run_predict(*map(str, images), "--url", srv.url, "--key-file", str(remote_copy))
        assert remote.returncode == 1 and remote.stdout == ""
        lines = remote.stderr.strip().splitlines()
        assert len(lines) == 1 and "inference key was refused" in lines[0] and "scripts/token.sh" in lines[0]
        assert old not in remote.stderr

        # The key-free health check still answers after the management key expired, and says nothing more.
        r = requests.get(health[1], timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert requests.get(health[1].replace("/healthz", "/models"), timeout=10).status_code == 404
    finally:
        health[0].terminate()
        health[0].wait(10)


def wait_until_expired(key_file: Path) -> None:
    """Sleep until the expiry instants TorchServe wrote for the inference and management keys have passed."""
    data = json.loads(key_file.read_text())
    ends = [dt.datetime.strptime(data[k]["expiration time"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
            for k in ("inference", "management")]  # whole seconds: the wait adds the fraction back
    left = (max(ends) - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert left < 60, f"keys expire in {left:.0f} s: token_expiration_min not applied"
    time.sleep(max(0.0, left) + 2.0)


def start_health(srv: Server, tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "health.py"), "--port", str(port),
                             "--config", str(srv.workdir / "config.properties"), "--key-file", str(srv.key_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/healthz"
    for _ in range(100):
        try:
            requests.get(url, timeout=2)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    return proc, url


def test_health_is_unavailable_without_a_server(tmp_path: Path) -> None:
    cfg = tmp_path / "config.properties"
    (port, dead) = free_ports(2)
    cfg.write_text(f"management_address=http://127.0.0.1:{dead}\n")
    (tmp_path / "key_file.json").write_text(json.dumps({"management": {"key": "x"}, "API": {"key": "y"}}))
    srv = Server("", "", "", tmp_path, None)  # type: ignore[arg-type]
    proc, url = start_health(srv, tmp_path)
    try:
        r = requests.get(url, timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "unavailable"}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def tls(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    certs = tmp_path_factory.mktemp("certs")
    subprocess.run([str(ROOT / "scripts" / "make_cert.sh"), str(certs)], check=True, capture_output=True)
    (port,) = free_ports(1)
    srv = start_server(demo_store, tmp_path_factory.mktemp("tls"), {
        "inference_address": f"https://127.0.0.1:{port}",
        "certificate_file": str(certs / "server.pem"),
        "private_key_file": str(certs / "server.key"),
    })
    yield srv, certs
    stop_server(srv)


def test_https_with_a_private_ca(tls: tuple[Server, Path], tmp_path: Path) -> None:
    srv, certs = tls
    assert srv.url.startswith("https://")
    img = tmp_path / "l.jpg"
    img.write_bytes(encode(lesion_rgb(seed=50)))
    key = ["--key-file", str(srv.key_file)]

    ok = run_predict(str(img), "--url", srv.url, "--cacert", str(certs / "ca.pem"), *key, "--json")
    assert ok.returncode == 0, ok.stderr
    assert 0 < json.loads(ok.stdout)["probability"] < 1

    unverified = run_predict(str(img), "--url", srv.url, *key)
    assert unverified.returncode == 1
    assert "certificate verification failed" in unverified.stdout and "--cacert" in unverified.stdout

    plain = run_predict(str(img), "--url", srv.url.replace("https://", "http://"), *key, "--retries", "0")
    assert plain.returncode == 1 and "probability" not in plain.stdout
    r = None
    try:
        r = requests.post(srv.url.replace("https://", "http://") + "/predictions/melanoma",
                          data=img.read_bytes(), headers=srv.headers(), timeout=10)
    except requests.RequestException:
        pass
    assert r is None or r.status_code != 200


def test_client_refuses_plain_http_to_a_remote_host(tmp_path: Path) -> None:
    img = tmp_path / "l.jpg"
    img.write_bytes(encode(lesion_rgb(seed=51)))
    # Refused before any connection is attempted: no traffic leaves the machine.
    r = run_predict(str(img), "--url", "http://melanoma.example:8080", "--token", "k")
    assert r.returncode == 2 and "refusing to send the inference key" in r.stderr and "--insecure-http" in r.stderr


def test_client_allows_plain_http_only_when_told(tmp_path: Path) -> None:
    from client.tsclient import Client, ClientError

    with pytest.raises(ClientError, match="refusing"):
        Client("http://melanoma.example:8080", token="k")
    Client("http://melanoma.example:8080", token="k", insecure_http=True)  # allowed, with a warning
    Client("http://127.0.0.1:8080", token="k")  # loopback never leaves the machine
    Client("https://melanoma.example:8443", token="k")

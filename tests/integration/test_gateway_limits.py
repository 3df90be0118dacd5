"""The nginx gateway's limits per client (issue #40), on real nginx with the rendered deploy/nginx config and no
TorchServe behind it (the limits act before any request reaches an instance): hundreds of idle connections from
one address do not stall another client, one address cannot take every scoring slot or start requests without
bound, and nginx's workers never run as root. The other client is 127.0.0.2, a second loopback address."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.harness import cluster_module, free_ports, missing_system_tool

pytestmark = pytest.mark.integration

ATTACKER, OTHER = "127.0.0.1", "127.0.0.2"
ANSWER_WITHIN = 10.0  # s: a generous bound on one answer; nginx's default header timeout would hold it for 60


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    cl = cluster_module()
    try:
        cl.nginx_binary()
    except cl.ClusterError as e:
        missing_system_tool(str(e))
    work = tmp_path_factory.mktemp("gateway")
    os.chmod(work, 0o700)
    listen, hop, inference = free_ports(3)
    inst = cl.Instance(0, 0, inference, 0, 0, hop, 0, 0, str(work / "ts0"))
    cluster = cl.Cluster(str(work), f"127.0.0.1:{listen}", str(work), [inst])
    (work / "ts0").mkdir()
    (work / "ts0" / "key_file.json").write_text('{"inference": {"key": "not-a-real-key"}}')
    os.umask(old := os.umask(0o077))
    try:
        for sub in ("logs", "tmp"):
            (work / sub).mkdir()
        cl.make_worker_temp(cluster)  # as cluster.py start does, after its instances are ready
        cl.render(cluster)
        cl.nginx(cluster)
    finally:
        os.umask(old)
    cluster.key = cl.gateway_key(work)  # type: ignore[attr-defined]
    yield cluster
    pid = int((work / "nginx.pid").read_text())
    os.kill(pid, signal.SIGQUIT)
    for _ in range(100):
        if not (work / "nginx.pid").exists():
            break
        time.sleep(0.1)
    if cluster.worker_temp:
        shutil.rmtree(cluster.worker_temp, ignore_errors=True)


def request(cluster, method: str = "GET", path: str = "/nope", source: str = OTHER, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> http.client.HTTPResponse:  # noqa: ANN001
    host, port = cluster.listen.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=ANSWER_WITHIN, source_address=(source, 0))
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    r.read()
    conn.close()
    return r


def open_idle(cluster, n: int, source: str = ATTACKER) -> list[socket.socket]:  # noqa: ANN001
    """n connections idle in the middle of their headers (slowloris). A connection that has sent nothing at all
    nginx closes by itself when it runs short; one that has started its request it must keep until the header
    timeout."""
    host, port = cluster.listen.rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))
        s.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def test_idle_connections_from_one_address_do_not_stall_another_client(gateway: object) -> None:
    """600 connections idle halfway through their headers (more than the 512 the gateway had room for): another
    address is still answered at once; the idle ones are closed by the 10 s header timeout, not nginx's 60 s."""
    idle = open_idle(gateway, 600)
    time.sleep(0.5)  # nginx accepts and starts reading every one
    try:
        r = request(gateway)  # a socket timeout (ANSWER_WITHIN) here is the stall
        assert r.status == 404
    finally:
        for s in idle:
            s.close()


def test_one_address_cannot_take_every_scoring_slot(gateway: object) -> None:
    """Uploads in progress hold scoring slots (4 for the gateway here): one address gets at most half of them,
    the next one from that address is refused at once (503 + Retry-After), and another address still gets one."""
    host, port = gateway.listen.rsplit(":", 1)  # type: ignore[attr-defined]
    auth = f"Bearer {gateway.key}"  # type: ignore[attr-defined]
    head = (f"POST /predictions/melanoma HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n").encode()
    slow = []
    try:
        for _ in range(2):  # half the body, then silence: a request in progress, holding a slot
            s = socket.create_connection((host, int(port)), timeout=5, source_address=(ATTACKER, 0))
            s.sendall(head + b"x" * 1000)
            slow.append(s)
        time.sleep(0.5)  # nginx reads what was sent
        third = request(gateway, "POST", "/predictions/melanoma", ATTACKER, b"x" * 1000,
                        {"Authorization": auth, "Content-Type": "application/octet-stream"})
        assert third.status == 503 and third.getheader("Retry-After") == "2"
        other = request(gateway, "POST", "/predictions/melanoma", OTHER, b"x" * 1000,
                        {"Authorization": auth, "Content-Type": "application/octet-stream"})
        assert other.status == 502  # admitted, and sent on to the (absent) instance
    finally:
        for s in slow:
            s.close()


def test_request_rate_is_limited_per_address(gateway: object) -> None:
    statuses = [request(gateway, path="/ping", source=ATTACKER).status for _ in range(80)]
    assert 429 in statuses and set(statuses) <= {429, 502}, statuses
    assert request(gateway, path="/ping", source=OTHER).status == 502  # another address: its own allowance


def test_workers_never_run_as_root_and_buffer_large_bodies(gateway: object) -> None:
    """Started by root (a container, a root shell), the master switches its workers to an unprivileged user who can
    still buffer a body over 1 MB in the gateway's private folder (that got 500 when the folder shut them out)."""
    work = Path(gateway.workdir)  # type: ignore[attr-defined]
    master = int((work / "nginx.pid").read_text())
    out = subprocess.run(["ps", "-o", "pid=,uid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    uids = {int(line.split()[1]) for line in out.splitlines()}
    assert uids and 0 not in uids, out
    if os.geteuid() == 0:
        assert "user nobody " in (work / "nginx.conf").read_text()
    r = request(gateway, "POST", "/predictions/melanoma", OTHER, b"x" * (3 << 20),
                {"Authorization": f"Bearer {gateway.key}",  # type: ignore[attr-defined]
                 "Content-Type": "application/octet-stream"})
    assert r.status == 502  # read whole and buffered to disk, then sent on; 500 if the worker could not write it

"""Two TorchServe instances behind Debian's nginx (deploy/nginx), on loopback: balanced, correct, and no
request lost when one instance dies mid-load (nginx retries on the other, the client retries the rest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from client.tsclient import Client
from handler.archive import load_archive
from testkit.harness import ROOT, cluster_module, free_ports, missing_system_tool, read_log, run_build
from testkit.imaging import encode, lesion_rgb
from testkit.load import phone_photo
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = pytest.mark.integration


cl = cluster_module()


def require_nginx() -> None:
    try:
        cl.nginx_binary()
    except cl.ClusterError as e:
        missing_system_tool(str(e))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped defaults (batch 1, 5 ms delay); no explain.pt: only predictions are balanced here."""
    require_nginx()
    s = tmp_path_factory.mktemp("scale") / "model_store"
    s.mkdir()
    run_build("--no-explain", output_dir=s)
    return s


@pytest.fixture(scope="module")
def cluster(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    work = tmp_path_factory.mktemp("cluster")
    cpus = sorted(os.sched_getaffinity(0))
    ports = free_ports(2 * 6 + 1)
    instances = [cl.Instance(i, cpus[i % len(cpus)], *ports[6 * i:6 * i + 6], str(work / f"ts{i}")) for i in range(2)]
    c = cl.Cluster(str(work), f"127.0.0.1:{ports[-1]}", str(store), instances)
    try:
        cl.start(c)
    except Exception:
        cl.stop(c)
        raise
    yield c
    cl.stop(c)


def served_by(c: object) -> list[int]:
    """Requests each instance's worker handled so far (from its model log)."""
    out = []
    for inst in c.instances:
        out.append(read_log(Path(inst.workdir) / "logs").count("batch of 1"))
    return out


def throughput(client: Client, images: list[bytes], n: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: client.predict_bytes(images[i % len(images)]), range(n)))
    return n / (time.perf_counter() - t)


def test_balanced_correct_and_no_request_lost(cluster: object, store: Path) -> None:
    key = cl.gateway_key(cluster.work)
    offline = load_archive(store / "melanoma.mar", threads=1)
    images = [encode(lesion_rgb(seed=70 + s)) for s in range(6)]
    expected = [offline.score(d)["probability"] for d in images]
    client = Client(cluster.url, token=key, retries=4, backoff=0.5, timeout=60)

    # 1. every answer correct, both instances serve
    before = served_by(cluster)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: client.predict_bytes(images[i % 6]), range(24)))
    assert all(abs(a["probability"] - expected[i % 6]) <= SAME_ARCHIVE_DP for i, a in enumerate(answers))
    after = served_by(cluster)
    assert all(b > a for a, b in zip(before, after, strict=True)), f"requests per instance: {before} -> {after}"

    # 2. throughput through nginx with both instances (each pinned to its core, 1 torch thread)
    two = throughput(client, images, 32)

    # 3. kill -9 one whole instance (JVM + worker) mid-load: every request still gets its right answer
    victim = cluster.instances[0]
    results: dict[int, float] = {}
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            results[i] = client.predict_bytes(images[i % 6])["probability"]
        except Exception as e:  # collected, asserted below
            errors.append(f"{i}: {e}")

    at_kill: list[int] = []

    def kill_after_some() -> None:  # an event, not a sleep: once 6 answers are in, 34 are still to come
        while len(results) < 6 and not errors:
            time.sleep(0.01)
        pid = int((Path(victim.workdir) / ".model_server.pid").read_text().strip())
        at_kill.append(len(results))
        for p in [pid, *_children_of(pid)]:  # the JVM and its Python worker
            os.kill(p, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_some)
    killer.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(40)))
    killer.join()
    assert not errors, errors
    assert at_kill and at_kill[0] < 40, "every request had been answered before the kill: no fault was tested"
    assert len(results) == 40 and all(abs(p - expected[i % 6]) <= SAME_ARCHIVE_DP for i, p in results.items())
    assert requests.get(f"{cluster.url}/ping", timeout=10).json()["status"] == "Healthy"

    # 4. the same load on the one instance left, for the report: all of it lands on the survivor
    survivor_before = served_by(cluster)[1]
    one_left = throughput(client, images, 32)
    print(f"\nthroughput through nginx, 4 clients, 320x240 JPEGs: 2 instances {two:.2f} img/s, "
          f"1 instance {one_left:.2f} img/s, ratio {two / one_left:.2f}x")
    (cluster.work / "throughput.txt").write_text(f"{two:.3f} {one_left:.3f}\n")
    assert served_by(cluster)[1] - survivor_before >= 32, "the survivor did not answer every request"


def _children_of(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def test_gateway_rules(cluster: object) -> None:
    url = cluster.url
    data = encode(lesion_rgb(seed=80))
    inst_key = cl.instance_key(cluster.instances[-1])[0]
    # why nginx swaps keys instead of passing the client's header through: each instance has its own
    assert len({cl.instance_key(i)[0] for i in cluster.instances}) == len(cluster.instances)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {inst_key}"}):
        r = requests.post(f"{url}/predictions/melanoma", data=data, headers=headers, timeout=30)
        assert r.status_code == 401 and "gateway key" in r.json()["error"]
    h = {"Authorization": f"Bearer {cl.gateway_key(cluster.work)}"}
    r = requests.post(f"{url}/predictions/melanoma", data=b"x" * (27 * 2**20), headers=h, timeout=60)
    assert r.status_code == 413 and r.json()["code"] == 413  # JSON, unlike TorchServe's bare 413
    r = requests.post(f"{url}/predictions/melanoma", data=b"not an image", headers=h, timeout=30)
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    for path in ("/models", "/metrics", "/token?type=inference", "/predictions/other"):
        assert requests.get(url + path, headers=h, timeout=10).status_code == 404, path
    assert requests.get(f"{url}/ping", timeout=10).status_code in (200, 502, 503)
    log = (cluster.work / "logs" / "nginx_access.log").read_text()
    assert cl.gateway_key(cluster.work) not in log and inst_key not in log


def test_refresh_rotates_expiring_keys_and_reloads(cluster: object, monkeypatch: pytest.MonkeyPatch) -> None:
    alive = [i for i in cluster.instances if (Path(i.workdir) / "logs").exists() and _serving(i)]
    old = {i.index: cl.instance_key(i)[0] for i in alive}
    monkeypatch.setattr(cl, "RENEW_BEFORE", cl.dt.timedelta(days=2))  # every key "expires soon"
    old_workers = nginx_workers(cluster)
    assert cl.refresh(cluster) is True
    h = {"Authorization": f"Bearer {cl.gateway_key(cluster.work)}"}
    wait_reloaded(cluster, old_workers)
    r = requests.post(f"{cluster.url}/predictions/melanoma", data=encode(lesion_rgb(seed=81)), headers=h,
                      timeout=60)
    assert r.status_code == 200, r.text
    for i in alive:
        assert cl.instance_key(i)[0] != old[i.index]


def _serving(inst: object) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{inst.inference}/ping", timeout=2)
        return True
    except requests.RequestException:
        return False


def nginx_workers(c: object) -> set[int]:
    import psutil

    master = int((c.work / "nginx.pid").read_text().strip())
    return {p.pid for p in psutil.Process(master).children()}


def reload_nginx(c: object) -> None:
    """Render the config again, reload, and wait until every old nginx worker is gone (new connections then meet
    the new configuration)."""
    old = nginx_workers(c)
    cl.render(c)
    cl.nginx(c, "-s", "reload")
    wait_reloaded(c, old)


def wait_reloaded(c: object, old: set[int]) -> None:
    """A reload is done when none of the old nginx workers is left and new ones serve."""
    deadline = time.monotonic() + 30
    while nginx_workers(c) & old or not nginx_workers(c):
        assert time.monotonic() < deadline, "nginx did not reload within 30 s"
        time.sleep(0.05)


def test_gateway_sheds_with_503_and_retry_after(cluster: object) -> None:
    """More requests at once than --per-instance allows: the excess gets nginx's 503 at once, with Retry-After
    and a JSON message, never a 5xx from TorchServe; the client's retries then score every one. The photo is
    over client_body_buffer_size (1 MiB), so nginx buffers it to disk (started by root, its workers once could
    not, and every phone photo got 500)."""
    photo = phone_photo(2000, 1500, seed=82, quality=95)
    assert len(photo) > 2**20
    key = cl.gateway_key(cluster.work)
    url = f"{cluster.url}/predictions/melanoma"
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}
    first = requests.post(url, data=photo, headers=h, timeout=60)
    assert first.status_code == 200, first.text
    reference = first.json()["probability"]

    cluster.per_instance = 1
    reload_nginx(cluster)
    try:
        n = 8
        start = threading.Barrier(n)

        def burst(_: int) -> requests.Response:
            start.wait()
            return requests.post(url, data=photo, headers=h, timeout=60)

        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(burst, range(n)))
        statuses = sorted(r.status_code for r in answers)
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        for r in answers:
            if r.status_code == 503:
                assert r.headers.get("Retry-After") == "2" and r.json()["error"].startswith("busy"), r.text
            else:  # the same single-threaded instance code on the same bytes: the same float
                assert abs(r.json()["probability"] - reference) <= 1e-6

        client = Client(cluster.url, token=key, timeout=60)  # the CLI's retries and backoff
        with ThreadPoolExecutor(n) as pool:
            scored = list(pool.map(lambda _: client.predict_bytes(photo)["probability"], range(n)))
        assert all(abs(p - reference) <= 1e-6 for p in scored), scored
    finally:
        cluster.per_instance = 4
        reload_nginx(cluster)


def test_https_gateway_with_a_private_ca(cluster: object, store: Path, tmp_path: Path) -> None:
    """On a network the gateway serves HTTPS (cluster.py --tls-cert/--tls-key, as docs/EC2.md says): the client
    verifies it against the CA it is given, scores as in-process, and a plain-HTTP request gets no score."""
    certs = tmp_path / "certs"
    subprocess.run([str(ROOT / "scripts" / "make_cert.sh"), str(certs)], check=True, capture_output=True)
    img = tmp_path / "l.jpg"
    img.write_bytes(encode(lesion_rgb(seed=83)))
    key = cl.gateway_key(cluster.work)
    cluster.tls_cert, cluster.tls_key = str(certs / "server.pem"), str(certs / "server.key")
    reload_nginx(cluster)
    try:
        assert cluster.url.startswith("https://")
        predict = [sys.executable, str(ROOT / "client" / "predict.py"), str(img), "--url", cluster.url,
                   "--token", key]
        ok = subprocess.run([*predict, "--cacert", str(certs / "ca.pem"), "--json"], capture_output=True,
                            text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        offline = load_archive(store / "melanoma.mar").score(img.read_bytes())["probability"]
        assert abs(json.loads(ok.stdout)["probability"] - offline) <= SAME_ARCHIVE_DP
        unverified = subprocess.run(predict, capture_output=True, text=True, timeout=120)
        assert unverified.returncode == 1 and "certificate verification failed" in unverified.stdout
        r = None
        try:
            r = requests.post(cluster.url.replace("https://", "http://") + "/predictions/melanoma",
                              data=img.read_bytes(), headers={"Authorization": f"Bearer {key}"}, timeout=10)
        except requests.RequestException:
            pass
        assert r is None or r.status_code != 200  # nginx answers 400 "plain HTTP request sent to HTTPS port"
    finally:
        cluster.tls_cert = cluster.tls_key = None
        reload_nginx(cluster)

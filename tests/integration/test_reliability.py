"""Reliability and security against a live server: bad inputs, load, faults, access, unsafe checkpoints.

Every case records what was expected and what was observed; the module writes a report from those rows when
it finishes (bench/results/reliability.md, untracked). Tests never write tracked files: to refresh the
committed docs/RELIABILITY.md, run with MELANOMA_RELIABILITY_REPORT=docs/RELIABILITY.md.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image

from client.tsclient import Client
from handler.archive import LoadedArchive, load_archive
from testkit.harness import ROOT, Server, build_in_process, read_log, start_server, stop_server, worker_pids
from testkit.imaging import encode, jpeg_with_orientation, lesion_rgb, png_header_only
from testkit.load import soak
from testkit.report import replace_block
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPORT = ROOT / os.environ.get("MELANOMA_RELIABILITY_REPORT", "bench/results/reliability.md")
ROWS: dict[str, list[tuple[str, str, str, bool]]] = {}
FIGURES: dict[str, str] = {}


def record(section: str, case: str, expected: str, observed: str, ok: bool) -> None:
    ROWS.setdefault(section, []).append((case, expected, observed, ok))


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    lines = ["# Reliability report", "",
             "Written by `tests/integration/test_reliability.py` from its latest run (`scripts/test.sh`); "
             "do not edit by hand.", "",
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}.", ""]
    for section, rows in ROWS.items():
        lines += [f"## {section}", "", "| case | expected | observed | ok |", "|---|---|---|---|"]
        lines += [f"| {c} | {e} | {o.replace('|', '/')} | {'yes' if ok else '**NO**'} |" for c, e, o, ok in rows]
        lines.append("")
    if FIGURES:
        lines += ["## Figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in FIGURES.items()]
        lines.append("")
    replace_block(REPORT, "tests", "\n".join(lines))


@pytest.fixture(scope="module")
def default_store(demo_store: Path) -> Path:
    """The session's demo archive: built with the shipped defaults (batch size 1), as users serve it."""
    return demo_store


@pytest.fixture(scope="module")
def live(default_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(default_store, tmp_path_factory.mktemp("live"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def offline(default_store: Path) -> LoadedArchive:
    return load_archive(default_store / "melanoma.mar")


# ---------------------------------------------------------------------------------------------
# 1. Bad and unusual inputs
# ---------------------------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    return encode(img, "PNG")


def _palette_with_transparency() -> bytes:
    p = Image.fromarray(lesion_rgb(seed=7)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    buf = io.BytesIO()
    p.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.fromarray(lesion_rgb(seed=s)).convert("P") for s in (8, 9, 10)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    frames = [Image.fromarray(lesion_rgb(seed=s)) for s in (11, 12)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


RGB = lesion_rgb(seed=5)
INPUTS: dict[str, tuple[bytes, str, int]] = {  # name: (body, content type, expected status)
    "empty body": (b"", "application/octet-stream", 400),
    "random bytes": (np.random.default_rng(1).bytes(20000), "application/octet-stream", 415),
    "text body": (b"a lesion on the left arm", "text/plain", 415),
    "JSON without image": (json.dumps({"patient": 1}).encode(), "application/json", 400),
    "HTML body": (b"<html><body><img src=x></body></html>", "text/html", 415),
    "SVG body": (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "image/svg+xml", 415),
    "truncated JPEG": (encode(RGB)[:3000], "image/jpeg", 400),
    "PNG declaring 40000x40000 (bomb)": (png_header_only(40000, 40000), "image/png", 413),
    "JSON with invalid base64": (b'{"image": "%%%not base64%%%"}', "application/json", 400),
    "1x1 image": (_png(Image.new("RGB", (1, 1), (120, 80, 60))), "image/png", 200),
    "16-bit PNG": (_png(Image.fromarray(np.asarray(Image.fromarray(RGB).convert("L")).astype(np.uint16) * 257)),
                   "image/png", 200),
    "CMYK JPEG": (encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), "image/jpeg", 200),
    "palette PNG with transparency": (_palette_with_transparency(), "image/png", 200),
    "animated GIF": (_animated_gif(), "image/gif", 200),
    "multi-page TIFF": (_multipage_tiff(), "image/tiff", 200),
    "WebP": (encode(RGB, "WEBP", quality=90), "image/webp", 200),
    "EXIF orientation 3": (jpeg_with_orientation(RGB, 3), "image/jpeg", 200),
    "EXIF orientation 6": (jpeg_with_orientation(RGB, 6), "image/jpeg", 200),
    "EXIF orientation 8": (jpeg_with_orientation(RGB, 8), "image/jpeg", 200),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_input(name: str, live: Server, offline: LoadedArchive) -> None:
    body, ctype, status = INPUTS[name]
    r = requests.post(f"{live.url}/predictions/melanoma", data=body,
                      headers={**live.headers(), "Content-Type": ctype}, timeout=60)
    ok = r.status_code == status
    if status == 200:
        got, want = r.json().get("probability"), offline.score(body)["probability"]
        ok = ok and abs(got - want) <= SAME_ARCHIVE_DP
        observed = f"200, p={got:.4f} (in-process {want:.4f})"
    else:
        msg = r.json().get("error", "")
        ok = ok and r.json().get("code") == status and len(msg) > 10
        observed = f"{r.status_code}: {msg}"
    record("Inputs", name, f"{status}" + (" with the in-process score" if status == 200 else " + JSON message"),
           observed, ok)
    assert ok, observed


def test_multipart_without_file_field(live: Server) -> None:
    r = requests.post(f"{live.url}/predictions/melanoma", files={"photo": ("x.jpg", encode(RGB))},
                      headers=live.headers(), timeout=60)
    ok = r.status_code == 400 and "no image" in r.json()["error"]
    record("Inputs", "multipart without a data/file field", "400 + JSON message",
           f"{r.status_code}: {r.json().get('error')}", ok)
    assert ok


def test_body_over_max_request_size(live: Server) -> None:
    limit = int(live.props["max_request_size"])
    r = requests.post(f"{live.url}/predictions/melanoma", data=b"\xff\xd8" + b"\0" * limit,
                      headers={**live.headers(), "Content-Type": "image/jpeg"}, timeout=60)
    # TorchServe's frontend answers this before any handler runs, with an empty body: the client
    # turns the status into a message (see client/tsclient.py server_message).
    ok = r.status_code == 413
    record("Inputs", f"body over max_request_size ({limit / 2**20:.0f} MiB)",
           "413 (from TorchServe's frontend, before the handler)",
           f"{r.status_code}, body {r.text[:80]!r}", ok)
    assert ok


def test_fuzzed_inputs_against_the_server(live: Server, offline: LoadedArchive) -> None:
    """The unit tier's mutation corpus (testkit/fuzz.py) through real TorchServe: each answer is what the
    pipeline gives in-process (200 with the same score, or the same 4xx), never a 5xx."""
    from handler.pipeline import InputError, PipelineConfig
    from handler.request import request_bytes
    from testkit.fuzz import check, fuzz

    sent: list[tuple[str, bytes]] = []
    fuzz(120, seed=7, on_input=lambda name, data: sent.append((name, data)))
    statuses: Counter[int] = Counter()
    wrong = []
    for name, data in sent:
        r = requests.post(f"{live.url}/predictions/melanoma", data=data,
                          headers={**live.headers(), "Content-Type": "application/octet-stream"}, timeout=60)
        statuses[r.status_code] += 1
        try:  # the handler's own reading of a raw body first (e.g. one that starts like JSON), then the pipeline
            want = check(request_bytes({"body": data}), PipelineConfig())
        except InputError as e:
            want = f"input_error:{e.status}"
        if want == "tensor":
            expected = offline.score(data)["probability"]
            ok = r.status_code == 200 and abs(r.json()["probability"] - expected) <= SAME_ARCHIVE_DP
        else:
            ok = r.status_code == int(want.split(":")[1]) and "error" in r.json()
        if not ok:
            wrong.append((name, want, r.status_code, r.text[:120]))
    ok = not wrong and not any(code >= 500 for code in statuses)
    record("Inputs", f"{len(sent)} fuzzed images (mutated JPEG/PNG/WebP/TIFF/GIF/BMP)",
           "each answer equals the in-process outcome; no 5xx",
           ", ".join(f"{n} x {c}" for c, n in sorted(statuses.items())) + (f"; {len(wrong)} differ" if wrong else ""),
           ok)
    assert ok, wrong[:5]


def test_healthy_after_bad_inputs(live: Server) -> None:
    r = requests.get(f"{live.url}/ping", headers=live.headers(), timeout=10)
    inits = live.log().count("melanoma model")
    ok = r.status_code == 200 and r.json()["status"] == "Healthy" and inits == 1
    record("Inputs", "server after all of the above", "/ping Healthy, worker never restarted",
           f"/ping {r.status_code} {r.json().get('status')}, worker initialised {inits} time(s)", ok)
    assert ok


# ---------------------------------------------------------------------------------------------
# 2. Load: a bounded soak
# ---------------------------------------------------------------------------------------------


def test_soak(live: Server) -> None:
    """bench/soak.py's hour, shortened: the same mixed traffic (photos, 24 MP photos, explanations, bad inputs)
    and the same checks."""
    duration, clients = 60.0, 8
    res = soak(live, duration, clients, sample_every=5.0, warmup=10.0)
    g = res["growth"]
    FIGURES["soak: clients x duration"] = f"{clients} x {duration:.0f} s (bench/soak.py's traffic)"
    FIGURES["soak: responses (kind:status)"] = ", ".join(f"{k} x {v}" for k, v in res["counts"].items())
    FIGURES["soak: answers differing from the input's own"] = str(res["wrong_count"])
    FIGURES["soak: throughput"] = f"{res['throughput']:.2f} requests/s"
    FIGURES["soak: JVM + worker RSS after warm-up -> end"] = (
        f"{g['base_mib']:.0f} -> {g['end_mib']:.0f} MiB ({100 * g['end_growth']:+.1f} %)")
    ok = res["wrong_count"] == 0 and g["end_growth"] <= 0.10 and res["workers_seen"] == 1
    record("Load", f"{clients} clients for {duration:.0f} s, mixed traffic",
           "every answer equals the input's own (status; p within 1e-6); worker never restarted; JVM + worker RSS "
           "grows <= 10 % after 10 s", f"{res['requests']} responses, {res['wrong_count']} differing "
           f"{res['wrong'][:2]}, {res['workers_seen']} worker(s), RSS {100 * g['end_growth']:+.1f} %", ok)
    assert ok, res["wrong"]


# ---------------------------------------------------------------------------------------------
# 3. Faults
# ---------------------------------------------------------------------------------------------


def wait_until_done(futures: list[Future], n: int, timeout: float = 300) -> None:
    """Until `n` of `futures` are done (an event, not a guess at how long the first answers take)."""
    deadline = time.monotonic() + timeout
    while sum(f.done() for f in futures) < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests answered in {timeout:.0f} s"
        time.sleep(0.02)


def test_worker_killed_during_load(live: Server) -> None:
    images = [encode(lesion_rgb(seed=70 + s)) for s in range(24)]
    client = Client(live.url, token=live.keys()["inference"], retries=8, backoff=0.5, timeout=120,
                    key_file=live.key_file, management_url=live.management)
    (worker,) = worker_pids(live)
    inflight: dict[str, float] = {}

    def probe() -> None:  # one raw request in flight when the worker dies: how fast does it fail?
        t = time.monotonic()
        try:
            r = requests.post(f"{live.url}/predictions/melanoma", data=images[0],
                              headers={**live.headers(), "Content-Type": "image/jpeg"}, timeout=120)
            inflight["status"] = r.status_code
        except requests.RequestException:
            inflight["status"] = 0
        inflight["seconds"] = time.monotonic() - t

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.predict_bytes, d) for d in images]
        wait_until_done(futures, 3)  # the load is flowing through the worker
        p = pool.submit(probe)
        pending = sum(not f.done() for f in futures)
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        results = [f.result() for f in futures]
        p.result()
    assert pending > 0, "every request had finished before the kill: no fault was tested"
    # recovery: until a new worker answers a plain request
    while live.predict(images[1]).status_code != 200:
        time.sleep(0.2)
    recovered = time.monotonic() - killed_at
    new = worker_pids(live)
    FIGURES["worker kill -9: time to a new READY worker"] = f"{recovered:.1f} s"
    FIGURES["worker kill -9: in-flight request"] = f"HTTP {inflight['status']} after {inflight['seconds']:.1f} s"
    ok = len(results) == 24 and all(0 < r["probability"] < 1 for r in results) and new and new != [worker] \
        and inflight["seconds"] < 30
    record("Faults", "kill -9 of the worker during load (24 images, 5 in flight)",
           "TorchServe restarts it; in-flight requests fail fast; client retries score every image",
           f"all {len(results)} scored; new worker pid; in-flight request answered HTTP {inflight['status']} in "
           f"{inflight['seconds']:.1f} s; recovered in {recovered:.1f} s", ok)
    assert ok


def test_server_restart_mid_run(default_store: Path, tmp_path: Path) -> None:
    srv = start_server(default_store, tmp_path / "ts")
    images = [encode(lesion_rgb(seed=80 + s)) for s in range(12)]
    client = Client(srv.url, token=srv.keys()["inference"], retries=8, backoff=1.0, timeout=120,
                    key_file=srv.key_file, management_url=srv.management)
    restarted: list[Server] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(client.predict_bytes, d) for d in images]
            wait_until_done(futures, 2)  # answered by the first server
            pending = sum(not f.done() for f in futures)
            t = time.monotonic()
            stop_server(srv)
            restarted.append(start_server(default_store, srv.workdir, props=srv.props))
            downtime = time.monotonic() - t
            results = [f.result() for f in futures]
    finally:
        for s in restarted or [srv]:
            stop_server(s)
    FIGURES["server stop + start: downtime"] = f"{downtime:.1f} s"
    assert pending > 0, "every request had finished before the stop: no fault was tested"
    ok = len(results) == 12 and all(0 < r["probability"] < 1 for r in results)
    record("Faults", "server stopped and started mid-run (new keys)",
           "client retries and re-reads the key file; every image scored",
           f"all {len(results)} scored across {downtime:.1f} s of downtime", ok)
    assert ok


# ---------------------------------------------------------------------------------------------
# 4. Access
# ---------------------------------------------------------------------------------------------


def test_access(live: Server) -> None:
    data = encode(RGB)
    pred, mgmt = f"{live.url}/predictions/melanoma", f"{live.management}/models"
    keys = live.keys()
    cases = [
        ("inference, no key", requests.post(pred, data=data, timeout=30)),
        ("inference, wrong key", requests.post(pred, data=data, timeout=30,
                                               headers={"Authorization": "Bearer abcdefgh"})),
        ("inference, management key", requests.post(pred, data=data, timeout=30,
                                                    headers={"Authorization": f"Bearer {keys['management']}"})),
        ("management, no key", requests.get(mgmt, timeout=30)),
        ("management, wrong key", requests.get(mgmt, timeout=30, headers={"Authorization": "Bearer abcdefgh"})),
        ("management, inference key", requests.get(mgmt, timeout=30,
                                                   headers={"Authorization": f"Bearer {keys['inference']}"})),
    ]
    for name, r in cases:
        ok = r.status_code in (400, 401, 403) and "InvalidKeyException" in r.text
        record("Access", name, "refused (InvalidKeyException)", f"{r.status_code} {r.json().get('type')}", ok)
        assert ok, name

    h = {"Authorization": f"Bearer {keys['management']}"}
    for url in ("https://example.invalid/evil.mar", "file:///etc/passwd"):
        r = requests.post(f"{mgmt}?url={url}", headers=h, timeout=30)
        ok = r.status_code in (400, 404)
        record("Access", f"register a model from {url}", "refused (allowed_urls: model_store archives only)",
               f"{r.status_code} {r.json().get('message', '')[:80]}", ok)
        assert ok

    pids = [live.proc.pid, *[p.pid for p in psutil.Process(live.proc.pid).children(recursive=True)]]
    sockets = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.pid in pids}
    listening = sorted(f"{ip}:{port}" for ip, port in sockets)
    ok = bool(sockets) and all(is_loopback(ip) for ip, _ in sockets)
    record("Access", "listening sockets with the shipped config", "loopback only", ", ".join(listening), ok)
    assert ok


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # Java lists IPv4 sockets as ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def test_no_key_in_logs(live: Server) -> None:
    keys = list(live.keys().values())
    logs = live.workdir / "logs"
    text = "".join(read_log(logs, p.name) for p in logs.glob("*.log"))  # rolled-over days included
    text += (live.workdir / "torchserve.out").read_text(errors="replace")
    leaked = [k for k in keys if k in text]
    record("Access", "keys in the server's logs", "none", f"{len(leaked)} of {len(keys)} keys found", not leaked)
    assert not leaked


# ---------------------------------------------------------------------------------------------
# 5. Unsafe checkpoints
# ---------------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1, 2048)}, "x": _Exploit(str(marker))}, tmp_path / "x.ckpt")
    store = tmp_path / "store"
    store.mkdir()
    proc = build_in_process(str(tmp_path / "x.ckpt"), output_dir=store)  # the shell's own: test_build_mar.py
    ok = proc.returncode != 0 and "--trust-checkpoint" in proc.stderr and not marker.exists() \
        and not list(store.iterdir())
    record("Unsafe checkpoints", "a .ckpt whose pickle creates a file", "build refused, file not created",
           f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:120]}; file created: {marker.exists()}", ok)
    assert ok


def test_json_base64_large_image(live: Server, offline: LoadedArchive) -> None:
    """A full-size phone photo as base64 JSON (a third bigger than raw) still fits the request limit."""
    data = encode(np.asarray(Image.fromarray(RGB).resize((3000, 2250))), "JPEG", quality=90)
    r = requests.post(f"{live.url}/predictions/melanoma", json={"image": base64.b64encode(data).decode()},
                      headers=live.headers(), timeout=60)
    ok = r.status_code == 200 and abs(r.json()["probability"] - offline.score(data)["probability"]) <= SAME_ARCHIVE_DP
    record("Inputs", f"JSON base64 of a {len(data) / 1e6:.1f} MB photo", "200 with the in-process score",
           f"{r.status_code}", ok)
    assert ok


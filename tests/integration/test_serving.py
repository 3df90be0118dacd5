"""Real TorchServe with an archive from build_mar.sh: parity, inputs, batching, errors, auth."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from handler.archive import LoadedArchive, load_archive
from testkit.archives import BATCHED
from testkit.harness import ROOT, Server
from testkit.imaging import encode, lesion_rgb, variants
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = [pytest.mark.integration, pytest.mark.quick]  # part of scripts/test.sh --quick


@pytest.fixture(scope="module")
def offline(demo_archive: Path) -> LoadedArchive:
    return load_archive(demo_archive)


PARITY = ["jpeg", "png", "rgba_png", "gray_png", "exif6_jpeg", "webp", "gif", "heic", "exif6_heic"]


@pytest.mark.parametrize("kind", PARITY)
def test_served_probability_equals_in_process_pipeline(kind: str, server_of: Server, offline_of: LoadedArchive) -> None:
    data = variants(seed=3)[kind]
    r = server_of.predict(data)
    assert r.status_code == 200, r.text
    assert abs(r.json()["probability"] - offline_of.score(data)["probability"]) <= SAME_ARCHIVE_DP


def test_response_schema(server: Server, offline: LoadedArchive) -> None:
    r = server.predict(encode(lesion_rgb(seed=1)))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"probability", "raw_score", "label", "threshold", "operating_point", "calibration",
                         "tta_views", "model", "checks", "warning"}
    # input checks on a 320x240 lesion photo: resolution, sharpness and exposure pass; no validation set, no OOD fit
    checks = body["checks"]
    assert checks["resolution"] == {"flagged": False, "width": 320, "height": 240, "min_side": 128}
    assert not checks["blur"]["flagged"] and checks["blur"]["sharpness"] > checks["blur"]["min_sharpness"]
    assert not checks["exposure"]["flagged"] and 40 <= checks["exposure"]["median_luminance"] <= 235
    assert checks["out_of_distribution"]["flagged"] is None and "--validation-images" in \
        checks["out_of_distribution"]["reason"]
    assert checks["passed"] and checks["warnings"] == []
    assert checks == offline.score(encode(lesion_rgb(seed=1)))["checks"]
    assert 0.0 < body["probability"] < 1.0 and body["raw_score"] == body["probability"]  # not calibrated
    assert body["calibration"] == {"method": "none"}
    assert body["operating_point"] == {"threshold": 0.5, "chosen_for": "fixed threshold (build_mar.sh --threshold)"}
    assert body["label"] == ("malignant" if body["probability"] >= 0.5 else "benign")
    assert body["threshold"] == 0.5 and body["tta_views"] == 8
    assert body["model"] == {"name": "melanoma", "version": "0.0-demo", "demo": True, "precision": "fp32",
                             "runtime": "torchscript", "weights_sha256": offline.metadata.weights_sha256}
    assert "DEMO" in body["warning"] and "means nothing" in body["warning"]


def test_every_way_of_sending_an_image(server: Server, offline: LoadedArchive) -> None:
    data = encode(lesion_rgb(seed=2))
    expected = offline.score(data)["probability"]
    url, h = f"{server.url}/predictions/melanoma", server.headers()
    answers = {
        "PUT raw (curl -T)": requests.put(url, data=data, headers=h, timeout=60),
        "POST octet-stream": server.predict(data),
        "POST image/jpeg": server.predict(data, headers={"Content-Type": "image/jpeg"}),
        "multipart data": requests.post(url, files={"data": ("x.jpg", data)}, headers=h, timeout=60),
        "multipart file": requests.post(url, files={"file": ("x.jpg", data)}, headers=h, timeout=60),
        "JSON base64": requests.post(url, json={"image": base64.b64encode(data).decode()}, headers=h, timeout=60),
        "JSON data URL": requests.post(
            url, json={"image": "data:image/jpeg;base64," + base64.b64encode(data).decode()}, headers=h, timeout=60),
    }
    for how, r in answers.items():
        assert r.status_code == 200, f"{how}: {r.text}"
        assert abs(r.json()["probability"] - expected) <= SAME_ARCHIVE_DP, how


@pytest.mark.parametrize(
    "how,status,words",
    [
        ("empty", 400, "empty"),
        ("text", 415, "not an image"),
        ("truncated", 400, "truncated"),
        ("bomb", 413, "megapixels"),
        ("bad base64", 400, "base64"),
        ("json without image", 400, "\"image\""),
        ("broken json", 400, "JSON"),
        ("multipart without the file field", 400, "no image"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_json_message(how: str, status: int, words: str, server: Server) -> None:
    """...and the same answer from /explanations as from /predictions."""
    from testkit.imaging import png_header_only

    h = server.headers()
    raw = {**h, "Content-Type": "application/octet-stream"}
    answers = []
    for endpoint in ("predictions", "explanations"):
        url = f"{server.url}/{endpoint}/melanoma"
        if how == "empty":
            r = requests.post(url, data=b"", headers=raw, timeout=60)
        elif how == "text":
            r = requests.post(url, data=b"this is not an image", headers=raw, timeout=60)
        elif how == "truncated":
            r = requests.post(url, data=encode(lesion_rgb(seed=4))[:2000], headers=raw, timeout=60)
        elif how == "bomb":
            r = requests.post(url, data=png_header_only(40000, 40000), headers=raw, timeout=60)
        elif how == "bad base64":
            r = requests.post(url, json={"image": "not*base64!"}, headers=h, timeout=60)
        elif how == "json without image":
            r = requests.post(url, json={"img": "x"}, headers=h, timeout=60)
        elif how == "broken json":
            r = requests.post(url, data=b'{"image": ', headers={**h, "Content-Type": "application/json"}, timeout=60)
        else:
            r = requests.post(url, files={"photo": ("x.jpg", b"123")}, headers=h, timeout=60)
        assert r.status_code == status, f"{endpoint}: {r.text}"
        body = r.json()
        assert body["code"] == status and words in body["error"], endpoint
        answers.append(body)
    assert answers[0] == answers[1]


def test_batch_with_one_corrupt_request(server_of: Server, offline_of: LoadedArchive) -> None:
    """Four concurrent requests land in one TorchServe batch (the batched model: batchSize 4, and a delay so long
    that the batch leaves only when full); the corrupt one gets 400, the others their correct scores."""
    images = [encode(lesion_rgb(seed=s)) for s in range(10, 13)]
    bodies = [images[0], b"\xff\xd8\xff\xe0 corrupt", images[1], images[2]]
    before = server_of.log().count("batch of 4")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: server_of.predict(body, model=BATCHED), bodies))
    assert [r.status_code for r in answers] == [200, 400, 200, 200]
    for img, r in zip(images, [answers[0], answers[2], answers[3]], strict=True):
        assert abs(r.json()["probability"] - offline_of.score(img)["probability"]) <= SAME_ARCHIVE_DP
    assert "error" in answers[1].json()
    assert server_of.log().count("batch of 4") > before, "the four requests were not batched together"


def test_text_field_named_data_beside_ordinary_requests(server: Server, offline: LoadedArchive) -> None:
    """A multipart text field `data` (here holding base64 text) looks like a KServe instance; it must not
    switch its batch-mates to envelope answers. TorchServe hands the field over as bytes: it is read as an
    image body, which it is not, so it gets its own 415 JSON; each batch-mate keeps its own status and score."""
    images = [encode(lesion_rgb(seed=s)) for s in range(20, 23)]
    url, h = f"{server.url}/predictions/{BATCHED}", server.headers()
    calls = [
        lambda: requests.post(url, files={"data": (None, base64.b64encode(images[0]).decode())}, headers=h,
                              timeout=120),
        lambda: server.predict(images[1], model=BATCHED),
        lambda: server.predict(b"\xff\xd8\xff\xe0 corrupt", model=BATCHED),
        lambda: server.predict(images[2], model=BATCHED),
    ]
    before = server.log().count("batch of 4")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda call: call(), calls))
    assert [r.status_code for r in answers] == [415, 200, 400, 200], [r.text for r in answers]
    for r in answers:  # every answer is this request's own JSON object, never an envelope's dict
        assert r.headers["Content-Type"].startswith("application/json") and isinstance(r.json(), dict)
    assert answers[0].json()["code"] == 415 and "not an image" in answers[0].json()["error"]
    assert answers[2].json()["code"] == 400
    for img, r in zip(images[1:], [answers[1], answers[3]], strict=True):
        assert abs(r.json()["probability"] - offline.score(img)["probability"]) <= SAME_ARCHIVE_DP
    assert server.log().count("batch of 4") > before, "the four requests were not batched together"


def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text from the metrics address (loopback, no key): (name, labels) -> value."""
    text = requests.get(f"{server.metrics}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if m and not line.startswith("#"):
            out[(m.group(1), frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))] = float(m.group(3))
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_prometheus_metrics_count_exactly_what_was_served(server: Server) -> None:
    version = load_archive_metadata_version(server)
    ours = {"ModelName": "melanoma", "ModelVersion": version}
    before = scrape(server)
    good = [server.predict(encode(lesion_rgb(seed=s))) for s in (60, 61, 62)]
    bad = [server.predict(b"plain text, not an image"), server.predict(b"\xff\xd8\xff\xe0 corrupt")]
    assert [r.status_code for r in good + bad] == [200, 200, 200, 415, 400]
    want = {"200": 3, "415": 1, "400": 1}
    for _ in range(50):  # the worker's metric lines reach the frontend asynchronously
        after = scrape(server)
        moved = {k: metric(after, "MelanomaRequests", Status=k, **ours) - metric(before, "MelanomaRequests", Status=k,
                                                                               **ours) for k in want}
        scored = (metric(after, "MelanomaProbability_count", **ours)
                  - metric(before, "MelanomaProbability_count", **ours))
        if all(moved[k] >= n for k, n in want.items()) and scored >= 3:
            break
        time.sleep(0.2)
    assert moved == want
    # the probability histogram saw exactly the three scores; each stage was timed
    assert metric(after, "MelanomaProbability_count", **ours) - metric(before, "MelanomaProbability_count", **ours) == 3
    probs = sum(r.json()["probability"] for r in good)
    got = metric(after, "MelanomaProbability_sum", **ours) - metric(before, "MelanomaProbability_sum", **ours)
    assert abs(got - probs) <= 1e-6 * max(1.0, probs)
    # one batch each (sequential requests): five reach decoding, three get past it to the model
    for stage, n in (("decode", 5), ("preprocess", 3), ("forward", 3)):
        count = metric(after, "MelanomaStageSeconds_count", Stage=stage, **ours)
        assert count - metric(before, "MelanomaStageSeconds_count", Stage=stage, **ours) == n, stage
    assert metric(after, "MelanomaTTAViews", **ours) == 8


def load_archive_metadata_version(server: Server) -> str:
    h = {"Authorization": f"Bearer {server.keys()['management']}"}
    return requests.get(f"{server.management}/models/melanoma", headers=h, timeout=10).json()[0]["modelVersion"]


def test_token_is_required(server: Server) -> None:
    data = encode(lesion_rgb(seed=5))
    url = f"{server.url}/predictions/melanoma"
    bare_key = {"Authorization": server.keys()["inference"]}  # no "Bearer "
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, bare_key):
        r = requests.post(url, data=data, headers={"Content-Type": "application/octet-stream", **headers}, timeout=30)
        assert r.status_code in (400, 401), r.text
        assert "InvalidKeyException" in r.text and "probability" not in r.text
    assert requests.get(f"{server.url}/ping", timeout=10).status_code != 200
    # the management key is not the inference key
    r = requests.post(url, data=data, timeout=30, headers={"Authorization": f"Bearer {server.keys()['management']}"})
    assert "probability" not in r.text
    assert requests.get(f"{server.management}/models", timeout=10).status_code != 200
    # the model API (on, for scripts/update_model.sh) registers only archives in the store, never a download
    h = {"Authorization": f"Bearer {server.keys()['management']}"}
    r = requests.post(f"{server.management}/models?url=https://example.invalid/x.mar", headers=h, timeout=10)
    assert r.status_code in (400, 404) and "does not match any allowed URL" in r.text, r.text


def test_server_healthy_afterwards(server: Server) -> None:
    r = requests.get(f"{server.url}/ping", headers=server.headers(), timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "Healthy"
    assert "Worker disconnected" not in server.log("ts_log.log")
    assert server.log().count("melanoma model") == 1  # the worker was initialised once: never restarted
    # the worker runs the archive's handler package, not the checkout's (importable from .venv by name)
    code = re.search(r"handler code: (\S+)", server.log())
    assert code and not Path(code.group(1)).is_relative_to(ROOT), code


def test_client_predict_script(server: Server, offline: LoadedArchive, demo_archive: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for s in range(3):
        (folder / f"lesion{s}.jpg").write_bytes(encode(lesion_rgb(seed=20 + s)))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    cmd = [sys.executable, str(ROOT / "client" / "predict.py"), str(folder), "--url", server.url,
           "--key-file", str(server.key_file), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # one image failed
    rows = {Path(r["path"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"broken.png", "lesion0.jpg", "lesion1.jpg", "lesion2.jpg"}
    assert "HTTP 415" in rows["broken.png"]["error"]
    for s in range(3):
        expected = offline.score((folder / f"lesion{s}.jpg").read_bytes())["probability"]
        assert abs(rows[f"lesion{s}.jpg"]["probability"] - expected) <= SAME_ARCHIVE_DP
    assert "DEMO MODEL" in proc.stderr and "1 of 4 image(s) failed" in proc.stderr
    # plain output: path, probability, label
    one = subprocess.run([*cmd[:2], str(folder / "lesion0.jpg"), "--url", server.url, "--key-file",
                          str(server.key_file)], capture_output=True, text=True, timeout=60)
    path, prob, label = one.stdout.split("\t")[:3]
    assert one.returncode == 0 and float(prob) == pytest.approx(rows["lesion0.jpg"]["probability"], abs=SAME_ARCHIVE_DP)
    assert label.split()[0] in ("benign", "malignant")
    # offline mode: same pipeline, no server
    off = subprocess.run([*cmd[:2], str(folder / "lesion0.jpg"), "--offline", str(demo_archive), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert off.returncode == 0
    expected = rows["lesion0.jpg"]["probability"]
    assert json.loads(off.stdout)["probability"] == pytest.approx(expected, abs=SAME_ARCHIVE_DP)
    # a wrong key: non-zero exit, the server's message
    bad = subprocess.run([*cmd[:2], str(folder / "lesion0.jpg"), "--url", server.url, "--token", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "inference key was refused" in bad.stderr and "nope" not in bad.stderr


def test_concurrent_load_every_answer_correct(server_of: Server, offline_of: LoadedArchive) -> None:
    images = [encode(lesion_rgb(seed=30 + s)) for s in range(6)]
    expected = [offline_of.score(d)["probability"] for d in images]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(server_of.predict, images * 4))
    got = np.array([r.json()["probability"] for r in answers]).reshape(4, 6)
    assert all(r.status_code == 200 for r in answers)
    assert np.abs(got - np.array(expected)[None]).max() <= SAME_ARCHIVE_DP

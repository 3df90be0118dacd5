"""POST /explanations/melanoma on real TorchServe: the prediction's probability plus a LayerCAM heatmap."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from handler.archive import LoadedArchive, load_archive
from testkit.harness import ROOT, Server
from testkit.imaging import encode, lesion_rgb
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = [pytest.mark.integration, pytest.mark.quick]  # part of scripts/test.sh --quick


@pytest.fixture(scope="module")
def offline(demo_archive: Path) -> LoadedArchive:
    return load_archive(demo_archive)


def explain(server: Server, data: bytes, **headers: str) -> requests.Response:
    h = {"Content-Type": "application/octet-stream", **server.headers(), **headers}
    return requests.post(f"{server.url}/explanations/melanoma", data=data, headers=h, timeout=120)


def test_explanation_probability_equals_prediction(server_of: Server) -> None:
    for seed in range(3):
        data = encode(lesion_rgb(seed=40 + seed))
        p = server_of.predict(data)
        e = explain(server_of, data)
        assert p.status_code == 200 and e.status_code == 200, e.text
        assert e.json()["probability"] == p.json()["probability"]  # the same number, not just close
        assert {k: v for k, v in e.json().items() if k != "explanation"} == p.json()


def test_heatmap_shape_range_and_overlay(server: Server) -> None:
    data = encode(lesion_rgb(300, 400, seed=41))
    body = explain(server, data).json()["explanation"]
    heat = np.array(body["heatmap"], dtype=float)
    assert body["method"] == "layer-cam" and body["layer"] == "layer3" and body["grid"] == [8, 8]
    assert body["image_size"] == [300, 400] and body["shape"] == [192, 256] and heat.shape == (192, 256)
    assert np.isfinite(heat).all() and 0 <= heat.min() and heat.max() <= 1
    assert "overlay_png" not in body
    h = server.headers()
    url = f"{server.url}/explanations/melanoma"
    asks = {
        "header": explain(server, data, **{"X-Overlay": "true"}),
        "multipart field": requests.post(url, files={"data": ("x.jpg", data)}, data={"overlay": "true"},
                                         headers=h, timeout=120),
        "JSON": requests.post(url, json={"image": base64.b64encode(data).decode(), "overlay": True}, headers=h,
                              timeout=120),
    }
    for how, r in asks.items():
        e = r.json()["explanation"]
        png = Image.open(io.BytesIO(base64.b64decode(e["overlay_png"])))
        assert png.format == "PNG" and png.size == (256, 192), how
        assert np.abs(np.array(e["heatmap"]) - heat).max() <= 1e-4, how


def test_mixed_batch_of_predictions_and_explanations(server: Server, offline: LoadedArchive) -> None:
    """Concurrent requests to both endpoints share TorchServe batches; each gets its own kind of answer."""
    images = [encode(lesion_rgb(seed=50 + s)) for s in range(4)]
    expected = [offline.score(d)["probability"] for d in images]
    calls = [(server.predict, images[0]), (lambda d: explain(server, d), images[1]),
             (server.predict, images[2]), (lambda d: explain(server, d), images[3])]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda c: c[0](c[1]), calls))
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        assert ("explanation" in r.json()) == (i % 2 == 1)
        assert abs(r.json()["probability"] - expected[i]) <= SAME_ARCHIVE_DP


def test_client_explain_writes_heatmap_png(server: Server, demo_archive: Path, tmp_path: Path) -> None:
    img = tmp_path / "lesion.jpg"
    img.write_bytes(encode(lesion_rgb(240, 320, seed=42)))
    cmd = [sys.executable, str(ROOT / "client" / "predict.py"), str(img), "--explain", "--json"]
    served = subprocess.run([*cmd, "--url", server.url, "--key-file", str(server.key_file)],
                            capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr
    row = json.loads(served.stdout)
    out = tmp_path / "lesion.heatmap.png"
    assert row["explanation"]["heatmap_png"] == str(out) and "heatmap" not in row["explanation"]
    assert Image.open(out).size == (256, 192)  # the heatmap size: longer side capped at 256
    served_png = np.asarray(Image.open(out), dtype=int)
    out.unlink()
    offline = subprocess.run([*cmd, "--offline", str(demo_archive)], capture_output=True, text=True, timeout=180)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["probability"] == pytest.approx(row["probability"], abs=SAME_ARCHIVE_DP)
    assert np.abs(np.asarray(Image.open(out), dtype=int) - served_png).max() <= 2  # same overlay, offline

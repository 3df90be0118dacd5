"""The same .mar under the TorchServe settings KServe and SageMaker use, on real TorchServe (loopback):
the v1 envelope of KServe's (legacy) TorchServe runtime; SageMaker's GET /ping + POST /invocations; and the
keyless /ping + /predictions that KServe's custom predictor container (deploy/kserve/container.properties,
the same auth settings as SageMaker's) serves its probes and callers."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from handler.archive import load_archive
from testkit.harness import ROOT, Server, start_server, stop_server
from testkit.imaging import encode, lesion_rgb
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = pytest.mark.integration


def deploy_props(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    text = (ROOT / path).read_text().splitlines()
    pairs = dict(line.split("=", 1) for line in text if line and not line.startswith("#") and "=" in line)
    return {k: pairs[k] for k in keys}


@pytest.fixture(scope="module")
def kserve(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    overrides = deploy_props(Path("deploy/kserve/config/config.properties"),
                             ("service_envelope", "disable_token_authorization"))
    srv = start_server(demo_store, tmp_path_factory.mktemp("kserve"), overrides)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def sagemaker(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    overrides = deploy_props(Path("deploy/sagemaker/config.properties"), ("disable_token_authorization",))
    srv = start_server(demo_store, tmp_path_factory.mktemp("sagemaker"), overrides)
    yield srv
    stop_server(srv)


def test_kserve_v1_envelope(kserve: Server, demo_archive: Path) -> None:
    offline = load_archive(demo_archive)
    images = [encode(lesion_rgb(seed=90)), encode(lesion_rgb(seed=91), "HEIF")]  # HEIC: what phones save
    body = {"instances": [{"data": base64.b64encode(images[0]).decode()},
                          {"data": base64.b64encode(b"not an image").decode()},
                          {"data": base64.b64encode(images[1]).decode()}]}
    r = requests.post(f"{kserve.url}/predictions/melanoma", json=body, timeout=120)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    assert "probability" in preds[2], preds[2]  # a base64 HEIC once got 415: its bytes were not known as an image
    for img, pred in zip(images, (preds[0], preds[2]), strict=True):
        assert abs(pred["probability"] - offline.score(img)["probability"]) <= SAME_ARCHIVE_DP
        assert pred["model"]["demo"] is True
    assert preds[1]["code"] == 415 and "not an image" in preds[1]["error"]


def test_kserve_envelope_limits(kserve: Server) -> None:
    """Over 8 instances, or a body of many values, the whole request is refused with 413 and our JSON, before any
    instance is decoded (TorchServe's envelope parsed any body whole and took any number)."""
    from handler.request import MAX_INSTANCES

    instance = {"data": base64.b64encode(encode(lesion_rgb(64, 64, seed=97))).decode()}
    url = f"{kserve.url}/predictions/melanoma"
    r = requests.post(url, json={"instances": [instance] * (MAX_INSTANCES + 1)}, timeout=120)
    assert r.status_code == 413, r.text
    (refusal,) = r.json()["predictions"]
    assert refusal["code"] == 413 and f"the limit is {MAX_INSTANCES}" in refusal["error"]
    bomb = b'{"instances": [' + b"{}," * 100_000 + b"{}]}"
    r = requests.post(url, data=bomb, headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 413 and "JSON body with" in r.json()["predictions"][0]["error"], r.text
    r = requests.post(url, json={"instances": [instance] * MAX_INSTANCES}, timeout=120)
    assert r.status_code == 200 and len(r.json()["predictions"]) == MAX_INSTANCES


def test_sagemaker_ping_and_invocations(sagemaker: Server, demo_archive: Path) -> None:
    offline = load_archive(demo_archive)
    data = encode(lesion_rgb(seed=95))
    ping = requests.get(f"{sagemaker.url}/ping", timeout=10)  # SageMaker's health check sends no header
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    r = requests.post(f"{sagemaker.url}/invocations", data=data,
                      headers={"Content-Type": "application/octet-stream"}, timeout=120)
    assert r.status_code == 200, r.text
    assert abs(r.json()["probability"] - offline.score(data)["probability"]) <= SAME_ARCHIVE_DP
    # KServe's custom predictor container: the same auth settings, the ordinary endpoint, no key
    assert deploy_props(Path("deploy/kserve/container.properties"), ("disable_token_authorization",)) == \
        deploy_props(Path("deploy/sagemaker/config.properties"), ("disable_token_authorization",))
    plain = requests.post(f"{sagemaker.url}/predictions/melanoma", data=data,
                          headers={"Content-Type": "application/octet-stream"}, timeout=120)
    expected = offline.score(data)["probability"]
    assert plain.status_code == 200 and abs(plain.json()["probability"] - expected) <= SAME_ARCHIVE_DP
    bad = requests.post(f"{sagemaker.url}/invocations", data=b"text",
                        headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert bad.status_code == 415 and bad.json()["code"] == 415

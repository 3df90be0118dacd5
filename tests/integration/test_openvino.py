"""The opt-in OpenVINO runtime (./build_mar.sh --runtime openvino), on the demo and the trained fixture: built
by build_mar.sh, served by real TorchServe through the same handler and pipeline, and scoring what the default
TorchScript archive of the same weights scores, within the export's own verification bound."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from client.tsclient import wait_ready
from exporter.export import RTOL
from handler.archive import ONNX_MODEL_FILE, LoadedArchive, load_archive
from handler.pipeline import load_tensor, tta_views
from testkit.harness import Server, run_build, start_server, stop_server
from testkit.imaging import encode, lesion_rgb
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = pytest.mark.integration

NAMES = {"demo": "melanoma", "trained": "ovtrained"}  # start_server waits for "melanoma"; the fixture for the other


@pytest.fixture(scope="module")
def ov_store(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("openvino") / "model_store"
    store.mkdir()
    for weights, name in NAMES.items():
        ckpt = [] if weights == "demo" else [str(trained_checkpoint)]
        run_build(*ckpt, "--runtime", "openvino", "--model-name", name, "--no-explain", output_dir=store)
    return store


@pytest.fixture(scope="module")
def ov_server(ov_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(ov_store, tmp_path_factory.mktemp("ts-openvino"), {"load_models": "all"})
    if not wait_ready(srv.management, srv.key_file, NAMES["trained"], timeout=240):
        stop_server(srv)
        raise RuntimeError(f"{NAMES['trained']} did not become ready: {srv.log()[-3000:]}")
    yield srv
    stop_server(srv)


def images() -> list[bytes]:
    return [encode(lesion_rgb(seed=700 + i)) for i in range(6)]


def test_archive_holds_onnx_and_says_openvino(ov_store: Path) -> None:
    with zipfile.ZipFile(ov_store / f"{NAMES['demo']}.mar") as z:
        names = set(z.namelist())
    assert ONNX_MODEL_FILE in names and "model.pt" not in names
    meta = load_archive(ov_store / f"{NAMES['demo']}.mar").metadata
    assert meta.runtime == "openvino" and meta.precision_name == "fp32"
    assert meta.model_file == ONNX_MODEL_FILE and meta.precision["openvino"]


def test_openvino_scores_what_torchscript_scores(weights: str, ov_store: Path, archive_of: Path,
                                                 offline_of: LoadedArchive) -> None:
    """Logits of both runtimes on the handler's own 8-view batches. Each export is verified against the eager
    model to RTOL x (|logit| + scale) (exporter/export.py), so the two may differ by at most twice that; the
    probabilities a user gets are then compared through the whole pipeline."""
    ov = load_archive(ov_store / f"{NAMES[weights]}.mar")
    cfg = offline_of.cfg
    imgs = images()
    x = tta_views(torch.stack([load_tensor(d, cfg) for d in imgs]), cfg.tta_views).contiguous()
    with torch.inference_mode():
        ref = offline_of.scorer.model(x).float()
        got = ov.scorer.model(x).float()
    assert got.shape == ref.shape == (len(x), 1 + 512 + 1024 + 2048)  # the logit, then the pooled stages
    ref, got = ref[:, :1], got[:, :1]
    scale = max(1.0, float(ref.abs().median()))
    assert bool(((got - ref).abs() <= 2 * RTOL * (ref.abs() + scale)).all()), float((got - ref).abs().max())
    # sigmoid is 1/4-Lipschitz: the logit bound above, averaged over each image's views, in probability
    views = ref.reshape(cfg.tta_views, -1).abs()
    p_bound = 0.25 * 2 * RTOL * (views + scale).mean(dim=0)
    for d, bound in zip(imgs, p_bound.tolist(), strict=True):
        p_ts, p_ov = offline_of.score(d)["probability"], ov.score(d)["probability"]
        assert abs(p_ov - p_ts) <= bound


def test_served_by_torchserve(weights: str, ov_server: Server, ov_store: Path) -> None:
    name = NAMES[weights]
    offline = load_archive(ov_store / f"{name}.mar")
    for d in images()[:3]:
        r = requests.post(f"{ov_server.url}/predictions/{name}", data=d, timeout=120,
                          headers={"Content-Type": "application/octet-stream", **ov_server.headers()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["runtime"] == "openvino" and body["model"]["precision"] == "fp32"
        assert abs(body["probability"] - offline.score(d)["probability"]) <= SAME_ARCHIVE_DP
    bad = requests.post(f"{ov_server.url}/predictions/{name}", data=b"not an image", timeout=60,
                        headers={"Content-Type": "application/octet-stream", **ov_server.headers()})
    assert bad.status_code == 415 and "error" in bad.json()


def test_runtime_openvino_refuses_bf16(tmp_path: Path) -> None:
    proc = run_build("--runtime", "openvino", "--precision", "bf16", "--validation-images", str(tmp_path),
                     output_dir=tmp_path, check=False)
    assert proc.returncode != 0 and "--runtime openvino serves fp32 only" in proc.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []

"""build_mar.sh --precision: a bf16 archive (AOTInductor) measured against fp32 on the user's images, refused
above the bound, served by real TorchServe and saying its precision in every response, refused at load on a
machine it was not compiled for; fp32 stays the default and unchanged."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from exporter.checkpoint import load_checkpoint
from exporter.export import (
    BF16_RELATIVE,
    Bfloat16Logit,
    MalignancyLogit,
    cxx_compiler,
    eager_outputs,
    feature_scale,
    served_module,
    verification_images,
    verification_noise,
)
from handler.archive import check_runtime, cpu_flags, load_archive, precision_warning
from handler.explain import explain_images, load_explainer
from testkit.harness import ROOT, Server, missing_system_tool, run_build, start_server, stop_server
from testkit.imaging import encode, lesion_rgb

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 generated photos in an ISIC-2020-style folder with a train.csv (labels: half of them)."""
    folder = tmp_path_factory.mktemp("calibration")
    rows = []
    for i in range(24):
        name = f"ISIC_{9000 + i:07d}"
        (folder / f"{name}.jpg").write_bytes(encode(lesion_rgb(seed=400 + i)))
        rows.append({"image_name": name, "target": i % 2})
    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_name", "target"])
        w.writeheader()
        w.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def compiler() -> None:
    if cxx_compiler() is None:
        missing_system_tool("bf16 archives are compiled with g++, which is not installed: sudo apt-get install g++")


@pytest.fixture(scope="module")
def bf16_store(compiler: None, calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    store = tmp_path_factory.mktemp("bf16") / "model_store"
    store.mkdir()
    proc = run_build("--precision", "bf16", "--validation-images", str(calibration), "--validation-labels",
                     str(calibration / "train.csv"), output_dir=store)
    return store, proc.stderr


def test_bf16_archive_is_measured_and_says_so(bf16_store: tuple[Path, str], demo_archive: Path) -> None:
    store, stderr = bf16_store
    assert "bf16 vs fp32 on 24 validation image(s): max |dp|" in stderr and "AUC fp32" in stderr
    names = zipfile.ZipFile(store / "melanoma.mar").namelist()
    assert "model.pt2" in names and "model.pt" not in names  # the compiled package, not TorchScript
    archive = load_archive(store / "melanoma.mar")
    prec = archive.metadata.precision
    assert prec["name"] == "bf16" and prec["images"] == 24 and prec["labelled"] == 24 and prec["bound"] == 0.02
    assert 0 < prec["max_abs_dp"] <= 0.02 and prec["mean_abs_dp"] <= prec["max_abs_dp"]
    assert "auc_fp32" in prec and "auc_reduced" in prec
    assert prec["format"] == "aotinductor" and prec["torch"] == torch.__version__
    # the flags of the vector ISA Inductor picked on this machine, whatever CPU that is
    assert prec["cpu_flags"] and set(prec["cpu_flags"]) <= cpu_flags()
    assert archive.metadata.model_file == "model.pt2"
    fp32 = load_archive(demo_archive)
    diffs = []
    for seed in range(500, 506):  # images the build never saw
        data = encode(lesion_rgb(seed=seed))
        res = archive.score(data)
        assert res["model"]["precision"] == "bf16"
        diffs.append(abs(res["probability"] - fp32.score(data)["probability"]))
    assert max(diffs) <= 0.02 and max(diffs) > 0  # really reduced, and within the bound
    # explanations still work beside a bf16 model (explain.pt stays fp32)
    data = encode(lesion_rgb(seed=501))
    body = explain_images(load_explainer(archive), [data], [archive.scorer.score_bytes(data)],
                          archive.metadata, [False])[0]
    assert body["model"]["precision"] == "bf16" and body["explanation"]["shape"] == [192, 256]


def _eager_bf16_feature_error(checkpoint: Path) -> float:
    """The worst pooled-feature error of the network merely rounded to bf16 (eager, no compiler) on the export
    check's own images and noise, in the check's units (exporter.export.feature_scale)."""
    ckpt = load_checkpoint(checkpoint)
    ref = MalignancyLogit(ckpt.module, ckpt.outputs).eval()
    rounded = Bfloat16Logit(served_module(copy.deepcopy(ckpt.module), ckpt.outputs)).eval()
    worst = 0.0
    with torch.inference_mode():
        for x in (verification_images(128), *verification_noise(128)):
            (_, feats), got = eager_outputs(ref, x), rounded(x).float()
            for f, g in zip(feats, torch.split(got[:, 1:], [f.shape[1] for f in feats], dim=1), strict=True):
                worst = max(worst, float(((g - f).abs() / feature_scale(f)).max()))
    return worst


@pytest.mark.slow
def test_bf16_agreement_measured_on_trained_weights(compiler: None, trained_checkpoint: Path, heldout_data: Path,
                                                   tmp_path: Path) -> None:
    """The agreement that matters is a trained network's: the trained fixture in bf16, measured on 96 held-out
    images of its task with labels. Whether bf16 meets the default 0.02 depends on the CPU's bf16 arithmetic
    (an earlier AVX2-only machine without native bf16: max |dp| 0.0161, mean 0.0004, AUC equal), so both outcomes are
    checked for what they must be: written within the bound with the AUC kept, or refused with one line
    naming the measured difference, nothing written. A third outcome was seen with a fixture trained on an AMD
    EPYC (docs/PRECISION.md): the export check refused the compiled package's pooled layer2 features (0.365 x
    the bound's scale, bound 0.3) before any agreement was measured, because bf16 itself is that far off there
    (the same network rounded to bf16, eager, no compiler: 0.292). That refusal must be one line with nothing
    written, and explained by bf16's own rounding, never by a compile that lost the network."""
    proc = run_build(str(trained_checkpoint), "--precision", "bf16", "--no-explain", "--validation-images",
                     str(heldout_data / "jpeg"), "--validation-labels", str(heldout_data / "train.csv"),
                     output_dir=tmp_path, check=False)
    assert "reused from" not in proc.stderr  # other weights: compiled anew, never the demo's package
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    report = next((ln for ln in proc.stderr.splitlines() if ln.startswith("bf16 vs fp32 on 96 validation image(s)")),
                  None)
    if report is None:
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr
        assert "the bf16 model's pooled" in errors[0] and "does not export faithfully" in errors[0], proc.stderr
        assert list(tmp_path.iterdir()) == []
        own = _eager_bf16_feature_error(trained_checkpoint)
        assert own >= BF16_RELATIVE / 2, f"bf16 alone is off by {own:.3f} x scale: the refusal is the compile's"
        return
    max_dp = float(report.split("max |dp| ")[1].split(",")[0])
    if proc.returncode == 0:
        prec = load_archive(tmp_path / "melanoma.mar").metadata.precision
        assert prec["name"] == "bf16" and prec["images"] == 96 and prec["labelled"] == 96
        assert prec["max_abs_dp"] == pytest.approx(max_dp, abs=1e-4) and 0 < max_dp <= 0.02
        assert prec["auc_fp32"] >= 0.95 and abs(prec["auc_reduced"] - prec["auc_fp32"]) <= 0.01
    else:
        assert len(errors) == 1 and f"up to {max_dp:.4f}" in errors[0] and max_dp > 0.02, proc.stderr
        assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bf16_server(bf16_store: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(bf16_store[0], tmp_path_factory.mktemp("ts-bf16"))
    yield srv
    stop_server(srv)


def test_bf16_archive_served(bf16_server: Server, bf16_store: tuple[Path, str]) -> None:
    """Real TorchServe loads the compiled package in its worker and answers what the pipeline computes."""
    archive = load_archive(bf16_store[0] / "melanoma.mar")
    for seed in (600, 601):
        data = encode(lesion_rgb(seed=seed))
        r = bf16_server.predict(data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["precision"] == "bf16"
        assert abs(body["probability"] - archive.score(data)["probability"]) <= 1e-6
    bad = bf16_server.predict(b"not an image")
    assert bad.status_code == 415 and "not an image" in bad.json()["error"]
    assert "ready: " in bf16_server.log() and "bf16" in bf16_server.log()


def test_bf16_archive_refused_where_it_cannot_run(bf16_store: tuple[Path, str]) -> None:
    meta = json.loads(zipfile.ZipFile(bf16_store[0] / "melanoma.mar").read("metadata.json"))
    check_runtime(meta["precision"])  # this machine built it
    needed = meta["precision"]["cpu_flags"]
    with pytest.raises(RuntimeError, match=rf"compiled for CPUs with .*; this CPU lacks {needed[0]}.*: rebuild it"):
        check_runtime(meta["precision"], "flags\t: fpu sse")
    other = {**meta, "precision": {**meta["precision"], "torch": "2.99.0"}}
    with pytest.raises(RuntimeError, match=r"compiled for torch 2\.99\.0, this is torch .*rebuild it"):
        check_runtime(other["precision"])
    old = {**meta, "precision": {k: v for k, v in meta["precision"].items() if k != "format"}}
    with pytest.raises(RuntimeError, match="format no longer served; rebuild it"):
        check_runtime(old["precision"])
    check_runtime({"name": "fp32"}, "flags\t: fpu")  # fp32 runs anywhere


def test_bf16_build_without_a_compiler_fails_fast(calibration: Path, tmp_path: Path) -> None:
    proc = run_build("--precision", "bf16", "--validation-images", str(calibration), "--no-explain",
                     output_dir=tmp_path, check=False, env={**os.environ, "CXX": "/nonexistent/g++"})
    assert proc.returncode == 2
    assert "needs a C++ compiler" in proc.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_refused_above_the_bound_and_nothing_written(bf16_store: tuple[Path, str], calibration: Path,
                                                     tmp_path: Path) -> None:
    """The same weights as bf16_store: the compiled package comes from the session's compile cache (verified
    against the eager model like a fresh one), so only the bound decides here."""
    assert "reused from" not in bf16_store[1]  # the first bf16 build of the demo compiled
    proc = run_build("--precision", "bf16", "--validation-images", str(calibration), "--max-delta", "0.000001",
                     "--no-explain", output_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "bf16: compiled package reused from" in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("build_mar: error: bf16 differs from fp32 by up to") and "nothing written" in last
    assert list(tmp_path.iterdir()) == []
    forced = run_build("--precision", "bf16", "--validation-images", str(calibration), "--max-delta", "0.000001",
                       "--force-precision", "--no-explain", output_dir=tmp_path)
    assert forced.returncode == 0 and "bf16: compiled package reused from" in forced.stderr
    prec = load_archive(tmp_path / "melanoma.mar").metadata.precision
    assert prec["name"] == "bf16" and prec["bound"] == 1e-6 < prec["max_abs_dp"]  # written above it, and says so


@pytest.mark.parametrize("args,words", [
    (("--precision", "int8"), "needs --validation-images"),
    (("--precision", "bf16"), "needs --validation-images"),
    (("--precision", "bf16", "--validation-images", "/nonexistent"), "does not exist"),
    (("--max-delta", "0"), "--max-delta must be between 0 and 1"),
])
def test_bad_precision_options_fail_fast(args: tuple[str, ...], words: str, tmp_path: Path) -> None:
    proc = run_build(*args, output_dir=tmp_path, check=False)
    assert proc.returncode == 2 and words in proc.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_int8_needs_images_beyond_its_calibration(calibration: Path, tmp_path: Path) -> None:
    """int8 is calibrated on a quarter of the images and measured on the rest: 24 leave too few to measure."""
    proc = run_build("--precision", "int8", "--validation-images", str(calibration), "--no-explain",
                     output_dir=tmp_path, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "int8 needs at least 27 images (24 given)" in last, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_fp32_stays_the_default(demo_archive: Path) -> None:
    meta = json.loads(zipfile.ZipFile(demo_archive).read("metadata.json"))
    assert meta["precision"] == {"name": "fp32"}
    assert load_archive(demo_archive).score(encode(lesion_rgb(seed=1)))["model"]["precision"] == "fp32"


def test_cpu_check_for_bf16() -> None:
    assert precision_warning("fp32", "flags\t: fpu sse avx2") is None
    assert precision_warning("bf16", "flags\t: fpu avx2 avx512f avx512_bf16") is None
    assert precision_warning("bf16", "flags\t: fpu amx_bf16") is None
    warning = precision_warning("bf16", "flags\t: fpu sse avx2 avx512f")
    assert warning is not None and "slower than fp32" in warning and "--precision fp32" in warning


@pytest.mark.slow
def test_bench_times_precisions_side_by_side(bf16_store: tuple[Path, str], demo_archive: Path,
                                             tmp_path: Path) -> None:
    """bench.py --bf16 produces its side-by-side figures (smoke mode; benchmarks are not tests: no time asserted)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--precisions-only",
                           "--threads", "1", "--archive", str(demo_archive),
                           "--bf16", str(bf16_store[0] / "melanoma.mar"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    (pr,) = res["precisions"]
    assert set(pr["archives"]) == {"fp32", "bf16"} and pr["archives"]["bf16"]["precision"]["name"] == "bf16"
    assert set(res["served_precisions"]) == {"fp32", "bf16"}
    assert all(v["128px"]["median_ms"] > 0 for v in res["served_precisions"].values())
    assert "| served precision" in proc.stdout

"""build_mar.sh --precision int8 on trained weights: torchao's static quantisation calibrated on a quarter of the
validation images, measured against fp32 on the other three quarters, refused above the bound (nothing written)
or written within it, compiled into real int8 kernels, and served by real TorchServe as the offline pipeline
scores it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torch import nn

from exporter.checkpoint import load_checkpoint
from exporter.export import REDUCED_MULTIPLE, cxx_compiler, served_module
from exporter.int8 import keep_fp32
from handler.archive import load_archive
from testkit import cpuclass
from testkit.harness import Server, missing_system_tool, run_build, start_server, stop_server
from testkit.imaging import encode, lesion_rgb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOUND = 0.02  # build_mar.sh's default --max-delta


@pytest.fixture(scope="module")
def int8_build(trained_checkpoint: Path, heldout_data: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One build with --force-precision: the export check (the compiled package against the quantised graph run
    eagerly) must pass on every CPU class, so the archive is written whatever int8's agreement with fp32, and the
    serving tests have it either way. The refusal on agreement without --force-precision is the same code as
    bf16's (test_precision.py checks it on the demo)."""
    if cxx_compiler() is None:
        missing_system_tool("int8 archives are compiled with g++, which is not installed: sudo apt-get install g++")
    store = tmp_path_factory.mktemp("int8") / "model_store"
    store.mkdir()
    proc = run_build(str(trained_checkpoint), "--precision", "int8", "--no-explain", "--force-precision",
                     "--validation-images", str(heldout_data / "jpeg"), "--validation-labels",
                     str(heldout_data / "train.csv"), output_dir=store, check=False)
    assert proc.returncode == 0, proc.stderr  # an export refusal is never forced
    return store, proc


def test_int8_agreement_measured_on_trained_weights(int8_build: tuple[Path, subprocess.CompletedProcess[str]],
                                                    record_property: Callable[[str, object], None]) -> None:
    """24 of the 96 held-out images calibrate the quantiser; the figure is measured on the 72 others. Whether int8
    meets 0.02 is the network's and the CPU's (docs/PRECISION.md has the measurement): within it, the AUC is kept;
    above it, the build says it wrote the archive only because it was forced, and the archive records both."""
    store, proc = int8_build
    report = next(ln for ln in proc.stderr.splitlines() if ln.startswith("int8 vs fp32 on "))
    assert report.startswith("int8 vs fp32 on 72 image(s) it was not calibrated on (24 others calibrated it)")
    max_dp = float(report.split("max |dp| ")[1].split(",")[0])
    prec = load_archive(store / "melanoma.mar").metadata.precision
    assert prec["name"] == "int8" and prec["images"] == 72 and prec["labelled"] == 72 and prec["bound"] == BOUND
    assert prec["calibrated_on"] == 24 and "calibration_images" not in prec  # said once
    assert prec["max_abs_dp"] == pytest.approx(max_dp, abs=1e-4) and max_dp > 0
    assert prec["auc_fp32"] >= 0.95
    check = prec["export_check"]
    assert check["worst_multiple"] <= check["multiple"] == REDUCED_MULTIPLE
    assert check["reference"] == "the network run eagerly in int8"
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING: --force-precision")]
    assert len(warned) == (max_dp > BOUND) and not [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    if max_dp <= BOUND:
        assert abs(prec["auc_reduced"] - prec["auc_fp32"]) <= 0.01
    record_property("branch", f"{cpuclass.describe(cpuclass.native() or 'none')}: written, export check at "
                              f"{check['worst_multiple']:.2f} of {check['multiple']:g} x int8's own error; agreement "
                              f"max |dp| {max_dp:.4f} ({'within' if max_dp <= BOUND else 'above, forced'} {BOUND})")


def test_int8_archive_runs_int8_kernels(int8_build: tuple[Path, subprocess.CompletedProcess[str]],
                                        trained_checkpoint: Path) -> None:
    """Every convolution and linear layer the quantiser was given became a oneDNN int8 kernel in the compiled
    code (without freezing none would, and the model would silently run fp32); the kept ones are named."""
    prec = load_archive(int8_build[0] / "melanoma.mar").metadata.precision
    served = served_module(load_checkpoint(trained_checkpoint).module, 1)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in served.modules())
    assert prec["kept_fp32"] == keep_fp32(served)
    assert prec["int8_kernels"] == layers - len(prec["kept_fp32"])
    assert prec["format"] == "aotinductor" and "X86InductorQuantizer" in prec["quantizer"]


@pytest.fixture(scope="module")
def int8_server(int8_build: tuple[Path, subprocess.CompletedProcess[str]],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(int8_build[0], tmp_path_factory.mktemp("ts-int8"))
    yield srv
    stop_server(srv)


def test_int8_archive_served(int8_server: Server, int8_build: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Real TorchServe loads the int8 package in its worker (no torchao there) and answers what the offline
    pipeline computes, input checks included (fitted on the int8 model's own features)."""
    archive = load_archive(int8_build[0] / "melanoma.mar")
    for seed in (700, 701):
        data = encode(lesion_rgb(seed=seed))
        r = int8_server.predict(data)
        assert r.status_code == 200, r.text
        body, offline = r.json(), archive.score(data)
        assert body["model"]["precision"] == "int8"
        assert abs(body["probability"] - offline["probability"]) <= 1e-6
        got, want = body["checks"]["out_of_distribution"], offline["checks"]["out_of_distribution"]
        assert got["flagged"] == want["flagged"] and abs(got["distance"] - want["distance"]) <= 1e-3
    bad = int8_server.predict(b"not an image")
    assert bad.status_code == 415 and "not an image" in bad.json()["error"]

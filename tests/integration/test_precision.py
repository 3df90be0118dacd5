"""build_mar.sh --precision: a bf16 archive measured against fp32 on the user's images, refused above the
bound, and saying its precision in every response; fp32 stays the default and unchanged."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest
from harness import run_build
from imaging import encode, lesion_rgb

from handler.explain import explain_images, load_explainer
from handler.pipeline import load_archive, precision_warning

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


def test_bf16_archive_is_measured_and_says_so(calibration: Path, demo_archive: Path, tmp_path: Path) -> None:
    proc = run_build("--precision", "bf16", "--calibration-dir", str(calibration), "--calibration-labels",
                     str(calibration / "train.csv"), output_dir=tmp_path)
    assert "bf16 vs fp32 on 24 calibration image(s): max |dp|" in proc.stderr and "AUC fp32" in proc.stderr
    archive = load_archive(tmp_path / "melanoma.mar")
    prec = archive.metadata["precision"]
    assert prec["name"] == "bf16" and prec["images"] == 24 and prec["labelled"] == 24 and prec["bound"] == 0.02
    assert 0 < prec["max_abs_dp"] <= 0.02 and prec["mean_abs_dp"] <= prec["max_abs_dp"]
    assert "auc_fp32" in prec and "auc_reduced" in prec
    fp32 = load_archive(demo_archive)
    diffs = []
    for seed in range(500, 506):  # images the build never saw
        data = encode(lesion_rgb(seed=seed))
        res = archive.score(data)
        assert res["model"]["precision"] == "bf16"
        diffs.append(abs(res["probability"] - fp32.score(data)["probability"]))
    assert max(diffs) <= 0.02 and max(diffs) > 0  # really reduced, and within the bound
    # explanations still work beside a bf16 model.pt (explain.pt stays fp32)
    data = encode(lesion_rgb(seed=501))
    body = explain_images(load_explainer(archive), [data], [archive.score(data)["probability"]],
                          archive.metadata, [False])[0]
    assert body["model"]["precision"] == "bf16" and body["explanation"]["shape"] == [192, 256]


def test_refused_above_the_bound_and_nothing_written(calibration: Path, tmp_path: Path) -> None:
    proc = run_build("--precision", "bf16", "--calibration-dir", str(calibration), "--max-delta", "0.000001",
                     "--no-explain", output_dir=tmp_path, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("build_mar: error: bf16 differs from fp32 by up to") and "nothing written" in last
    assert list(tmp_path.iterdir()) == []
    forced = run_build("--precision", "bf16", "--calibration-dir", str(calibration), "--max-delta", "0.000001",
                       "--force-precision", "--no-explain", output_dir=tmp_path)
    assert forced.returncode == 0 and (tmp_path / "melanoma.mar").exists()


@pytest.mark.parametrize("args,words", [
    (("--precision", "int8"), "int8 is not available"),
    (("--precision", "bf16"), "needs --calibration-dir"),
    (("--precision", "bf16", "--calibration-dir", "/nonexistent"), "does not exist"),
    (("--max-delta", "0"), "--max-delta must be between 0 and 1"),
])
def test_bad_precision_options_fail_fast(args: tuple[str, ...], words: str, tmp_path: Path) -> None:
    proc = run_build(*args, output_dir=tmp_path, check=False)
    assert proc.returncode == 2 and words in proc.stderr.strip().splitlines()[-1]
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

"""client/evaluate.py on generated ISIC-format data: served, offline, compare, resume, bad files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from isic import metrics
from testkit.harness import ROOT, Server
from testkit.imaging import encode, lesion_rgb
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = [pytest.mark.integration, pytest.mark.quick]  # part of scripts/test.sh --quick
EVALUATE = [sys.executable, str(ROOT / "client" / "evaluate.py")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 labelled images (PNG and JPEG), one label without an image, one unreadable image."""
    root = tmp_path_factory.mktemp("isic")
    imgs = root / "train"
    imgs.mkdir()
    rows = []
    for i in range(16):
        name = f"ISIC_{i:07d}"
        target = i % 3 == 0
        ext = ".jpg" if i % 2 else ".png"
        (imgs / f"{name}{ext}").write_bytes(encode(lesion_rgb(seed=100 + i), "JPEG" if ext == ".jpg" else "PNG"))
        rows.append((name, int(target)))
    rows.append(("ISIC_missing", 0))
    (imgs / "ISIC_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    rows.append(("ISIC_broken", 1))
    with open(root / "train.csv", "w", newline="") as f:  # SIIM-ISIC 2020
        w = csv.writer(f)
        w.writerow(["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                    "diagnosis", "benign_malignant", "target"])
        for i, (name, t) in enumerate(rows):  # three images per patient
            w.writerow([name, f"IP_{i // 3}", "male", 45, "torso", "melanoma" if t else "nevus",
                        "malignant" if t else "benign", t])
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:  # ISIC 2019
        w = csv.writer(f)
        w.writerow(["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"])
        for name, t in rows:
            w.writerow([name, f"{t:.1f}", f"{1 - t:.1f}", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"])
    return root


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EVALUATE, *args, "--no-progress"], capture_output=True, text=True, timeout=600)


def read_scores(path: Path) -> dict[str, tuple[int, float]]:
    with open(path, newline="") as f:
        return {r["image"]: (int(r["target"]), float(r["probability"])) for r in csv.DictReader(f)}


def test_served_offline_and_compare(server: Server, demo_archive: Path, dataset: Path, tmp_path: Path) -> None:
    served = run("--labels", str(dataset / "train.csv"), "--images", str(dataset / "train"), "--url", server.url,
                 "--key-file", str(server.key_file), "--out", str(tmp_path / "served"))
    # one image could not be scored: the report is written, and the exit status says it is incomplete
    assert served.returncode == 1 and "1 image(s) could not be scored" in served.stderr, served.stderr
    s = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert s["bootstrap"] == "patient"  # the 2020 file names patients
    assert (s["labels"], s["scored"], s["missing_images"], s["unreadable_images"]) == (18, 16, 1, 1)
    assert s["missing_names"] == ["ISIC_missing"] and "ISIC_broken" in s["unreadable"]
    assert "DEMO" in s["warning"] and "means nothing" in served.stdout
    scores = read_scores(tmp_path / "served" / "scores.csv")
    y = np.array([t for t, _ in scores.values()])
    p = np.array([q for _, q in scores.values()])
    assert s["auc"] == pytest.approx(metrics.auc(y, p)) and s["positives"] == int(y.sum())
    # scikit-learn's own figures, on the scores the CSV holds
    assert s["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert s["average_precision"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert set(s["subgroups"]) == {"sex", "age_approx", "anatom_site_general"}  # the 2020 file's: no skin type
    assert (tmp_path / "served" / "roc.png").stat().st_size > 1000
    assert (tmp_path / "served" / "reliability.png").stat().st_size > 1000
    assert s["ece"] == pytest.approx(metrics.expected_calibration_error(y, p)) and s["brier"] == pytest.approx(
        metrics.brier(y, p))
    lo, hi = s["sensitivity_at_threshold_95ci"]
    assert lo <= s["sensitivity_at_threshold"] <= hi

    offline = run("--labels", str(dataset / "ISIC_2019_Training_GroundTruth.csv"), "--images",
                  str(dataset / "train"), "--offline", str(demo_archive), "--out", str(tmp_path / "offline"))
    assert offline.returncode == 1, offline.stderr
    off_summary = json.loads((tmp_path / "offline" / "summary.json").read_text())
    assert off_summary["bootstrap"] == "image" and off_summary["subgroups"] == {}  # 2019's ground truth: neither
    off = read_scores(tmp_path / "offline" / "scores.csv")
    assert set(off) == set(scores)
    assert max(abs(off[n][1] - scores[n][1]) for n in off) <= SAME_ARCHIVE_DP
    assert all(off[n][0] == scores[n][0] for n in off)  # both label formats give the same targets

    cmp = run("--labels", str(dataset / "train.csv"), "--images", str(dataset / "train"), "--url", server.url,
              "--key-file", str(server.key_file), "--compare", str(demo_archive), "--out", str(tmp_path / "cmp"))
    assert cmp.returncode == 1, cmp.stderr
    c = json.loads((tmp_path / "cmp" / "summary.json").read_text())["compare"]
    assert c["images"] == 16 and c["max_abs_delta"] <= SAME_ARCHIVE_DP


@pytest.mark.slow  # full depth only: not a main path, and ~30-60 s here
def test_resume_scores_only_what_is_left_and_only_with_the_same_model(demo_archive: Path, dataset: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "resume"
    args = ("--labels", str(dataset / "train.csv"), "--images", str(dataset / "train"), "--offline",
            str(demo_archive), "--out", str(out))
    assert run(*args).returncode == 1  # complete but for the unreadable image
    record = json.loads((out / "scores.model.json").read_text())
    assert record["tta_views"] == 8 and len(record["weights_sha256"]) == 64 and record["precision"] == "fp32"
    # an interrupted run: 2 of 16 done (sentinel values show they are kept, not re-scored)
    (out / "scores.csv").write_text("image,target,probability\nISIC_0000000,,0.1234567890\n"
                                    "ISIC_0000001,,0.9876543210\n")
    r = run(*args)
    assert r.returncode == 1, r.stderr
    scores = read_scores(out / "scores.csv")
    assert len(scores) == 16
    assert scores["ISIC_0000000"][1] == pytest.approx(0.123456789)
    assert scores["ISIC_0000001"][1] == pytest.approx(0.987654321)
    # scores written by another model are never mixed in
    (out / "scores.model.json").write_text(json.dumps({**record, "weights_sha256": "0" * 64}))
    other = run(*args)
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "written by another model" in other.stderr
    (out / "scores.model.json").unlink()
    unknown = run(*args)
    assert unknown.returncode == 2 and "no record of the model" in unknown.stderr


@pytest.mark.parametrize("content,words", [
    ("name,label\nx,1\n", "expected columns"),
    ("image_name,target\nISIC_1,maybe\n", "other than 0/1"),
    ("", "no rows"),
])
def test_bad_label_files(content: str, words: str, dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text(content)
    r = run("--labels", str(tmp_path / "labels.csv"), "--images", str(dataset / "train"), "--offline", "x.mar",
            "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1

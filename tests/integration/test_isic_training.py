"""Issue #41's acceptance, on one small training run shared by the module: `python -m train` on a 2019 + 2020 pair
that shares images and lesions (--val-source 2020 --init scratch --image-size 96) prints the per-source table,
keeps every patient and lesion on one side of the split, and records its pipeline; ./build_mar.sh then builds it
at 96 px with no size option, and real TorchServe serves it at 96 px, scoring as the eager model does; evaluation
reads an isic-cli download and an ISIC 2024 file through that archive."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

from exporter.checkpoint import load_checkpoint
from exporter.export import RTOL, logit_bound
from handler.archive import load_archive
from handler.pipeline import IMAGE_SIZE, PipelineConfig, load_tensor, tta_views
from isic.labels import read_sources
from testkit.harness import ROOT, run_build, serve_archive, stop_server
from testkit.isic_data import Pair, write_2024, write_archive_download, write_pair
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIZE = 96  # not the default: what must travel from the training run to the served archive


class Run(NamedTuple):
    pair: Pair
    out: Path
    proc: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("isic-pair")
    pair = write_pair(root)
    out = root / "run"
    cmd = [sys.executable, "-m", "train", "--labels", str(pair.csv_2020), "--labels", str(pair.truth_2019),
           "--labels", str(pair.metadata_2019), "--images", str(pair.images_2020), "--images", str(pair.images_2019),
           "--val-source", "2020", "--val-fraction", "0.25", "--init", "scratch", "--image-size", str(SIZE),
           "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--precision", "fp32", "--device", "cpu",
           "--threads", "2", "--seed", "3", "--save-every", "0", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Run(pair, out, proc)


def test_the_pair_trains_and_the_table_comes_first(run: Run) -> None:
    lines = run.proc.stderr.splitlines()
    table = {ln.split()[1]: ln.split()[2:8] for ln in lines if ln.split()[1:2] in (["2020"], ["2019"])}
    # source: images, melanoma, train, validation, unused (other sources' images of a validation patient/lesion)
    images, mel, train, val, unused = zip(*(map(int, table[s][:5]) for s in ("2020", "2019")), strict=True)
    pair = run.pair
    assert images == (pair.images["2020"], pair.images["2019"])
    assert mel == (pair.melanomas["2020"], pair.melanomas["2019"])
    assert val[1] == 0 and unused[0] == 0 and val[0] > 0 and train[1] + unused[1] == pair.images["2019"]
    assert train[0] + val[0] == pair.images["2020"]
    row19 = next(ln for ln in lines if ln.split()[1:2] == ["2019"])
    assert f"{pair.duplicates - pair.relabelled} already in 2020, {pair.relabelled} already in 2020 (with another " \
           "label)" in row19
    first_epoch = next(i for i, ln in enumerate(lines) if "epoch 1/1" in ln)
    assert lines.index(row19) < first_epoch  # printed before training
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["sources"]["2019"]["validation"] == 0 and summary["unused_images"] == unused[1]


def test_no_patient_or_lesion_crosses_the_split(run: Run) -> None:
    split = json.loads((run.out / "split.json").read_text())
    rows = {r.name: r for r in read_sources([run.pair.csv_2020, run.pair.truth_2019, run.pair.metadata_2019]).rows}
    train, val = [rows[n] for n in split["train"]], [rows[n] for n in split["validation"]]
    assert {r.source for r in val} == {"2020"} and {r.source for r in train} == {"2019", "2020"}
    for key in ("patient", "lesion"):
        assert not {getattr(r, key) for r in train} & {getattr(r, key) for r in val} - {""}, key
    # A 2019 image whose lesion is a 2020 patient's follows that patient: validation (so unused) or training.
    val_patients = {r.patient for r in val}
    for image, patient in run.pair.lesion_links.items():
        assert (image in split["unused"]) == (patient in val_patients), image
    assert len(split["train"]) + len(split["validation"]) + len(split["unused"]) == len(rows)


def test_the_checkpoint_records_the_whole_pipeline(run: Run) -> None:
    hp = torch.load(run.out / "best.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["pipeline"] == PipelineConfig(image_size=SIZE).to_mapping()
    assert hp["init"] == "scratch" and hp["val_source"] == "2020" and len(hp["labels"]) == 3


@pytest.fixture(scope="module")
def archive(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store96")
    proc = run_build(str(run.out / "best.ckpt"), "--no-explain", output_dir=store)  # no size option
    assert f"pipeline from the checkpoint's record: image_size {SIZE}" in proc.stderr, proc.stderr
    return store / "melanoma.mar"


def test_a_size_that_contradicts_the_record_is_refused(run: Run, archive: Path, tmp_path: Path) -> None:
    proc = run_build(str(run.out / "best.ckpt"), "--image-size", str(IMAGE_SIZE), output_dir=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("error") == 1, proc.stderr
    assert f"--image-size {IMAGE_SIZE} contradicts the checkpoint, trained with image_size {SIZE}" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def eager_views(model: torch.nn.Module, data: bytes, cfg: PipelineConfig) -> torch.Tensor:
    """Independent reference: the eager network, one TTA view at a time, on `cfg`'s preprocessing."""
    with torch.inference_mode():
        return torch.stack([model(v[None]).float()[0, 0] for v in tta_views(load_tensor(data, cfg)[None], 8)])


def test_trained_at_96_built_and_served_at_96(run: Run, archive: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        handler = yaml.safe_load(z.read("model-config.yaml"))["handler"]
        meta = json.loads(z.read("metadata.json"))
    assert handler["image_size"] == SIZE and meta["checks"]["limits"]["min_side"] == SIZE
    model = load_checkpoint(run.out / "best.ckpt").module.eval()
    offline = load_archive(archive)
    names = json.loads((run.out / "split.json").read_text())["validation"][:4]
    images = [(run.pair.images_2020 / f"{n}.jpg").read_bytes() for n in names]
    srv = serve_archive(archive)
    try:
        served = []
        for data in images:
            r = srv.predict(data)
            assert r.status_code == 200, r.text
            served.append(r.json())
    finally:
        stop_server(srv)
    gap_at_default = 0.0
    for data, body in zip(images, served, strict=True):
        assert body["checks"]["resolution"]["min_side"] == SIZE
        assert abs(body["probability"] - offline.score(data)["probability"]) <= SAME_ARCHIVE_DP
        # The export's bound (exporter/export.py): |dlogit| <= RTOL x (|logit| + scale), so a TTA probability
        # within a quarter of its mean over the views (sigmoid is 1/4-Lipschitz).
        logits = eager_views(model, data, PipelineConfig(image_size=SIZE))
        bound, _ = logit_bound(logits, RTOL)
        expected = float(torch.sigmoid(logits.double()).mean())
        assert abs(body["probability"] - expected) <= 0.25 * float(bound.mean()), (body["probability"], expected)
        at_default = float(torch.sigmoid(eager_views(model, data, PipelineConfig()).double()).mean())
        gap_at_default = max(gap_at_default, abs(at_default - expected) / (0.25 * float(bound.mean())))
    # The check can fail: served at the default size instead, the same network misses that bound (by 3.3x on this
    # one-epoch network, measured; a network trained longer tells the sizes apart by far more).
    assert gap_at_default > 1, gap_at_default


def test_evaluation_reads_todays_layouts_and_matches_scikit_learn(archive: Path, tmp_path: Path) -> None:
    """client/evaluate.py on an isic-cli download and an ISIC 2024 file at once, through the 96 px archive: the
    sources' counts, scikit-learn's figures on the scores it wrote, a per-source table, the skin-type table (only the
    download has the column), and the submission file in the isic_id layout."""
    download = write_archive_download(tmp_path)
    csv24, images24, melanomas24 = write_2024(tmp_path)
    out = tmp_path / "evaluation"
    proc = subprocess.run([sys.executable, str(ROOT / "client" / "evaluate.py"), "--labels", str(download.folder),
                           "--labels", str(csv24), "--images", str(download.folder), "--images", str(images24),
                           "--offline", str(archive), "--out", str(out), "--scores-csv", str(tmp_path / "sub.csv"),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["sources"]["archive"]["excluded"] == {"Indeterminate (--indeterminate exclude)": download.indeterminate,
                                                   "without a diagnosis": download.undiagnosed}
    assert (s["per_source"]["archive"]["images"], s["per_source"]["archive"]["melanoma"]) == (
        download.melanomas + download.others, download.melanomas)
    assert (s["per_source"]["2024"]["images"], s["per_source"]["2024"]["melanoma"]) == (12, melanomas24)
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["target"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    assert s["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert s["average_precision"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert set(s["subgroups"]) == {"sex", "age_approx", "anatom_site_general", "fitzpatrick_skin_type"}
    assert "skin type (Fitzpatrick)" in proc.stdout and "per source" in proc.stdout
    with open(tmp_path / "sub.csv", newline="") as f:
        submission = list(csv.reader(f))
    assert submission[0] == ["isic_id", "target"] and len(submission) == 1 + len(rows)
    assert all((out / name).stat().st_size > 10_000 for name in ("roc.png", "reliability.png"))

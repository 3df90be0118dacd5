"""isic/evaluation.py: its figures are scikit-learn's, the bootstrap's numpy twins (isic/metrics.py) equal them, the
partial AUC is ISIC 2024's own, and the subgroup tables appear for the metadata columns the files have, only."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from client.evaluate import summarize, write_submission
from isic import evaluation, metrics
from isic.labels import read_sources
from testkit.isic_data import write_2024, write_archive_download, write_pair


@pytest.mark.parametrize("seed", range(4))
def test_the_numpy_twins_equal_scikit_learn_ties_included(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    p = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounding makes ties
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert metrics.average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    # ISIC 2024's formula on scikit-learn, and the direct integral above TPR 0.8 (max 0.2)
    assert evaluation.pauc_above_tpr(y, p) == pytest.approx(metrics.partial_auc_above_tpr(y, p, 0.8), abs=1e-12)


def test_figures_are_scikit_learns_with_intervals_around_them() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p = rng.random(300) + 0.5 * y
    groups = np.array([f"patient:{i // 3}" for i in range(300)])
    f = evaluation.figures(y, p, groups, n=300)
    assert f["auc"] == roc_auc_score(y, p) and f["average_precision"] == average_precision_score(y, p)
    assert f["bootstrap"] == "group" and (f["images"], f["melanoma"]) == (300, int(y.sum()))
    for key in ("auc", "pauc_above_80_tpr", "average_precision"):
        lo, hi = f[key + "_95ci"]
        assert lo < f[key] < hi, key
    assert evaluation.figures(np.zeros(5), np.ones(5)) == {"images": 5, "melanoma": 0,
                                                            "note": "one class only: no AUC"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("isic")
    pair, download, (csv24, _, _) = write_pair(root), write_archive_download(root), write_2024(root)
    return {"2020": [pair.csv_2020], "2019": [pair.truth_2019], "2019+meta": [pair.truth_2019, pair.metadata_2019],
            "archive+2024": [download.folder, csv24]}


@pytest.mark.parametrize(("which", "tables"), [
    ("2020", {"sex", "age_approx", "anatom_site_general"}),
    ("2019", set()),  # the ground truth alone has no metadata
    ("2019+meta", {"sex", "age_approx", "anatom_site_general"}),
    ("archive+2024", {"sex", "age_approx", "anatom_site_general", "fitzpatrick_skin_type"}),
])
def test_subgroup_tables_only_for_columns_that_exist(sources: dict[str, list[Path]], which: str,
                                                     tables: set[str]) -> None:
    rows = read_sources(sources[which]).rows
    rng = np.random.default_rng(0)
    scores = {r.name: float(rng.random()) for r in rows}
    out = evaluation.breakdown(rows, scores, n=50)
    assert set(out["subgroups"]) == tables
    assert bool(out["per_source"]) == (which == "archive+2024")  # a table per source when there are several
    for column, by_value in out["subgroups"].items():
        assert sum(f["images"] for f in by_value.values()) == len(rows), column  # every image in one row
    if "age_approx" in tables:
        assert set(out["subgroups"]["age_approx"]) <= {name for _, name in evaluation.AGE_BANDS} | {evaluation.MISSING}
    if which == "archive+2024":  # 2024 has no skin type: its images are "(not given)", not left out
        assert out["subgroups"]["fitzpatrick_skin_type"][evaluation.MISSING]["images"] >= 12


def test_summary_figures_and_the_submission_file(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    label_set = read_sources(sources["archive+2024"])
    rng = np.random.default_rng(1)
    scores = {r.name: float(rng.random() * 0.5 + 0.4 * r.target) for r in label_set.rows}
    labels = {r.name: r.target for r in label_set.rows}
    s = summarize(labels, scores, 0.5, {r.name: r.group for r in label_set.rows})
    y = np.array([labels[n] for n in labels])
    p = np.array([scores[n] for n in labels])
    assert s["auc"] == roc_auc_score(y, p) and s["average_precision"] == average_precision_score(y, p)
    assert s["bootstrap"] == "patient"  # the archive and 2024 name patients
    write_submission(tmp_path / "sub.csv", label_set, scores)
    with open(tmp_path / "sub.csv", newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["isic_id", "target"] and len(got) == 1 + len(scores)
    assert {r[0]: float(r[1]) for r in got[1:]} == pytest.approx(scores, abs=1e-10)
    write_submission(tmp_path / "sub20.csv", read_sources(sources["2020"]), {})
    assert (tmp_path / "sub20.csv").read_text().splitlines() == ["image_name,target"]  # SIIM-ISIC 2020's layout

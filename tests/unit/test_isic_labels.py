"""isic/labels.py and train/data.py's split on ISIC data as ISIC ships it: every layout told apart by its columns,
the isic-cli diagnosis hierarchy and its Indeterminate policy, several sources combined (an image listed twice kept
once, groups joined through patients and lesions), and a split that no patient or lesion crosses."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from isic.labels import LabelError, LabelRow, read_label_rows, read_source, read_sources
from testkit.isic_data import Download, Pair, write_2024, write_archive_download, write_pair
from train.data import DataError, check_split, grouped_split


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, Download, Path, int]:
    root = tmp_path_factory.mktemp("isic")
    csv24, _, melanomas24 = write_2024(root)
    return write_pair(root), write_archive_download(root), csv24, melanomas24


def test_each_layout_is_told_by_its_columns_not_its_name(data: tuple[Pair, Download, Path, int],
                                                         tmp_path: Path) -> None:
    pair, download, csv24, melanomas24 = data
    cases = [(pair.csv_2020, "2020", 24), (pair.truth_2019, "2019", 16), (csv24, "2024", 12),
             (download.folder, "archive", download.melanomas + download.others),
             (download.folder / "metadata.csv", "archive", download.melanomas + download.others)]
    for i, (path, key, n) in enumerate(cases):
        renamed = tmp_path / f"labels-{i}.csv"  # a name that says nothing
        shutil.copy(path / "metadata.csv" if path.is_dir() else path, renamed)
        for p in (path, renamed):
            source = read_source(p)
            assert (source.layout.key, len(source.rows)) == (key, n), p
    rows24 = read_label_rows(csv24)
    assert sum(r.target for r in rows24) == melanomas24 and all(r.patient.startswith("IP_") for r in rows24)
    assert {r.lesion for r in rows24} > {""}  # 2024 names a lesion for some images


def test_an_unknown_layout_gets_one_line_naming_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "other.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(LabelError) as e:
        read_label_rows(tmp_path / "other.csv")
    msg = str(e.value)
    assert "\n" not in msg and "found file, label" in msg
    for columns in ("image_name,target", "image,MEL", "image,lesion_id", "isic_id,target", "isic_id,diagnosis_1"):
        assert f"{columns} (" in msg, columns
    (tmp_path / "folder").mkdir()
    with pytest.raises(LabelError, match="without metadata.csv"):
        read_label_rows(tmp_path / "folder")


@pytest.mark.parametrize("policy", ["exclude", "benign", "malignant"])
def test_the_diagnosis_hierarchy_and_the_indeterminate_policy(data: tuple[Pair, Download, Path, int],
                                                              policy: str) -> None:
    download = data[1]
    source = read_source(download.folder, policy)
    targets = {r.name: r.target for r in source.rows}
    with open(download.folder / "metadata.csv", newline="") as f:
        meta = {r["isic_id"]: r for r in csv.DictReader(f)}
    for name, row in meta.items():
        d1, d2 = row["diagnosis_1"], row["diagnosis_2"]
        if not d1 or (d1 == "Indeterminate" and policy == "exclude"):
            assert name not in targets, name
        elif d1 == "Indeterminate":
            assert targets[name] == (policy == "malignant"), name
        else:  # melanoma by diagnosis_2, whatever diagnosis_3 says; other malignancies are not melanoma
            assert targets[name] == (d2 == "Malignant melanocytic proliferations (Melanoma)"), name
    assert sum(targets.values()) == download.melanomas + (download.indeterminate if policy == "malignant" else 0)
    excluded = {"without a diagnosis": download.undiagnosed}
    if policy == "exclude":
        excluded["Indeterminate (--indeterminate exclude)"] = download.indeterminate
    assert source.excluded == excluded
    assert source.rows[0].meta["fitzpatrick_skin_type"] == "II"  # the subgroup columns travel with the row


def test_a_malignancy_of_unknown_kind_is_excluded_not_guessed(tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    path.write_text("isic_id,diagnosis_1,diagnosis_2\nISIC_1,Malignant,\nISIC_2,Benign,\nISIC_3,Malignant,"
                    "Malignant melanocytic proliferations (Melanoma)\n")
    source = read_source(path)
    assert [(r.name, r.target) for r in source.rows] == [("ISIC_2", 0), ("ISIC_3", 1)]
    assert source.excluded == {"Malignant without diagnosis_2": 1}


def test_2019_metadata_adds_lesions_and_needs_its_ground_truth(data: tuple[Pair, Download, Path, int]) -> None:
    pair = data[0]
    with pytest.raises(LabelError, match="holds no labels: give it beside its ground truth"):
        read_sources([pair.metadata_2019])
    alone = read_sources([pair.truth_2019]).rows
    assert all(r.lesion == "" and r.group == f"image:{r.name}" for r in alone)
    joined = {r.name: r for r in read_sources([pair.truth_2019, pair.metadata_2019]).rows}
    ham = [r for r in joined.values() if r.lesion == "HAM_0000001"]
    assert len(ham) == 3 and len({r.group for r in ham}) == 1  # one lesion, several images: one group
    assert joined["ISIC_1900000"].meta["sex"] in ("female", "male")


def test_sources_combine_with_duplicates_dropped_and_groups_joined(data: tuple[Pair, Download, Path, int]) -> None:
    pair = data[0]
    labels = read_sources([pair.csv_2020, pair.truth_2019, pair.metadata_2019])
    by_source = {s: [r for r in labels.rows if r.source == s] for s in ("2020", "2019")}
    assert {s: len(rows) for s, rows in by_source.items()} == pair.images
    assert {s: sum(r.target for r in rows) for s, rows in by_source.items()} == pair.melanomas
    (s20, s19, _) = labels.sources
    assert s20.excluded == {} and sum(s19.excluded.values()) == pair.duplicates
    assert s19.excluded.get("already in 2020 (with another label)") == pair.relabelled
    names = [r.name for r in labels.rows]
    assert len(names) == len(set(names))
    group = {r.name: r.group for r in labels.rows}
    for image, patient in pair.lesion_links.items():  # a 2019 image of a 2020 lesion joins that patient's group
        assert group[image] == f"patient:{patient}"
    table = labels.table()
    assert table[1].split()[:3] == ["2020", "24", "6"]
    assert table[2].split()[:3] == ["2019", str(pair.images["2019"]), str(pair.melanomas["2019"])]
    assert "already in 2020 (with another label)" in table[2]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("val_source", [None, "2020"])
def test_no_patient_or_lesion_crosses_the_split(data: tuple[Pair, Download, Path, int], seed: int,
                                                val_source: str | None) -> None:
    pair = data[0]
    rows = read_sources([pair.csv_2020, pair.truth_2019, pair.metadata_2019]).rows
    split = grouped_split(rows, 0.3, seed, val_source)
    train, val = [rows[i] for i in split.train], [rows[i] for i in split.validation]
    assert len(split.train) + len(split.validation) + len(split.unused) == len(rows)
    for key in ("patient", "lesion", "group"):
        assert not {getattr(r, key) for r in train} & {getattr(r, key) for r in val} - {""}, key
    if val_source:
        assert {r.source for r in val} == {"2020"}
        # what is left out: other sources' images that share a patient or lesion with a validation image
        assert all(rows[i].source != "2020" and rows[i].group in {r.group for r in val} for i in split.unused)
    else:
        assert split.unused == []


def test_the_split_check_fails_on_a_grouping_that_lets_a_patient_cross() -> None:
    """The check is on the identifiers, not the groups: rows grouped by image alone (the bug it guards against)
    put one patient on both sides, and the split refuses."""
    rows = [LabelRow(f"ISIC_{i}", i % 2, f"image:ISIC_{i}", "2020", f"IP_{i // 4}") for i in range(16)]
    with pytest.raises(DataError, match="puts patient IP_.* on both sides"):
        for seed in range(20):  # some seed splits a patient's 4 images
            grouped_split(rows, 0.25, seed)
    check_split(rows, [0, 1, 2, 3], [4, 5, 6, 7])  # apart: accepted
    lesions = [r._replace(patient="", lesion="IL_1") for r in rows[:2]]
    with pytest.raises(DataError, match="puts lesion IL_1 on both sides"):
        check_split(lesions, [0], [1])


def test_val_source_must_name_a_source(data: tuple[Pair, Download, Path, int]) -> None:
    rows = read_sources([data[0].csv_2020]).rows
    with pytest.raises(DataError, match=r"--val-source 2019: no such source among the labels \(2020\)"):
        grouped_split(rows, 0.25, 0, "2019")

"""ISIC label files, read as ISIC ships them, and the image folders they name.

Layouts, recognised by their columns (never by file name):
- SIIM-ISIC 2020 `train.csv` (and ISIC_2020_Training_GroundTruth*.csv): image_name, target[, patient_id,
  lesion_id, sex, age_approx, anatom_site_general_challenge, ...];
- ISIC 2019 ground truth `ISIC_2019_Training_GroundTruth.csv`: image, MEL (one-hot) ...; its metadata
  `ISIC_2019_Training_Metadata.csv` (image, lesion_id, sex, age_approx, anatom_site_general), given beside it,
  adds the lesion (HAM10000 lesions have several images) and the subgroup columns;
- ISIC 2024 (SLICE-3D) `train-metadata.csv`: isic_id, target, patient_id[, lesion_id, sex, ...];
- an isic-cli download (`isic image download OUTDIR`): OUTDIR/metadata.csv, or the folder itself, with isic_id and
  the diagnosis hierarchy diagnosis_1..5. Melanoma (invasive, in situ, metastasis, NOS) is diagnosis_2 ==
  MELANOMA_DIAGNOSIS_2; every other Benign or Malignant diagnosis is not melanoma; Indeterminate follows a stated
  policy (INDETERMINATE_POLICIES, excluded by default); rows without a diagnosis are excluded and counted.

Several files combine into one LabelSet (read_sources): each row keeps its source, an image listed by two
sources is kept once (the first), and images that share a patient or a lesion, in any source, form one group
for the split. Stdlib only: shared by evaluation (client-only installs), training and the build.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo", ".heic", ".heif"}
MELANOMA_DIAGNOSIS_2 = "Malignant melanocytic proliferations (Melanoma)"
INDETERMINATE_POLICIES = ("exclude", "benign", "malignant")
ARCHIVE_METADATA = "metadata.csv"  # what `isic image download OUTDIR` writes beside the images
# Subgroup columns, under one name whatever the layout calls them (SIIM-ISIC 2020: anatom_site_general_challenge).
SUBGROUP_COLUMNS = {"sex": ("sex",), "age_approx": ("age_approx",),
                    "anatom_site_general": ("anatom_site_general", "anatom_site_general_challenge"),
                    "fitzpatrick_skin_type": ("fitzpatrick_skin_type",)}


class LabelError(Exception):
    """A label file that cannot be used; the message is one line."""


class LabelRow(NamedTuple):
    name: str
    target: int  # 1 = melanoma
    group: str  # the split's unit: images linked by a patient or a lesion, in any source (see read_sources)
    source: str = ""  # the name of the source it came from (Layout.key, numbered when one layout comes twice)
    patient: str = ""
    lesion: str = ""
    meta: Mapping[str, str] = {}  # SUBGROUP_COLUMNS its file has (read-only), e.g. {"sex": "female"}


@dataclass(frozen=True)
class Layout:
    key: str  # the source's name in tables and --val-source
    title: str
    required: tuple[str, ...]
    name_column: str


LAYOUTS = (
    Layout("2024", "ISIC 2024 train-metadata.csv", ("isic_id", "target"), "isic_id"),
    Layout("archive", "isic-cli download metadata.csv", ("isic_id", "diagnosis_1"), "isic_id"),
    Layout("2020", "SIIM-ISIC 2020 train.csv", ("image_name", "target"), "image_name"),
    Layout("2019", "ISIC 2019 ground truth", ("image", "MEL"), "image"),
    Layout("2019-metadata", "ISIC 2019 metadata", ("image", "lesion_id"), "image"),
)
KNOWN = ("image_name,target (SIIM-ISIC 2020 train.csv), image,MEL (ISIC 2019 ground truth), image,lesion_id (its "
         "metadata CSV, given beside it), isic_id,target (ISIC 2024 train-metadata.csv) or isic_id,diagnosis_1 (an "
         "isic-cli download folder or its metadata.csv)")


@dataclass
class Source:
    """One label file as read: its kept rows, and how many rows it excluded and why."""

    path: Path
    layout: Layout
    rows: list[LabelRow]
    excluded: dict[str, int] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.layout.key


@dataclass
class LabelSet:
    """Several sources combined: the rows kept (first source wins an image listed twice), in source order."""

    rows: list[LabelRow]
    sources: list[Source]

    def table(self, split: Mapping[str, str] | None = None) -> list[str]:
        """Per source: images kept, melanomas, where they went (`split`: image -> "train"/"validation"/other),
        excluded and why. One line each, for a terminal."""
        lines = []
        head = f"{'source':<14} {'images':>7} {'melanoma':>8}"
        if split is not None:
            head += f" {'train':>7} {'valid.':>7} {'unused':>7}"
        lines.append(head + "  excluded (why)")
        for s in self.sources:
            if s.layout.key == "2019-metadata":
                continue
            mine = [r for r in self.rows if r.source == s.name]
            line = f"{s.name:<14} {len(mine):>7} {sum(r.target for r in mine):>8}"
            if split is not None:
                where = [split.get(r.name, "unused") for r in mine]
                line += (f" {where.count('train'):>7} {where.count('validation'):>7} "
                         f"{len(where) - where.count('train') - where.count('validation'):>7}")
            why = ", ".join(f"{n} {reason}" for reason, n in s.excluded.items() if n) or "none"
            lines.append(f"{line}  {why}  [{s.path}]")
        return lines


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a CSV saved by Excel starts with a BOM
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LabelError(f"cannot read label file {path}: {e}") from None
    if not rows:
        raise LabelError(f"label file {path} has no rows")
    return columns, rows


def detect(columns: Sequence[str]) -> Layout | None:
    cols = set(columns)
    return next((lay for lay in LAYOUTS if set(lay.required) <= cols), None)


def label_file(path: Path) -> Path:
    """An isic-cli download folder stands for its metadata.csv."""
    if path.is_dir():
        inner = path / ARCHIVE_METADATA
        if not inner.is_file():
            raise LabelError(f"{path} is a folder without {ARCHIVE_METADATA}: give a label file, or the folder "
                             "`isic image download` wrote")
        return inner
    return path


def _meta(row: Mapping[str, str], columns: set[str]) -> dict[str, str]:
    out = {}
    for key, names in SUBGROUP_COLUMNS.items():
        col = next((c for c in names if c in columns), None)
        if col is not None:
            out[key] = (row.get(col) or "").strip()
    return out


def _binary(value: str | None) -> int:
    v = float(value)  # type: ignore[arg-type]  # None: TypeError, caught by the caller
    if v not in (0.0, 1.0):
        raise ValueError(value)
    return int(v)


def archive_target(row: Mapping[str, str], indeterminate: str) -> tuple[int | None, str]:
    """(1 melanoma / 0 not / None excluded, the reason when excluded) from the diagnosis hierarchy."""
    d1 = (row.get("diagnosis_1") or "").strip()
    d2 = (row.get("diagnosis_2") or "").strip()
    if not d1:
        return None, "without a diagnosis"
    if d1 == "Indeterminate":
        if indeterminate == "exclude":
            return None, "Indeterminate (--indeterminate exclude)"
        return int(indeterminate == "malignant"), ""
    if d1 == "Malignant":
        if d2 == MELANOMA_DIAGNOSIS_2:
            return 1, ""
        if not d2:  # a malignancy whose kind is not given: melanoma or not cannot be told
            return None, "Malignant without diagnosis_2"
        return 0, ""
    if d1 == "Benign":
        return 0, ""
    return None, f"diagnosis_1 '{d1[:40]}'"


def read_source(path: Path, indeterminate: str = "exclude") -> Source:
    """One label file (or isic-cli download folder) in any known layout; LabelError, one line, otherwise."""
    if indeterminate not in INDETERMINATE_POLICIES:
        raise LabelError(f"indeterminate policy must be one of {', '.join(INDETERMINATE_POLICIES)}")
    path = label_file(Path(path))
    columns, raw = _read_csv(path)
    layout = detect(columns)
    if layout is None:
        shown = ", ".join(sorted(columns)[:12]) + (" ..." if len(columns) > 12 else "")
        raise LabelError(f"label file {path}: not a layout this reads; expected columns {KNOWN}; found {shown}")
    cols = set(columns)
    has = lambda c: c in cols  # noqa: E731
    rows: list[LabelRow] = []
    excluded: dict[str, int] = {}
    bad: list[str] = []
    seen: set[str] = set()
    target_col = {"2024": "target", "2020": "target", "2019": "MEL"}.get(layout.key)
    for i, row in enumerate(raw, start=2):
        name = (row.get(layout.name_column) or "").strip()
        if not name:
            bad.append(f"line {i}")
            continue
        if name in seen:
            raise LabelError(f"label file {path}: image {name} is listed more than once")
        seen.add(name)
        if layout.key == "archive":
            target, why = archive_target(row, indeterminate)
            if target is None:
                excluded[why] = excluded.get(why, 0) + 1
                continue
        elif target_col is not None:
            try:
                target = _binary(row.get(target_col))
            except (TypeError, ValueError):
                bad.append(f"line {i}")
                continue
        else:
            target = 0  # the 2019 metadata: no label, only lesions and subgroups (merged by read_sources)
        patient = (row.get("patient_id") or "").strip() if has("patient_id") else ""
        lesion = (row.get("lesion_id") or "").strip() if has("lesion_id") else ""
        rows.append(LabelRow(name, target, name, layout.key, patient, lesion, _meta(row, cols)))
    if bad:
        what = f"a {target_col} other than 0/1" if target_col else "no image name"
        raise LabelError(f"label file {path}: {len(bad)} row(s) with {what} ({', '.join(bad[:5])})")
    return Source(path, layout, rows, excluded)


class _Groups:
    """Union-find over images, patients and lesions: two images sharing either are one group."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The representative names the group: a patient before a lesion before an image, then the smallest.
            self.parent[max(ra, rb, key=_rank)] = min(ra, rb, key=_rank)


def _rank(node: str) -> tuple[int, str]:
    return ({"patient": 0, "lesion": 1, "image": 2}[node.split(":", 1)[0]], node)


def read_sources(paths: Sequence[Path], indeterminate: str = "exclude") -> LabelSet:
    """Every file of `paths` (read_source), combined: 2019 metadata merged into its ground truth, an image listed
    twice kept from its first source (the other's count says so), groups for the split by patient, else lesion,
    else image, joined wherever two images share a patient or a lesion."""
    if not paths:
        raise LabelError("no label file given")
    sources = [read_source(Path(p), indeterminate) for p in paths]
    counts: dict[str, int] = {}
    for s in sources:
        counts[s.layout.key] = counts.get(s.layout.key, 0) + 1
        if counts[s.layout.key] > 1:
            s.name = f"{s.layout.key}#{counts[s.layout.key]}"
            s.rows = [r._replace(source=s.name) for r in s.rows]
    metadata = [s for s in sources if s.layout.key == "2019-metadata"]
    truths = [s for s in sources if s.layout.key == "2019"]
    if metadata and not truths:
        raise LabelError(f"{metadata[0].path} is ISIC 2019 metadata (image, lesion_id), which holds no labels: give "
                         "it beside its ground truth (--labels ISIC_2019_Training_GroundTruth.csv --labels "
                         f"{metadata[0].path.name})")
    extra = {r.name: r for m in metadata for r in m.rows}
    for s in truths:
        s.rows = [r._replace(lesion=extra[r.name].lesion, meta={**extra[r.name].meta, **r.meta})
                  if r.name in extra else r for r in s.rows]
    for m in metadata:
        matched = sum(r.name in {t.name for s in truths for t in s.rows} for r in m.rows)
        if not matched:
            raise LabelError(f"{m.path}: none of its {len(m.rows)} image(s) is in the ISIC 2019 ground truth given")
    groups = _Groups()
    kept: dict[str, LabelRow] = {}
    for s in sources:
        if s.layout.key == "2019-metadata":
            continue
        for r in s.rows:
            node = f"image:{r.name}"
            groups.find(node)
            if r.patient:
                groups.union(node, f"patient:{r.patient}")
            if r.lesion:
                groups.union(node, f"lesion:{r.lesion}")
            if r.name in kept:  # its identifiers still join groups above; the row itself is dropped
                first = kept[r.name]
                why = f"already in {first.source}" + ("" if first.target == r.target else " (with another label)")
                s.excluded[why] = s.excluded.get(why, 0) + 1
                continue
            kept[r.name] = r
    # "patient:IP_1", "lesion:IL_2" or "image:ISIC_3": prefixed, so that no patient id can meet a lesion id or an
    # image name; for a file that names every patient the split orders its groups as it always did.
    rows = [r._replace(group=groups.find(f"image:{r.name}")) for r in kept.values()]
    return LabelSet(rows, sources)


def read_label_rows(path: Path, indeterminate: str = "exclude") -> list[LabelRow]:
    """The rows of one label file of any known layout (see read_sources for several)."""
    return read_sources([path], indeterminate).rows


def read_labels(path: Path) -> dict[str, int]:
    """image name -> 1 (melanoma) / 0, from any known layout."""
    return {r.name: r.target for r in read_label_rows(path)}


def find_images(folders: Path | Sequence[Path], names: list[str]) -> tuple[dict[str, Path], list[str]]:
    """Match label names to files by stem, any common extension, anywhere under the folder(s); the first folder
    holding a stem wins."""
    by_stem: dict[str, Path] = {}
    for folder in [folders] if isinstance(folders, Path) else folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                by_stem.setdefault(f.stem, f)
    found = {n: by_stem[Path(n).stem] for n in names if Path(n).stem in by_stem}
    return found, [n for n in names if n not in found]

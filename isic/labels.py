"""ISIC label files (SIIM-ISIC 2020 train.csv: image_name, target[, patient_id]; ISIC 2019 ground truth:
image, MEL) and the image folders they name."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo", ".heic", ".heif"}


class LabelError(Exception):
    pass


class LabelRow(NamedTuple):
    name: str
    target: int  # 1 = melanoma
    group: str  # the patient (2020's patient_id); the image itself where the file has no patient column


def read_label_rows(path: Path) -> list[LabelRow]:
    """Rows of either ISIC format; other columns are ignored. Shared with training (train/data.py)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LabelError(f"cannot read label file {path}: {e}") from None
    if not rows:
        raise LabelError(f"label file {path} has no rows")
    cols = set(rows[0])
    if {"image_name", "target"} <= cols:
        name_col, target_col = "image_name", "target"
    elif {"image", "MEL"} <= cols:
        name_col, target_col = "image", "MEL"
    else:
        raise LabelError(f"label file {path}: expected columns image_name,target (SIIM-ISIC 2020) or "
                         f"image,MEL (ISIC 2019); found {', '.join(sorted(cols))}")
    group_col = "patient_id" if "patient_id" in cols else None
    out: list[LabelRow] = []
    bad = []
    for i, row in enumerate(rows, start=2):
        try:
            value = float(row[target_col])
            if value not in (0.0, 1.0):
                raise ValueError
            name = row[name_col].strip()
            out.append(LabelRow(name, int(value), (row[group_col] or "").strip() or name if group_col else name))
        except (TypeError, ValueError, AttributeError):
            bad.append(f"line {i}")
    if bad:
        raise LabelError(f"label file {path}: {len(bad)} row(s) with a {target_col} other than 0/1 "
                         f"({', '.join(bad[:5])})")
    return out


def read_labels(path: Path) -> dict[str, int]:
    """image name -> 1 (melanoma) / 0, from either ISIC format."""
    return {r.name: r.target for r in read_label_rows(path)}


def find_images(folder: Path, names: list[str]) -> tuple[dict[str, Path], list[str]]:
    """Match label names to files by stem, any common extension, anywhere under `folder`."""
    by_stem: dict[str, Path] = {}
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(f.stem, f)
    found = {n: by_stem[Path(n).stem] for n in names if Path(n).stem in by_stem}
    return found, [n for n in names if n not in found]

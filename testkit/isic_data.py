"""Small ISIC data sets in the layouts ISIC ships, generated in a test's folder: real column names and diagnosis
strings, with the awkward rows real downloads have (Indeterminate and missing diagnoses, an image in two
sources, a lesion photographed for two sources). The pixels are train.synthetic's task (irregular two-tone = 1),
NOT melanoma. Each writer returns what a reader must find, so tests assert counts rather than restate them."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from isic.labels import MELANOMA_DIAGNOSIS_2
from train.synthetic import lesion

SIZE = 120  # pixels: above the 96 and 128 px the tests train and serve at, small enough to decode fast


def _image(path: Path, label: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lesion(label, np.random.default_rng(seed), SIZE)).save(path, quality=90)


def _csv(path: Path, header: list[str], rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="raise")
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in header} for r in rows])
    return path


@dataclass
class Pair:
    """SIIM-ISIC 2020 + ISIC 2019 (ground truth and metadata), and what combining them must give."""

    csv_2020: Path
    images_2020: Path
    truth_2019: Path
    metadata_2019: Path
    images_2019: Path
    images: dict[str, int] = field(default_factory=dict)  # source -> images kept
    melanomas: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # 2019 rows dropped as already in 2020
    relabelled: int = 0  # of which with another label
    lesion_links: dict[str, str] = field(default_factory=dict)  # 2019 image -> the 2020 patient its lesion joins


def write_pair(root: Path) -> Pair:
    """2020: 24 images of 8 patients (3 each), one melanoma in each of patients 0-5, every image its own lesion;
    the 2020 ground truth's lesion_id column (v2) is there. 2019: 16 images, 3 of them also in 2020 (one labelled
    otherwise), two HAM10000-style lesions of 3 and 2 images, and 2 images whose lesion is a 2020 image's."""
    d20 = root / "2020"
    rows20 = []
    for i in range(24):
        name, patient = f"ISIC_20{i:05d}", f"IP_{i // 3:07d}"
        target = int(i % 3 == 0 and i // 3 < 6)
        rows20.append({"image_name": name, "patient_id": patient, "lesion_id": f"IL_20{i:05d}",
                       "sex": ("male", "female")[i // 3 % 2], "age_approx": f"{35 + 5 * (i % 7)}.0",
                       "anatom_site_general_challenge": ("torso", "lower extremity", "head/neck")[i % 3],
                       "diagnosis": "melanoma" if target else "nevus",
                       "benign_malignant": "malignant" if target else "benign", "target": target})
        _image(d20 / "jpeg" / f"{name}.jpg", target, 1000 + i)
    csv20 = _csv(d20 / "ISIC_2020_Training_GroundTruth_v2.csv",
                 ["image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site_general_challenge",
                  "diagnosis", "benign_malignant", "target"], rows20)
    by_name = {r["image_name"]: r for r in rows20}

    d19 = root / "2019"
    truth, meta = [], []
    duplicated = {"ISIC_2000001": 0, "ISIC_2000004": 0, "ISIC_2000022": 1}  # name -> 2019's MEL (22 was 0)
    linked = {"ISIC_1900010": "ISIC_2000007", "ISIC_1900011": "ISIC_2000021"}  # 2019 image -> 2020 image
    lesions = {**dict.fromkeys(["ISIC_1900000", "ISIC_1900001", "ISIC_1900002"], "HAM_0000001"),
               **dict.fromkeys(["ISIC_1900003", "ISIC_1900004"], "HAM_0000002"),
               **{k: str(by_name[v]["lesion_id"]) for k, v in linked.items()}}
    names = [*duplicated, *[f"ISIC_19{i:05d}" for i in range(13)]]
    for j, name in enumerate(names):
        mel = duplicated.get(name, int(j % 3 == 1))
        truth.append({"image": name, "MEL": f"{mel:.1f}", "NV": f"{1 - mel:.1f}",
                      **dict.fromkeys(["BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"], "0.0")})
        meta.append({"image": name, "age_approx": str(40 + 5 * (j % 6)),
                     "anatom_site_general": ("anterior torso", "upper extremity", "")[j % 3],
                     "lesion_id": lesions.get(name, f"BCN_{j:07d}"), "sex": ("female", "male")[j % 2]})
        _image(d19 / "ISIC_2019_Training_Input" / f"{name}.jpg", mel, 2000 + j)
    truth19 = _csv(d19 / "ISIC_2019_Training_GroundTruth.csv",
                   ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"], truth)
    meta19 = _csv(d19 / "ISIC_2019_Training_Metadata.csv",
                  ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta)
    kept19 = [r for r in truth if r["image"] not in duplicated]
    return Pair(csv20, d20 / "jpeg", truth19, meta19, d19,
                images={"2020": len(rows20), "2019": len(kept19)},
                melanomas={"2020": sum(int(r["target"]) for r in rows20),
                           "2019": sum(r["MEL"] == "1.0" for r in kept19)},
                duplicates=len(duplicated),
                relabelled=sum(by_name[n]["target"] != m for n, m in duplicated.items()),
                lesion_links={k: str(by_name[v]["patient_id"]) for k, v in linked.items()})


# An isic-cli download's metadata.csv: isic_id, attribution, copyright_license, then the sorted union of the
# clinical and acquisition fields present.
ARCHIVE_COLUMNS = ["isic_id", "attribution", "copyright_license", "age_approx", "anatom_site_general",
                   "anatom_site_special", "clin_size_long_diam_mm", "concomitant_biopsy", "dermoscopic_type",
                   "diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5",
                   "diagnosis_confirm_type", "family_hx_mm", "fitzpatrick_skin_type", "image_type", "lesion_id",
                   "melanocytic", "patient_id", "personal_hx_mm", "pixels_x", "pixels_y", "sex"]
# (diagnosis_1, diagnosis_2, diagnosis_3, what it counts as: 1, 0, or None when excluded by default)
ARCHIVE_DIAGNOSES = [
    ("Malignant", MELANOMA_DIAGNOSIS_2, "Melanoma Invasive", 1),
    ("Malignant", MELANOMA_DIAGNOSIS_2, "Melanoma in situ", 1),
    ("Malignant", MELANOMA_DIAGNOSIS_2, "Melanoma metastasis", 1),
    ("Malignant", MELANOMA_DIAGNOSIS_2, "Melanoma, NOS", 1),
    ("Benign", "Benign melanocytic proliferations", "Nevus", 0),
    ("Benign", "Benign melanocytic proliferations", "Nevus", 0),
    ("Benign", "Benign melanocytic proliferations", "Nevus", 0),
    ("Benign", "Benign epidermal proliferations", "Seborrheic keratosis", 0),
    ("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma", 0),
    ("Malignant", "Malignant epidermal proliferations", "Squamous cell carcinoma, NOS", 0),
    ("Indeterminate", "Indeterminate melanocytic proliferations", "Atypical melanocytic neoplasm", None),
    ("Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis", None),
    ("", "", "", None),  # no diagnosis: excluded whatever the policy
    ("", "", "", None),
]


@dataclass
class Download:
    folder: Path
    melanomas: int
    others: int
    indeterminate: int
    undiagnosed: int


def write_archive_download(root: Path) -> Download:
    """What `isic image download OUTDIR` leaves: OUTDIR/<isic_id>.jpg, metadata.csv, attribution.txt, licenses/."""
    out = root / "isic-download"
    rows = []
    for i, (d1, d2, d3, target) in enumerate(ARCHIVE_DIAGNOSES):
        isic_id = f"ISIC_30{i:05d}"
        rows.append({"isic_id": isic_id, "attribution": "Anonymous", "copyright_license": "CC-BY",
                     "age_approx": 30 + 10 * (i % 5),
                     "anatom_site_general": ("posterior torso", "lower extremity")[i % 2],
                     "diagnosis_1": d1, "diagnosis_2": d2, "diagnosis_3": d3,
                     "diagnosis_confirm_type": "histopathology" if d1 else "", "fitzpatrick_skin_type":
                     ("II", "III", "")[i % 3], "image_type": "dermoscopic", "lesion_id": f"IL_30{i:05d}",
                     "melanocytic": str(target == 1 or "melanocytic" in d2), "patient_id": f"IP_30{i // 2:05d}",
                     "pixels_x": 120, "pixels_y": 120, "sex": ("female", "male")[i % 2]})
        _image(out / f"{isic_id}.jpg", int(target == 1 or (target is None and i % 2 == 0)), 3000 + i)
    _csv(out / "metadata.csv", ARCHIVE_COLUMNS, rows)
    (out / "attribution.txt").write_text("Anonymous\n")
    (out / "licenses").mkdir()
    (out / "licenses" / "CC-BY.txt").write_text("CC-BY\n")
    return Download(out, sum(t == 1 for *_, t in ARCHIVE_DIAGNOSES), sum(t == 0 for *_, t in ARCHIVE_DIAGNOSES),
                    sum(d[0] == "Indeterminate" for d in ARCHIVE_DIAGNOSES),
                    sum(not d[0] for d in ARCHIVE_DIAGNOSES))


# A subset of ISIC 2024's train-metadata.csv columns, in its order (the tbp_lv_* measurements left out).
SLICE3D_COLUMNS = ["isic_id", "target", "patient_id", "age_approx", "sex", "anatom_site_general",
                   "clin_size_long_diam_mm", "image_type", "tbp_tile_type", "attribution", "copyright_license",
                   "lesion_id", "iddx_full", "iddx_1"]


def write_2024(root: Path, n: int = 12) -> tuple[Path, Path, int]:
    """ISIC 2024 train-metadata.csv and train-image/image/; returns (csv, image folder, melanomas)."""
    images = root / "2024" / "train-image" / "image"
    rows = []
    for i in range(n):
        target = int(i % 3 == 0)
        isic_id = f"ISIC_24{i:05d}"
        rows.append({"isic_id": isic_id, "target": target, "patient_id": f"IP_24{i // 3:05d}",
                     "age_approx": 45 + 5 * (i % 4), "sex": ("male", "female")[i % 2],
                     "anatom_site_general": ("posterior torso", "upper extremity")[i % 2],
                     "clin_size_long_diam_mm": 3.5, "image_type": "TBP tile: close-up", "tbp_tile_type": "3D: XP",
                     "attribution": "Memorial Sloan Kettering Cancer Center", "copyright_license": "CC-BY",
                     "lesion_id": "" if i % 2 else f"IL_24{i:05d}",
                     "iddx_full": "Malignant::Malignant melanocytic proliferations (Melanoma)" if target else "Benign",
                     "iddx_1": "Malignant" if target else "Benign"})
        _image(images / f"{isic_id}.jpg", target, 4000 + i)
    return _csv(root / "2024" / "train-metadata.csv", SLICE3D_COLUMNS, rows), images, sum(r["target"] for r in rows)

"""A learnable synthetic lesion task in ISIC 2020 layout (train.csv + jpeg/): for the tests' trained fixture
and for trying train/ without data. NOT melanoma: the label is a drawn property, nothing clinical.

    .venv/bin/python -m train.synthetic OUT [--n 480] [--seed 0]

Label 1 ("malignant"): an irregular border and two-tone colour (a dark blue-grey patch inside the lesion).
Label 0: a round, evenly coloured lesion. Size, position, skin tone, lesion tone, lighting and noise vary
in both, so the network has to look at the border and the colour, not at one pixel statistic.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def lesion(label: int, rng: np.random.Generator, size: int = 192) -> np.ndarray:
    return lesion_and_mask(label, rng, size)[0]


def lesion_and_mask(label: int, rng: np.random.Generator, size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """The image (uint8 HxWx3) and where the lesion is (bool HxW)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.16, 0.3) * size
    angle = np.arctan2(yy - cy, xx - cx)
    if label:  # irregular: several strong harmonics
        wobble = sum(rng.uniform(0.08, 0.16) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7))
    else:  # round, a faint ellipse at most
        wobble = rng.uniform(0, 0.04) * np.sin(2 * angle + rng.uniform(0, 2 * np.pi))
    d = np.hypot(yy - cy, xx - cx)
    blob = 1 / (1 + np.exp((d - r * (1 + wobble)) / (0.04 * r)))
    skin = np.array([rng.uniform(170, 235), rng.uniform(120, 175), rng.uniform(100, 155)])
    tone = np.array([rng.uniform(70, 130), rng.uniform(40, 85), rng.uniform(20, 60)])
    colour = np.broadcast_to(tone, (size, size, 3)).copy()
    if label:  # variegation: a dark blue-grey patch off-centre inside the lesion
        py, px = cy + rng.uniform(-0.4, 0.4) * r, cx + rng.uniform(-0.4, 0.4) * r
        patch = 1 / (1 + np.exp((np.hypot(yy - py, xx - px) - rng.uniform(0.3, 0.55) * r) / (0.05 * r)))
        blue = np.array([rng.uniform(40, 80), rng.uniform(50, 90), rng.uniform(90, 130)])
        colour = colour * (1 - patch[..., None]) + blue * patch[..., None]
    light = 1 - rng.uniform(0, 0.2) * ((xx * np.cos(rng.uniform(0, 6)) + yy) / (2 * size))
    img = (skin * (1 - blob[..., None]) + colour * blob[..., None]) * light[..., None]
    img += rng.normal(0, rng.uniform(2, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), blob > 0.5


def write_dataset(out: Path, n: int = 480, seed: int = 0, positive_rate: float = 0.5,
                  per_patient: int = 3) -> Path:
    """OUT/train.csv (image_name, patient_id, target) and OUT/jpeg/*.jpg; returns the CSV's path."""
    rng = np.random.default_rng(seed)
    (out / "jpeg").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = int(rng.random() < positive_rate)
        name = f"SYN_{seed:03d}_{i:05d}"
        Image.fromarray(lesion(label, rng)).save(out / "jpeg" / f"{name}.jpg", quality=92)
        rows.append({"image_name": name, "patient_id": f"P_{seed:03d}_{i // per_patient:04d}", "target": label})
    csv_path = out / "train.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_name", "patient_id", "target"])
        w.writeheader()
        w.writerows(rows)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write train.csv and jpeg/ into")
    ap.add_argument("--n", type=int, default=480)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = write_dataset(Path(args.out), args.n, args.seed)
    print(f"wrote {args.n} synthetic images (not melanoma) and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

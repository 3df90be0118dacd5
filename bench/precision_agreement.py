"""Acceptance measurement for reduced precision: bf16 vs fp32 on >= 200 generated photos, for the demo model
and for a model whose head is fitted to those photos (so that its scores spread over [0, 1]).

    .venv/bin/python bench/precision_agreement.py [--images 200]      # ~10 minutes on 2 cores

Writes the photos and an ISIC-2020 train.csv to a temporary folder, builds both archives with
build_mar.sh --precision bf16 --validation-images ... --validation-labels ..., and prints what the builds
measured. Labels are synthetic (the darker half of the lesions is "malignant"): they only give the fitted head
something to learn and the AUCs something to compare.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporter.export import demo_checkpoint
from handler.archive import load_archive
from handler.pipeline import PipelineConfig, load_tensor
from testkit.blobs import fit_head
from testkit.harness import run_build
from testkit.imaging import encode, lesion_rgb


def photos(folder: Path, n: int) -> dict[str, int]:
    rng = np.random.default_rng(2020)
    darkness = {}
    for i in range(n):
        h, w = int(rng.integers(180, 480)), int(rng.integers(180, 640))
        rgb = lesion_rgb(h, w, seed=10_000 + i)
        name = f"ISIC_{i:07d}"
        (folder / f"{name}.jpg").write_bytes(encode(rgb))
        darkness[name] = float((rgb.mean(axis=2) < 100).mean())
    cut = np.median(list(darkness.values()))
    labels = {k: int(v > cut) for k, v in darkness.items()}
    with open(folder / "train.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image_name", "target"])
        wr.writerows(labels.items())
    return labels


def build(label: str, checkpoint: Path | None, folder: Path, out: Path) -> None:
    out.mkdir()
    args = ([str(checkpoint)] if checkpoint else []) + [
        "--precision", "bf16", "--validation-images", str(folder), "--validation-labels",
        str(folder / "train.csv"), "--no-explain", "--force-precision"]
    proc = run_build(*args, output_dir=out)
    line = next(ln for ln in proc.stderr.splitlines() if "vs fp32 on" in ln)
    prec = load_archive(out / "melanoma.mar").metadata.precision
    verdict = "within" if prec["max_abs_dp"] <= 0.02 else "ABOVE"
    print(f"{label}: {line}  [{verdict} the 0.02 bound]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="precision."))
    folder = work / "calibration"
    folder.mkdir()
    labels = photos(folder, args.images)
    build("demo model", None, folder, work / "demo")

    cfg = PipelineConfig()
    ckpt = demo_checkpoint()
    x = torch.stack([load_tensor((folder / f"{n}.jpg").read_bytes(), cfg) for n in labels])
    fit_head(ckpt.module, x, torch.tensor(list(labels.values())))
    path = work / "fitted.pt"
    torch.save(ckpt.module.state_dict(), path)
    build("fitted head", path, folder, work / "fitted")
    fitted = load_archive(work / "fitted" / "melanoma.mar")  # bf16; spread of its scores over the photos
    ps = np.array([fitted.scorer.predict([t])[0] for t in x])
    print(f"fitted head's bf16 scores over the photos: min {ps.min():.3f}, median {np.median(ps):.3f}, "
          f"max {ps.max():.3f}, std {ps.std():.3f}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Every reduced-precision archive against the fp32 archive of the same weights, on the same images.

    .venv/bin/python bench/agreement.py --fp32 FP32.mar --images DIR [--labels CSV] \
        [--archive BF16.mar --archive INT8.mar --archive OV_BF16.mar ...] [--report docs/PRECISION.md]

Each build measures its own precision on the images it was given; this puts them side by side on one set, so
that int8, AOTInductor bf16 and OpenVINO bf16 are judged on the same images. The set is the images int8 was
not calibrated on (build_mar.sh's split: every 4th image, at most 64, calibrates it), so give the folder the
int8 archive was built with. Each archive is loaded and run exactly as served (handler.archive.load_archive,
the pipeline's 8-view TTA). Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, required=True, help="the fp32 archive (the reference)")
    ap.add_argument("--archive", type=Path, action="append", default=[], help="a reduced-precision archive")
    ap.add_argument("--images", type=Path, required=True, help="the folder the int8 archive was built with")
    ap.add_argument("--labels", type=Path, help="their labels (ISIC CSV), for the AUCs")
    ap.add_argument("--bound", type=float, default=0.02, help="the bound to count images above (default 0.02)")
    ap.add_argument("--report", type=Path, help="write the table into this markdown file (block agreement)")
    args = ap.parse_args(argv)

    from exporter.precision import calibration_images, load_tensors, split_for_int8
    from handler.archive import load_archive
    from isic import metrics
    from isic.labels import read_labels

    calibrate, files = split_for_int8(calibration_images(args.images))
    ref = load_archive(args.fp32)
    tensors, names, _ = load_tensors(files, ref.cfg)

    def scores(path: Path) -> tuple[np.ndarray, str]:
        a = load_archive(path)
        out: list[float] = []
        for i in range(0, len(tensors), 8):
            out += a.scorer.predict(tensors[i:i + 8])
        return np.array(out), f"{a.metadata.precision_name}, {a.metadata.runtime}"

    p32, _ = scores(args.fp32)
    y = None
    if args.labels:
        by_stem = {Path(n).stem: v for n, v in read_labels(args.labels).items()}
        y = np.array([by_stem[f.stem] for f in names])
    lines = ["## The reduced precisions on the same images (bench/agreement.py)", "",
             f"Written by `bench/agreement.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; do not "
             f"edit by hand. {len(names)} images that no archive was calibrated on ({len(calibrate)} others "
             f"calibrated the int8 archive), scored as served (8-view TTA) against the fp32 archive "
             f"`{args.fp32.parent.name}/{args.fp32.name}` of the same weights.", "",
             f"| archive | max \\|Δp\\| | mean \\|Δp\\| | 99th percentile | images above {args.bound:g} "
             "| AUC fp32 → it |",
             "|---|---|---|---|---|---|"]
    for path in args.archive:
        p, what = scores(path)
        d = np.abs(p - p32)
        auc = (f"{metrics.auc(y, p32):.4f} → {metrics.auc(y, p):.4f}" if y is not None and 0 < y.sum() < len(y)
               else "-")
        lines.append(f"| {what} (`{path.parent.name}/{path.name}`) | {d.max():.4f} | {d.mean():.4f} | "
                     f"{np.quantile(d, 0.99):.4f} | {int((d > args.bound).sum())} | {auc} |")
    text = "\n".join(lines + [""])
    print(text)
    if args.report:
        from testkit.report import replace_block

        replace_block(args.report, "agreement", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

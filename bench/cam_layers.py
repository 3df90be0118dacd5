"""Which ResNeSt stage and which map (LayerCAM or Grad-CAM) should /explanations use? Two pointing games.

1. Blob: a logistic-regression head fitted on pooled features of the demo backbone so that the logit
   responds to one dark blob (testkit/blobs.py). For each stage and method: explain parts exported exactly
   as build_mar.sh does, 30 blob placements; a hit is the heatmap's peak inside the blob; "contrast" is the
   mean heat on the blob over the mean heat of the whole image.
2. Lesions (with --checkpoint, any number): trained networks, e.g. the trained test fixture
   (`python -m train` on train/synthetic.py's data). 16 irregular ("malignant") synthetic lesions at the
   chosen stage; a hit is the peak within 1/8 of the image of the lesion; "contrast" is the mean heat on
   the lesion over the mean heat off it. Images the network scores benign are counted apart.

Run: .venv/bin/python bench/cam_layers.py [--checkpoint run/best.ckpt ...]   (about a minute per model)
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch

from exporter.export import EXPLAIN_LAYER, STAGES, export_explainer
from handler.archive import EXPLAIN_METHODS
from handler.explain import Explainer, upsample
from handler.pipeline import PipelineConfig, preprocess
from testkit.blobs import blob_checkpoint, blob_image, random_center


def blob_game(cfg: PipelineConfig, trials: int = 30, size: int = 256, radius: float = 28) -> None:
    ckpt = blob_checkpoint()
    rng = np.random.default_rng(123)
    cases = [random_center(rng, size, radius) for _ in range(trials)]
    yy, xx = np.mgrid[0:size, 0:size]
    print(f"blob pointing game, {trials} placements (blob area {np.pi * radius**2 / size**2:.2f})")
    print(f"{'stage':7} {'method':9} {'grid':>5} {'peak in blob':>13} {'contrast':>9} {'ms/image':>9}")
    for layer in STAGES:
        parts = torch.jit.load(io.BytesIO(export_explainer(ckpt, cfg.image_size, layer))).eval()
        for method in EXPLAIN_METHODS:
            ex = Explainer(parts, cfg, layer, method)
            hits, contrast, secs, grid = 0, [], 0.0, (0, 0)
            for i, (cy, cx) in enumerate(cases):
                img = blob_image(size, (cy, cx), radius, seed=1000 + i)
                t = time.perf_counter()
                cams, _, _ = ex.cams([preprocess(img, cfg)])
                secs += time.perf_counter() - t
                grid = tuple(cams.shape[1:])
                heat = upsample(cams[0], (size, size))
                inside = np.hypot(yy - cy, xx - cx) <= radius
                py, px = np.unravel_index(np.argmax(heat), heat.shape)
                hits += bool(inside[py, px])
                contrast.append(heat[inside].mean() / max(heat.mean(), 1e-12))
            shape = f"{grid[0]}x{grid[1]}"
            print(f"{layer:7} {method:9} {shape:>5} {hits:>6}/{trials:<6} {np.min(contrast):>4.2f}-"
                  f"{np.max(contrast):<4.2f} {1000 * secs / trials:>7.0f}")


def lesion_game(cfg: PipelineConfig, checkpoint: Path, layer: str, n: int = 16) -> None:
    from scipy import ndimage

    from exporter.checkpoint import load_checkpoint
    from train.synthetic import lesion_and_mask

    parts = torch.jit.load(io.BytesIO(export_explainer(load_checkpoint(checkpoint), cfg.image_size, layer))).eval()
    rng = np.random.default_rng(2024)
    cases = [lesion_and_mask(1, rng) for _ in range(n)]
    print(f"\n{checkpoint}: {n} irregular lesions at {layer}")
    print(f"{'method':9} {'scored > 0.5':>12} {'peak on lesion':>15} {'contrast min-median':>20} {'empty maps':>10}")
    for method in EXPLAIN_METHODS:
        ex = Explainer(parts, cfg, layer, method)
        cams, _, logits = ex.cams([preprocess(img, cfg) for img, _ in cases])
        p = torch.sigmoid(logits.double().reshape(cfg.tta_views, n)).mean(0)
        hits, contrast, empty = 0, [], 0
        for i, (_, mask) in enumerate(cases):
            heat = upsample(cams[i], mask.shape)
            empty += bool(heat.max() <= 0)
            py, px = np.unravel_index(np.argmax(heat), heat.shape)
            hits += bool(ndimage.distance_transform_edt(~mask)[py, px] <= mask.shape[0] / 8 and heat.max() > 0)
            contrast.append(heat[mask].mean() / max(heat[~mask].mean(), 1e-12))
        print(f"{method:9} {int((p > 0.5).sum()):>9}/{n:<2} {hits:>11}/{n:<3} {np.min(contrast):>10.1f}-"
              f"{np.median(contrast):<9.1f} {empty:>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, action="append", default=[],
                    help="a trained checkpoint for the lesion game (repeatable)")
    ap.add_argument("--layer", choices=STAGES, default=EXPLAIN_LAYER, help="stage for the lesion game")
    ap.add_argument("--no-blob", action="store_true", help="skip the blob game")
    args = ap.parse_args()
    cfg = PipelineConfig()
    if not args.no_blob:
        blob_game(cfg)
    for ckpt in args.checkpoint:
        lesion_game(cfg, ckpt, args.layer)


if __name__ == "__main__":
    main()

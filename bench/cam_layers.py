"""Which ResNeSt stage should Grad-CAM use? Pointing game on a model fitted to respond to a dark blob.

For each stage, exports explain parts exactly as build_mar.sh does, explains blob images at random
places and counts how often the heatmap's peak falls inside the blob, and how much of the heatmap's
mass lies inside it. Run: .venv/bin/python bench/cam_layers.py   (about a minute)
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

from exporter.export import STAGES, export_explainer
from handler.explain import Explainer, upsample
from handler.pipeline import PipelineConfig, preprocess
from testkit.blobs import blob_checkpoint, blob_image, random_center


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    cfg, size, radius, trials = PipelineConfig(), 256, 28, 30
    ckpt = blob_checkpoint()
    rng = np.random.default_rng(123)
    cases = [random_center(rng, size, radius) for _ in range(trials)]
    yy, xx = np.mgrid[0:size, 0:size]
    print(f"{'stage':7} {'grid':>5} {'peak in blob':>13} {'mass in blob':>13} {'ms/image':>9}")
    for layer in STAGES:
        parts = torch.jit.load(io.BytesIO(export_explainer(ckpt, cfg.image_size, layer))).eval()
        ex = Explainer(parts, cfg, layer)
        hits, mass, secs, grid = 0, [], 0.0, None
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
            mass.append(heat[inside].sum() / max(heat.sum(), 1e-12))
        area = np.pi * radius**2 / size**2
        shape = f"{grid[0]}x{grid[1]}"
        print(f"{layer:7} {shape:>5} {hits:>6}/{trials:<6} {np.mean(mass):>8.2f} (area {area:.2f})"
              f" {1000 * secs / trials:>7.0f}")


if __name__ == "__main__":
    main()

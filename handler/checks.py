"""Input checks: is this image one the model's score can be trusted on? They never change the score.

Each response carries `checks`: the image's resolution against the model's input size, its sharpness and
exposure at the size the model sees, and its distance to the validation set in the model's own feature space
(out of distribution). Quality checks are fixed rules; the out-of-distribution limit is fitted at build time
on the user's labelled validation set (exporter/ood.py) and travels in the archive (ood.npz). No TorchServe
import: the handler, the offline client and the tests run this same code.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from handler.pipeline import IMAGE_SIZE

OOD_FILE = "ood.npz"
OOD_METHOD = "mahalanobis-ledoit-wolf"  # what exporter/ood.py fits and OodModel.distance computes


@dataclass(frozen=True)
class QualityLimits:
    """Where the fixed quality rules flag an image; recorded in metadata.json (`checks.limits`).

    min_side: the shorter side of the photo as sent; below the model's input size the model sees upscaled,
    invented detail. min_sharpness: variance of the Laplacian of the luminance at the model's input size
    (uint8 scale). On generated lesion photos it is 8.9-98 (median 38), and a Gaussian blur of sigma 1.5 px
    at that size brings every one of them below 4.7 (docs/INPUT_CHECKS.md). Real photos may differ, which is
    why the build prints how many validation images each rule flags. Exposure: the share of clipped
    highlights (luminance >= 250), or a median luminance outside [min_median, max_median]. The median, not
    the dark share, because dermoscopy photos have black corners outside the scope's circle.
    """

    min_side: int = IMAGE_SIZE  # the build sets the archive's own input size
    min_sharpness: float = 5.0
    max_clipped: float = 0.25
    min_median: float = 40.0
    max_median: float = 235.0

    def __post_init__(self) -> None:
        # A limit off its own scale is a typo, not a choice: refuse it where it is set (build_mar.sh) and where
        # it is read back (metadata.json), with the rule it breaks.
        if isinstance(self.min_side, bool) or not isinstance(self.min_side, int) or self.min_side < 1:
            raise ValueError(f"min_side must be a whole number of pixels >= 1, not {self.min_side!r}")
        for name in ("min_sharpness", "max_clipped", "min_median", "max_median"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, not {v!r}")
        if self.min_sharpness < 0:
            raise ValueError(f"min_sharpness must be >= 0, not {self.min_sharpness}")
        if not 0 < self.max_clipped <= 1:
            raise ValueError(f"max_clipped must be in (0, 1], not {self.max_clipped}")
        if not 0 <= self.min_median < self.max_median <= 255:
            raise ValueError(f"the median luminance range must satisfy 0 <= low < high <= 255, not "
                             f"[{self.min_median}, {self.max_median}]")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> QualityLimits:
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an HxWx3 uint8 RGB image, float64 in [0, 255]."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def sharpness(resized: np.ndarray) -> float:
    """Variance of the Laplacian of the luminance: what the model's input holds in fine detail."""
    return float(cv2.Laplacian(luminance(resized), cv2.CV_64F).var())


def quality(width: int, height: int, resized: np.ndarray, limits: QualityLimits) -> dict[str, Any]:
    """The fixed rules on the photo's size (as sent) and on the image the model sees (`resized`, uint8)."""
    y = luminance(resized)
    clipped, median, sharp = float((y >= 250).mean()), float(np.median(y)), sharpness(resized)
    return {
        "resolution": {"flagged": min(width, height) < limits.min_side, "width": width, "height": height,
                       "min_side": limits.min_side},
        "blur": {"flagged": sharp < limits.min_sharpness, "sharpness": round(sharp, 3),
                 "min_sharpness": limits.min_sharpness},
        "exposure": {"flagged": clipped > limits.max_clipped or not limits.min_median <= median <= limits.max_median,
                     "clipped_fraction": round(clipped, 4), "median_luminance": round(median, 2),
                     "max_clipped": limits.max_clipped, "median_range": [limits.min_median, limits.max_median]},
    }


@dataclass(frozen=True)
class Gaussian:
    """One stage's pooled features under a Ledoit-Wolf shrunk covariance, Sigma = (1 - s) S + s mu I: its
    leading eigenvectors (`components`) with their shrunk variances, every other direction `residual_variance`
    (exactly s mu when the validation set has fewer images than components)."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), orthonormal rows
    variances: np.ndarray  # (K,)
    residual_variance: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        """N x D features -> N Mahalanobis distances (float64)."""
        d = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean
        proj = d @ self.components.T
        inside = (proj**2 / self.variances).sum(axis=1)
        rest = np.maximum((d**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0) / self.residual_variance
        return np.sqrt(inside + rest)


@dataclass(frozen=True)
class OodModel:
    """The Mahalanobis distance of an image's pooled features at several stages (each the mean over the TTA
    views) to the validation set's, as an ensemble (Lee et al., NeurIPS 2018): each stage's distance in units
    of its median out-of-fold validation distance (`scales`), the image's distance the largest of them.
    Flagged above `threshold`, the `percentile` of the same statistic over out-of-fold validation images.
    `stages`/`sizes`: the blocks of the model's feature output, in order (exporter/export.py)."""

    stages: tuple[str, ...]
    sizes: tuple[int, ...]
    gaussians: tuple[Gaussian, ...]
    scales: tuple[float, ...]
    threshold: float
    percentile: float

    def stage_distances(self, features: np.ndarray) -> np.ndarray:
        """N x sum(sizes) features -> N x stages distances, each in units of its scale."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != sum(self.sizes):
            raise ValueError(f"features have {x.shape[1]} columns, the fit {sum(self.sizes)}")
        blocks = np.split(x, np.cumsum(self.sizes)[:-1], axis=1)
        return np.stack([g.distance(b) / s for g, b, s in zip(self.gaussians, blocks, self.scales, strict=True)], 1)

    def distance(self, features: np.ndarray) -> np.ndarray:
        return self.stage_distances(features).max(axis=1)

    def to_bytes(self) -> bytes:
        arrays: dict[str, Any] = {"stages": np.array(self.stages), "sizes": np.array(self.sizes),
                                  "scales": np.array(self.scales), "threshold": self.threshold,
                                  "percentile": self.percentile}
        for name, g in zip(self.stages, self.gaussians, strict=True):
            arrays |= {f"{name}.mean": g.mean, f"{name}.components": g.components.astype(np.float32),
                       f"{name}.variances": g.variances, f"{name}.residual_variance": g.residual_variance}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> OodModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:  # arrays only: no code in an archive's data
            stages = tuple(str(s) for s in z["stages"])
            gaussians = tuple(Gaussian(z[f"{n}.mean"], z[f"{n}.components"].astype(np.float64), z[f"{n}.variances"],
                                       float(z[f"{n}.residual_variance"])) for n in stages)
            return cls(stages, tuple(int(v) for v in z["sizes"]), gaussians, tuple(float(v) for v in z["scales"]),
                       float(z["threshold"]), float(z["percentile"]))


NO_FEATURES = ("this archive's model returns no features (built before input checks, or from a TorchScript checkpoint "
               "without ResNeSt's stages): rebuild it with ./build_mar.sh from a ResNeSt checkpoint")
NO_OOD = "not fitted: build the archive with --validation-images and --validation-labels"


def out_of_distribution(features: np.ndarray | None, ood: OodModel | None) -> dict[str, Any]:
    if features is None or ood is None:
        return {"flagged": None, "reason": NO_FEATURES if features is None else NO_OOD}
    by_stage = ood.stage_distances(features)[0]
    dist = float(by_stage.max())
    return {"flagged": dist > ood.threshold, "distance": round(dist, 4), "threshold": round(ood.threshold, 4),
            "percentile": ood.percentile,
            "by_stage": {n: round(float(d), 4) for n, d in zip(ood.stages, by_stage, strict=True)}}


WARNINGS = {
    "resolution": "the photo is smaller than the model's {min_side} px input: it sees upscaled, invented detail",
    "blur": "the image is blurred at the model's input size: fine structure the model relies on is missing",
    "exposure": "the image is over- or under-exposed: colours and contrast are outside what the model was trained on",
    "out_of_distribution": "the image does not look like the validation set's lesion photos (out of distribution): "
                           "the score may mean nothing for it",
}


def run_checks(width: int, height: int, resized: np.ndarray, features: np.ndarray | None,
               limits: QualityLimits, ood: OodModel | None) -> dict[str, Any]:
    """The response's `checks`: each check's values and verdict, `warnings` (plain sentences, for a page to
    show above the score) and `passed` (no check flagged; an OOD check that could not run does not count)."""
    out: dict[str, Any] = quality(width, height, resized, limits)
    out["out_of_distribution"] = out_of_distribution(features, ood)
    flagged = [k for k in WARNINGS if out[k]["flagged"]]
    out["warnings"] = [WARNINGS[k].format(**out[k]) for k in flagged]
    out["passed"] = not flagged
    return out

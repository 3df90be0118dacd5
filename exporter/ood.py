"""The out-of-distribution check's fit, at build time, on the pooled features of the user's validation set.

Mahalanobis distance (Lee et al., NeurIPS 2018: an ensemble over the network's stages) of the pooled
features after each stage to the validation set's mean, with a Ledoit-Wolf shrunk covariance: a validation set
holds hundreds of images for 512-2,048 features per stage, so the sample covariance is singular and its
inverse meaningless; shrinking it toward mu I (mu: the mean variance) by the Ledoit-Wolf amount makes it
invertible and is the estimate with the least expected
error. handler/checks.py (OodModel) computes the distance at serving time from what this returns.

The limit is a percentile of *out-of-fold* distances (each fold's images measured against a fit on the
others), not of the fitted images' own: a fit is closer to its own images than to new ones from the same
distribution, so an in-sample percentile would flag more than (100 - percentile) % of new lesion photos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from handler.checks import OOD_METHOD, Gaussian, OodModel

MAX_COMPONENTS = 256  # eigenvectors kept per stage (ood.npz: 256 x 3584 float32 = 3.5 MiB); the rest share one variance
PERCENTILE = 99.0
FOLDS = 5
MIN_IMAGES = 20


class OodError(Exception):
    pass


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Centred data's mean, sample covariance, mu (its mean variance) and the Ledoit-Wolf shrinkage (Ledoit &
    Wolf 2004, as scikit-learn's ledoit_wolf_shrinkage computes it)."""
    n, p = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / n
    mu = float(np.trace(cov)) / p
    x2 = xc**2
    beta_ = float((x2.T @ x2).sum())
    delta_ = float((cov**2).sum())
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * float(np.trace(cov)) + p * mu**2) / p
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return mean, cov, mu, shrinkage


def fit_gaussian(features: np.ndarray) -> tuple[Gaussian, float]:
    """One stage's Gaussian and the shrinkage used."""
    x = np.asarray(features, dtype=np.float64)
    mean, cov, mu, s = ledoit_wolf(x)
    evals, evecs = np.linalg.eigh(cov)  # ascending
    evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
    k = min(MAX_COMPONENTS, x.shape[1])
    rest = evals[k:]
    residual = (1 - s) * (float(rest.mean()) if rest.size else 0.0) + s * mu
    if residual <= 0:
        raise OodError("the validation features have no spread: cannot fit the out-of-distribution check")
    variances = (1 - s) * evals[:k] + s * mu
    return Gaussian(mean, np.ascontiguousarray(evecs[:, :k].T), variances, residual), s


def blocks(features: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(np.asarray(features, dtype=np.float64), np.cumsum(sizes)[:-1], axis=1)


def out_of_fold_distances(features: np.ndarray, sizes: Sequence[int], groups: np.ndarray,
                          folds: int = FOLDS) -> np.ndarray:
    """N x stages: each image's distance at each stage under a fit on the folds it is not in. Folds split by
    patient, so that a patient's other photos are never what makes their own look familiar."""
    uniq = np.unique(groups)
    order = np.random.default_rng(0).permutation(len(uniq))
    fold_of_group = {g: i % folds for i, g in enumerate(uniq[order])}
    fold = np.array([fold_of_group[g] for g in groups])
    out = np.zeros((len(features), len(sizes)))
    for j, x in enumerate(blocks(features, sizes)):
        for f in range(folds):
            test = fold == f
            if test.any() and not test.all():
                out[test, j] = fit_gaussian(x[~test])[0].distance(x[test])
    return out


def fit(features: np.ndarray, stages: Sequence[str], sizes: Sequence[int], groups: np.ndarray,
        percentile: float = PERCENTILE) -> tuple[OodModel, dict[str, Any]]:
    """The served OodModel (each stage fitted on every validation image; scales and limit from out-of-fold
    distances) and what metadata.json records about it."""
    n = len(features)
    if n < MIN_IMAGES:
        raise OodError(f"the out-of-distribution check needs at least {MIN_IMAGES} validation images, got {n}")
    if not 50 <= percentile < 100:
        raise OodError(f"the out-of-distribution percentile must be in [50, 100), got {percentile}")
    if len(np.unique(groups)) < FOLDS:
        raise OodError(f"the out-of-distribution check needs images of at least {FOLDS} patients")
    oof = out_of_fold_distances(features, sizes, groups)
    scales = np.median(oof, axis=0)
    score = (oof / scales).max(axis=1)
    threshold = float(np.percentile(score, percentile))
    fitted = [fit_gaussian(x) for x in blocks(features, sizes)]
    model = OodModel(tuple(stages), tuple(int(v) for v in sizes), tuple(g for g, _ in fitted),
                     tuple(float(v) for v in scales), threshold, float(percentile))
    record = {
        "method": OOD_METHOD,
        "features": "pooled features after each stage, mean over the TTA views",
        "stages": {name: int(size) for name, size in zip(stages, sizes, strict=True)},
        "shrinkage": {name: round(s, 6) for name, (_, s) in zip(stages, fitted, strict=True)},
        "components": min(MAX_COMPONENTS, max(sizes)),
        "images": n,
        "folds": FOLDS,
        "percentile": float(percentile),
        "threshold": threshold,
        "validation_flagged": round(float((model.distance(features) > threshold).mean()), 4),
    }
    return model, record

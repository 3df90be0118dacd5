"""Evaluation metrics against independent brute-force computations."""

from __future__ import annotations

import numpy as np
import pytest

from isic import metrics


def brute_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def brute_pauc(y: np.ndarray, p: np.ndarray, min_tpr: float) -> float:
    r = metrics.roc_curve(y, p)
    grid = np.linspace(0, 1, 200001)
    tpr = np.interp(grid, r.fpr, r.tpr)  # the ROC is piecewise linear between its points
    return float(np.mean(np.maximum(tpr - min_tpr, 0)))


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_partial_auc_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes ties
    assert metrics.auc(y, p) == pytest.approx(brute_auc(y, p), abs=1e-12)
    assert metrics.partial_auc_above_tpr(y, p, 0.8) == pytest.approx(brute_pauc(y, p, 0.8), abs=2e-5)


def test_known_cases() -> None:
    y = np.array([0, 0, 1, 1])
    assert metrics.auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.partial_auc_above_tpr(y, np.array([0.1, 0.2, 0.8, 0.9]), 0.8) == pytest.approx(0.2)
    assert metrics.auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert metrics.partial_auc_above_tpr(y, np.array([0.9, 0.8, 0.2, 0.1]), 0.8) == 0.0
    assert metrics.auc(y, np.full(4, 0.5)) == 0.5
    assert metrics.sens_spec(y, np.array([0.1, 0.6, 0.4, 0.9]), 0.5) == (0.5, 0.5)


def test_threshold_for_sensitivity_is_the_highest_that_reaches_it() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    p = rng.random(200) + 0.3 * y
    for target in (0.9, 0.95):
        t, sens, spec = metrics.threshold_for_sensitivity(y, p, target)
        candidates = sorted(set(p), reverse=True)
        best = next(c for c in candidates if ((p >= c) & (y == 1)).sum() / (y == 1).sum() >= target)
        assert t == best and sens >= target
        assert spec == pytest.approx(((p < t) & (y == 0)).sum() / (y == 0).sum())


def test_bootstrap_interval_brackets_the_auc() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    p = rng.random(400) + 0.4 * y
    lo, hi = metrics.bootstrap_auc_ci(y, p, n=300)
    assert lo < metrics.auc(y, p) < hi and hi - lo < 0.2


def test_patient_bootstrap_is_wider_than_image_bootstrap_when_images_cluster() -> None:
    """Several images per patient, scores shared within a patient (as photos of one person's lesions are):
    resampling patients gives the honest, wider interval."""
    rng = np.random.default_rng(3)
    patients = 40
    per = 6
    y_pat = rng.random(patients) < 0.3
    centre = np.where(y_pat, 0.62, 0.45) + rng.normal(0, 0.15, patients)
    groups = np.repeat(np.arange(patients), per)
    y = np.repeat(y_pat, per).astype(int)
    p = np.repeat(centre, per) + rng.normal(0, 0.01, patients * per)
    lo_i, hi_i = metrics.bootstrap_auc_ci(y, p, n=400)
    lo_p, hi_p = metrics.bootstrap_auc_ci(y, p, n=400, groups=groups)
    assert lo_p <= metrics.auc(y, p) <= hi_p
    assert (hi_p - lo_p) > 1.5 * (hi_i - lo_i), ((lo_i, hi_i), (lo_p, hi_p))
    # one image per patient: the two are the same resampling
    assert metrics.bootstrap_auc_ci(y, p, n=200, groups=np.arange(len(y))) == metrics.bootstrap_auc_ci(y, p, n=200)

"""Binary-classification metrics for melanoma scores, in numpy alone: what training, the build and the bootstrap
intervals compute (no scikit-learn on a t2.micro, and ~20x faster per call than scikit-learn's input checks).
client/evaluate.py reports scikit-learn's own figures (isic/evaluation.py), which these equal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Roc:
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # predict "malignant" when p >= threshold


def roc_curve(y: np.ndarray, p: np.ndarray) -> Roc:
    """ROC points at every distinct score, from (0, 0) to (1, 1); ties move together."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(p_sorted))[0], len(p_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = np.cumsum(~y_sorted)[last_of_tie]
    pos, neg = y.sum(), (~y).sum()
    return Roc(np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, p_sorted[last_of_tie]])


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (= P(score of a melanoma > score of a benign), ties count half)."""
    r = roc_curve(y, p)
    return float(np.trapezoid(r.tpr, r.fpr))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision, scikit-learn's definition: sum over distinct scores of (recall step) x precision there,
    without interpolation. The bootstrap's fast twin of sklearn.metrics.average_precision_score (isic/evaluation.py
    reports sklearn's own; tests/unit/test_evaluation.py holds the two equal, ties included)."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(p_sorted))[0], len(p_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = np.cumsum(~y_sorted)[last_of_tie]
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / (tp + fp)))


def partial_auc_above_tpr(y: np.ndarray, p: np.ndarray, min_tpr: float = 0.8) -> float:
    """Area under the ROC curve and above TPR = min_tpr (ISIC 2024's metric); at most 1 - min_tpr."""
    r = roc_curve(y, p)
    # Insert the exact crossing points with TPR = min_tpr, then integrate max(tpr - min_tpr, 0).
    fpr, tpr = [r.fpr[0]], [r.tpr[0]]
    for i in range(1, len(r.fpr)):
        f0, t0, f1, t1 = r.fpr[i - 1], r.tpr[i - 1], r.fpr[i], r.tpr[i]
        if (t0 - min_tpr) * (t1 - min_tpr) < 0:
            fpr.append(f0 + (min_tpr - t0) / (t1 - t0) * (f1 - f0))
            tpr.append(min_tpr)
        fpr.append(f1)
        tpr.append(t1)
    return float(np.trapezoid(np.maximum(np.array(tpr) - min_tpr, 0.0), np.array(fpr)))


def sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    y = np.asarray(y, dtype=bool)
    pred = np.asarray(p) >= threshold
    return float((pred & y).sum() / y.sum()), float((~pred & ~y).sum() / (~y).sum())


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, sensitivity: float) -> tuple[float, float, float]:
    """The highest threshold whose sensitivity is at least `sensitivity`; returns (threshold, sens, spec)."""
    r = roc_curve(y, p)
    i = int(np.argmax(r.tpr >= sensitivity))  # first (highest-threshold) point reaching it
    t = float(r.thresholds[i])
    s, sp = sens_spec(y, p, t)
    return t, s, sp


def threshold_for_specificity(y: np.ndarray, p: np.ndarray, specificity: float) -> tuple[float, float, float]:
    """The lowest threshold whose specificity is at least `specificity`; returns (threshold, sens, spec)."""
    r = roc_curve(y, p)
    i = int(np.flatnonzero(1 - r.fpr >= specificity - 1e-12)[-1])  # index 0 (threshold inf) always qualifies
    t = float(r.thresholds[i])
    if not np.isfinite(t):  # no score reaches it: nothing is called malignant
        t = float(np.nextafter(np.max(p), np.inf))
    s, sp = sens_spec(y, p, t)
    return t, s, sp


ECE_BINS = 15  # equal-width bins of ECE, and of the reliability diagram that shows it (client/evaluate.py)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the |mean predicted - observed frequency| of equal-width probability bins, weighted by their size."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / len(p))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def bootstrap_ci(y: np.ndarray, p: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], float],
                 n: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap of statistic(y, p); resamples holding one class only are skipped. With `groups`
    (e.g. the patient of each image) whole groups are resampled: a patient's images are not independent, and
    resampling them one by one makes the interval too narrow."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    vals = []
    for _ in range(n):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        yb = y[idx]
        if yb.all() or not yb.any():
            continue
        vals.append(statistic(yb, p[idx]))
    if not vals:  # e.g. one patient holding every image: no resample has both classes to compare
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95,
                     groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap of the AUC (see bootstrap_ci)."""
    return bootstrap_ci(y, p, auc, n, seed, level, groups)


def sens_spec_ci(y: np.ndarray, p: np.ndarray, threshold: float, n: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: np.ndarray | None = None) -> tuple[tuple[float, float], tuple[float, float]]:
    """Bootstrap intervals of the sensitivity and the specificity at a fixed threshold."""
    sens = bootstrap_ci(y, p, lambda yb, pb: sens_spec(yb, pb, threshold)[0], n, seed, level, groups)
    spec = bootstrap_ci(y, p, lambda yb, pb: sens_spec(yb, pb, threshold)[1], n, seed, level, groups)
    return sens, spec

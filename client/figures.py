"""The evaluation's pictures, drawn with matplotlib (the client's `evaluation` extra), the curves from scikit-learn:
roc.png (ROC with its bootstrap band and the operating points in a legend, beside the precision-recall curve)
and reliability.png (calibration_curve's observed frequency per probability bin, and how many images each holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from isic import metrics  # noqa: E402
from isic.evaluation import MIN_TPR  # noqa: E402

BAND_RESAMPLES = 200  # enough for a 95 % band's outline; the figures' own intervals use 1000 (isic/evaluation.py)


def roc_band(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, grid: np.ndarray,
             n: int = BAND_RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 2.5th and 97.5th percentile of the TPR at each FPR of `grid` over bootstrap resamples of the groups."""
    rng = np.random.default_rng(seed)
    if groups is None or len(set(groups.tolist())) == len(y):
        members = [np.array([i]) for i in range(len(y))]
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    curves = []
    for _ in range(n):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y[idx].sum() < len(idx):
            r = metrics.roc_curve(y[idx], p[idx])
            curves.append(np.interp(grid, r.fpr, r.tpr))
    if not curves:
        return np.full_like(grid, np.nan), np.full_like(grid, np.nan)
    lo, hi = np.percentile(np.array(curves), [2.5, 97.5], axis=0)
    return lo, hi


def roc_png(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, path: Path, title: str,
            marks: Sequence[tuple[float, str]] = (), auc: float | None = None, ap: float | None = None) -> None:
    """ROC (left) and precision-recall (right). `marks`: (threshold, name) operating points on both curves."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=np.float64)
    fig, (ax, pr) = plt.subplots(1, 2, figsize=(11, 5.2), dpi=110)
    fig.suptitle(title)
    ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--", label="chance")
    ax.axhline(MIN_TPR, color="0.8", lw=1, ls=":", label=f"TPR {MIN_TPR:.0%} (pAUC above it: ISIC 2024)")
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, p)
        grid = np.linspace(0, 1, 201)
        lo, hi = roc_band(y, p, groups, grid)
        ax.fill_between(grid, lo, hi, color="tab:red", alpha=0.15, lw=0, label="95% bootstrap band")
        ax.plot(fpr, tpr, color="tab:red", lw=2, label="ROC" + (f", AUC {auc:.3f}" if auc is not None else ""))
        precision, recall, _ = precision_recall_curve(y, p)
        pr.step(recall, precision, where="post", color="tab:blue", lw=2,
                label="precision-recall" + (f", AP {ap:.3f}" if ap is not None else ""))
        pr.axhline(y.mean(), color="0.75", lw=1, ls="--", label=f"prevalence {y.mean():.3f}")
        for (threshold, name), marker in zip(marks, "osD^v", strict=False):
            sens, spec = metrics.sens_spec(y, p, threshold)
            called = p >= threshold
            prec = float((called & (y == 1)).sum() / called.sum()) if called.any() else float("nan")
            label = f"{name}: threshold {threshold:.3g}, sens. {sens:.2f}, spec. {spec:.2f}"
            ax.plot(1 - spec, sens, marker, ms=8, mfc="none", mew=2, clip_on=False, label=label)
            if called.any():  # no image called malignant: no precision to mark
                pr.plot(sens, prec, marker, ms=8, mfc="none", mew=2, clip_on=False,
                        label=f"{name}: precision {prec:.2f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title="ROC")
    pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title="precision-recall")
    for a in (ax, pr):
        a.grid(alpha=0.3)
        a.legend(loc="lower right" if a is ax else "upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reliability_points(y: np.ndarray, p: np.ndarray, bins: int = metrics.ECE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(mean predicted probability, observed melanoma frequency) of each non-empty equal-width bin: scikit-learn's
    calibration_curve, which also takes a set of one class (an over-confident set of benign lesions is the case
    the diagram exists for)."""
    observed, predicted = calibration_curve(np.asarray(y, dtype=int), np.asarray(p, dtype=np.float64), n_bins=bins,
                                            strategy="uniform", pos_label=1)
    return predicted, observed


def reliability_png(y: np.ndarray, p: np.ndarray, path: Path, title: str, bins: int = metrics.ECE_BINS) -> None:
    """Observed melanoma frequency against mean predicted probability per equal-width bin (on the diagonal when
    calibrated), and the number of images per bin below it."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=np.float64)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), dpi=110, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--", label="perfectly calibrated")
    if len(y):
        predicted, observed = reliability_points(y, p, bins)
        ax.plot(predicted, observed, "o-", color="tab:red", label=f"this model ({bins} bins)")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed melanoma frequency", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.hist(p, bins=np.linspace(0, 1, bins + 1), color="0.5")
    hist.set(xlabel="predicted probability", ylabel="images", yscale="log" if len(p) > 100 else "linear")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

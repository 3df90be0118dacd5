"""The figures ISIC practitioners compare, from scikit-learn (the client's `evaluation` extra): ROC AUC, partial
AUC above 80 % TPR (ISIC 2024's metric, by its official formula) and average precision, each with a bootstrap
95 % interval that resamples patients (or lesions) rather than images, overall, per source, and per subgroup of
the metadata the label files hold (sex, age band, anatomic site, Fitzpatrick skin type).

The point figures are scikit-learn's. The intervals resample a group at a time 1000 times; they use isic/metrics.py's
numpy twins of the same definitions (tests/unit/test_evaluation.py holds them equal to scikit-learn's, ties
included), because scikit-learn's per-call input checks (~4 ms) would make a subgroup table of a 33k-image set take
minutes. The pictures: client/figures.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from isic import metrics
from isic.labels import LabelRow

MIN_TPR = 0.8  # ISIC 2024: partial AUC above 80 % TPR
# Subgroup columns (isic/labels.py SUBGROUP_COLUMNS), how the table names them, and how a value becomes a row.
SUBGROUPS = {"sex": "sex", "age_approx": "age band", "anatom_site_general": "anatomic site",
             "fitzpatrick_skin_type": "skin type (Fitzpatrick)"}
AGE_BANDS = ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74"), (float("inf"), "75+"))
MISSING = "(not given)"


def pauc_above_tpr(y: np.ndarray, p: np.ndarray, min_tpr: float = MIN_TPR) -> float:
    """ISIC 2024's official score: scikit-learn's McClish-standardised partial AUC of the flipped problem up to
    FPR 1 - min_tpr, rescaled to the area above TPR min_tpr (at most 1 - min_tpr). Not isic-challenge-scoring's
    `auc_sens_80`, which is another number."""
    y = np.asarray(y)
    max_fpr = abs(1 - min_tpr)
    scaled = roc_auc_score(np.abs(y - 1), -1.0 * np.asarray(p, dtype=np.float64), max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5))


def figures(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None = None, n: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """Counts, and with both classes present: AUC, pAUC above 80 % TPR and AP with bootstrap 95 % intervals
    (resampling `groups`, e.g. patients, when some group holds several images)."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=np.float64)
    out: dict[str, Any] = {"images": len(y), "melanoma": int(y.sum())}
    if not 0 < y.sum() < len(y):
        out["note"] = "one class only: no AUC"
        return out
    by_group = groups is not None and len(set(np.asarray(groups).tolist())) < len(y)
    g = np.asarray(groups) if by_group else None
    out.update({
        "auc": float(roc_auc_score(y, p)),
        "auc_95ci": list(metrics.bootstrap_ci(y, p, metrics.auc, n, seed, groups=g)),
        "pauc_above_80_tpr": pauc_above_tpr(y, p),
        "pauc_above_80_tpr_95ci": list(metrics.bootstrap_ci(
            y, p, lambda a, b: metrics.partial_auc_above_tpr(a, b, MIN_TPR), n, seed, groups=g)),
        "average_precision": float(average_precision_score(y, p)),
        "average_precision_95ci": list(metrics.bootstrap_ci(y, p, metrics.average_precision, n, seed, groups=g)),
        "bootstrap": "group" if by_group else "image",
    })
    return out


def subgroup(column: str, value: str) -> str:
    """The row an image falls in: its value, an age band for age_approx, MISSING when the file leaves it empty."""
    value = value.strip()
    if not value:
        return MISSING
    if column == "age_approx":
        try:
            age = float(value)
        except ValueError:
            return MISSING
        return next(name for upper, name in AGE_BANDS if age < upper)
    return value


def breakdown(rows: Sequence[LabelRow], scores: Mapping[str, float], n: int = 1000) -> dict[str, Any]:
    """Figures per source (when there are several) and per subgroup, for the subgroup columns the scored rows'
    files have (a column no file has gets no table)."""
    scored = [r for r in rows if r.name in scores]
    out: dict[str, Any] = {"per_source": {}, "subgroups": {}}

    def of(subset: list[LabelRow]) -> dict[str, Any]:
        return figures(np.array([r.target for r in subset]), np.array([scores[r.name] for r in subset]),
                       np.array([r.group for r in subset]), n)

    sources = sorted({r.source for r in scored})
    if len(sources) > 1:
        out["per_source"] = {s: of([r for r in scored if r.source == s]) for s in sources}
    for column in SUBGROUPS:
        having = [r for r in scored if column in r.meta]
        if not having or all(not r.meta[column].strip() for r in having):
            continue  # the column is in none of the files, or empty in all
        values: dict[str, list[LabelRow]] = {}
        for r in scored:
            values.setdefault(subgroup(column, r.meta.get(column, "")), []).append(r)
        order = [name for _, name in AGE_BANDS] if column == "age_approx" else sorted(set(values) - {MISSING})
        out["subgroups"][column] = {v: of(values[v]) for v in [*order, MISSING] if v in values}
    return out


def _cell(f: Mapping[str, Any], key: str) -> str:
    lo, hi = f[key + "_95ci"]
    return f"{f[key]:.3f} ({lo:.3f}-{hi:.3f})"


def table(title: str, rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per row: images, melanomas, AUC, pAUC and AP with their intervals."""
    lines = [f"{title:<24} {'images':>6} {'mel.':>5}  {'AUC (95% CI)':<22} {'pAUC>80%TPR (95% CI)':<22} "
             "AP (95% CI)"]
    for name, f in rows.items():
        line = f"  {name[:22]:<22} {f['images']:>6} {f['melanoma']:>5}  "
        if "auc" in f:
            line += (f"{_cell(f, 'auc'):<22} {_cell(f, 'pauc_above_80_tpr'):<22} "
                     f"{_cell(f, 'average_precision')}")
        else:
            line += f.get("note", "")
        lines.append(line)
    return lines

"""Calibration and the operating point, fitted at build time on the user's labelled validation set.

The archive's own model (the bytes it will serve, at its precision and runtime) scores the validation images
through handler/pipeline.py; what is fitted here travels in the archive: the temperature in
model-config.yaml (pipeline.PipelineConfig.temperature: probability = sigmoid(logit(raw TTA score) / T),
pipeline.calibrate), the threshold likewise, and what the validation set measured in metadata.json.

Temperature scaling (Guo et al., ICML 2017), not isotonic regression: one parameter, so it is stable with the
few melanomas a validation set holds (SIIM-ISIC 2020: 1.8 % positives); it is applied to the TTA score and
is monotone in it, so the ranking and the AUC are unchanged, where isotonic regression's steps give many
different images one score. Isotonic is therefore not offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler.checks import QualityLimits, quality
from handler.pipeline import InputError, Model, PipelineConfig, Scorer, prepare, view_probabilities
from isic import metrics
from isic.labels import LabelError, find_images, read_label_rows

BATCH = 8  # images per forward pass (x8 views): bounded memory on a small build machine
MIN_PER_CLASS = 5  # below this no temperature or threshold means anything
FEW_POSITIVES = 50  # below this the build warns that the intervals are wide
TEMPERATURE_BOUNDS = (1e-2, 1e2)


class CalibrationError(Exception):
    pass


@dataclass
class ValidationScores:
    names: list[str]
    y: np.ndarray  # 1 = melanoma
    groups: np.ndarray  # the patient of each image (the image itself where the CSV names none)
    logits: np.ndarray  # views x N, float32 as the model gave them
    skipped: list[str]  # labelled images that are missing or cannot be read
    features: np.ndarray | None = None  # N x D pooled features (the model's second output), mean over views
    quality_flagged: dict[str, int] = field(default_factory=dict)  # images each fixed input check flags

    @property
    def by_patient(self) -> bool:
        return len(set(self.groups.tolist())) < len(self.groups)

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        """What the archive would serve for each image: pipeline.view_probabilities itself."""
        views, n = self.logits.shape
        return view_probabilities(torch.from_numpy(self.logits).reshape(-1, 1), n, views, temperature).numpy()


def score_validation_set(model: Model, cfg: PipelineConfig, images: Path, labels: Path,
                         limits: QualityLimits | None = None) -> ValidationScores:
    try:
        rows = read_label_rows(labels)
    except LabelError as e:
        raise CalibrationError(str(e)) from None
    if not images.is_dir():
        raise CalibrationError(f"validation image folder {images} does not exist")
    paths, missing = find_images(images, [r.name for r in rows])
    scorer = Scorer(model, cfg)
    names, y, groups, skipped, chunks = [], [], [], list(missing), []
    feats: list[np.ndarray] = []
    flagged: dict[str, int] = {}
    limits = limits or QualityLimits(min_side=cfg.image_size)

    def run(batch: list[torch.Tensor]) -> None:
        logits, features = scorer.outputs(batch)
        chunks.append(logits.reshape(cfg.tta_views, -1).numpy())
        if features is not None:
            feats.append(features)

    batch: list[torch.Tensor] = []
    for r in rows:
        if r.name not in paths:
            continue
        try:
            prepared = prepare(paths[r.name].read_bytes(), cfg)
            batch.append(prepared.tensor)
            for check, verdict in quality(*prepared.size, prepared.resized, limits).items():
                flagged[check] = flagged.get(check, 0) + int(verdict["flagged"])
        except (InputError, OSError):
            skipped.append(r.name)
            continue
        names.append(r.name)
        y.append(r.target)
        groups.append(r.group)
        if len(batch) == BATCH:
            run(batch)
            batch = []
    if batch:
        run(batch)
    yy = np.array(y, dtype=int)
    pos, neg = int(yy.sum()), int(len(yy) - yy.sum())
    if pos < MIN_PER_CLASS or neg < MIN_PER_CLASS:
        raise CalibrationError(f"the validation set has {pos} melanoma(s) and {neg} other image(s) that could be "
                               f"read; at least {MIN_PER_CLASS} of each are needed ({len(skipped)} labelled image(s) "
                               f"missing or unreadable under {images})")
    return ValidationScores(names, yy, np.array(groups), np.concatenate(chunks, axis=1), skipped,
                            np.concatenate(feats) if feats else None, flagged)


def nll(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_temperature(scores: ValidationScores) -> float:
    """The temperature minimising the negative log-likelihood of the served (TTA-mean) probability."""
    from scipy.optimize import minimize_scalar

    lo, hi = np.log(TEMPERATURE_BOUNDS)
    fit = minimize_scalar(lambda log_t: nll(scores.y, scores.probabilities(float(np.exp(log_t)))),
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    t = float(np.exp(fit.x))
    if not (TEMPERATURE_BOUNDS[0] * 1.01 < t < TEMPERATURE_BOUNDS[1] / 1.01):
        raise CalibrationError(f"the fitted temperature {t:.3g} is at the edge of {TEMPERATURE_BOUNDS}: the model "
                               "does not separate this validation set at all; check the labels and the images")
    return round(t, 6)  # written to YAML and JSON as this exact number


def calibration_record(scores: ValidationScores, temperature: float) -> dict[str, Any]:
    before, after = scores.probabilities(), scores.probabilities(temperature)
    return {
        "method": "temperature", "temperature": temperature,
        "images": len(scores.y), "positives": int(scores.y.sum()), "ece_bins": 15,
        "ece_before": round(metrics.expected_calibration_error(scores.y, before), 6),
        "ece_after": round(metrics.expected_calibration_error(scores.y, after), 6),
        "brier_before": round(metrics.brier(scores.y, before), 6),
        "brier_after": round(metrics.brier(scores.y, after), 6),
        "nll_before": round(nll(scores.y, before), 6), "nll_after": round(nll(scores.y, after), 6),
    }


def operating_point(scores: ValidationScores, temperature: float, target: str, value: float) -> dict[str, Any]:
    """The threshold on the served probability that reaches `value` sensitivity (the highest such threshold)
    or specificity (the lowest), with what it gives on this set and bootstrap intervals (by patient when the
    CSV names patients)."""
    if not 0 < value < 1:
        raise CalibrationError(f"--{target} must be between 0 and 1, got {value}")
    p = scores.probabilities(temperature)
    pick = metrics.threshold_for_sensitivity if target == "sensitivity" else metrics.threshold_for_specificity
    threshold, sens, spec = pick(scores.y, p, value)
    threshold = float(np.clip(threshold, 0.0, 1.0))
    groups = scores.groups if scores.by_patient else None
    sens_ci, spec_ci = metrics.sens_spec_ci(scores.y, p, threshold, groups=groups)
    return {
        "target": target, "value": value, "threshold": threshold,
        "sensitivity": round(sens, 6), "sensitivity_95ci": [round(v, 6) for v in sens_ci],
        "specificity": round(spec, 6), "specificity_95ci": [round(v, 6) for v in spec_ci],
        "images": len(scores.y), "positives": int(scores.y.sum()),
        "bootstrap": "patient" if groups is not None else "image",
    }


def report(scores: ValidationScores, calibration: dict[str, Any] | None, op: dict[str, Any] | None) -> list[str]:
    lines = [f"validation set: {len(scores.y)} image(s), {int(scores.y.sum())} melanoma(s)"
             + (f", {len(scores.skipped)} labelled image(s) missing or unreadable" if scores.skipped else "")]
    if scores.y.sum() < FEW_POSITIVES:
        lines.append(f"  note: fewer than {FEW_POSITIVES} melanomas: the fitted values and their intervals are rough")
    if calibration:
        lines.append(f"  temperature {calibration['temperature']:.4f}: ECE {calibration['ece_before']:.4f} -> "
                     f"{calibration['ece_after']:.4f}, Brier {calibration['brier_before']:.4f} -> "
                     f"{calibration['brier_after']:.4f}")
    if op:
        lines.append(f"  threshold {op['threshold']:.6g} for {op['target']} >= {op['value']:g}: sensitivity "
                     f"{op['sensitivity']:.3f} [{op['sensitivity_95ci'][0]:.3f}, {op['sensitivity_95ci'][1]:.3f}], "
                     f"specificity {op['specificity']:.3f} [{op['specificity_95ci'][0]:.3f}, "
                     f"{op['specificity_95ci'][1]:.3f}] ({op['bootstrap']} bootstrap)")
    return lines

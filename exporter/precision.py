"""Agreement of a reduced-precision archive with fp32, measured on the user's own images at build time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handler.archive import load_model, release_memory
from handler.pipeline import InputError, PipelineConfig, Scorer, load_tensor

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo"}
MIN_IMAGES = 20
BATCH = 8  # images per forward (x8 TTA views)
# int8 was measured and is not offered; the evidence is in docs/PRECISION.md.
INT8_REFUSAL = ("int8 is not available: ResNeSt's split-attention defeats torch's FX quantisation "
                "(symbolic tracing cannot iterate torch.split), and ONNX Runtime int8, 3.3x faster, missed "
                "max |dp| <= 0.02 in every configuration tried (0.024-0.075); see docs/PRECISION.md. "
                "Use --precision bf16")


class PrecisionError(Exception):
    pass


@dataclass
class Agreement:
    images: int
    skipped: int
    max_abs_dp: float
    mean_abs_dp: float
    auc_fp32: float | None
    auc_reduced: float | None
    labelled: int

    def to_mapping(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def report(self, precision: str) -> str:
        line = (f"{precision} vs fp32 on {self.images} calibration image(s): max |dp| {self.max_abs_dp:.4f}, "
                f"mean |dp| {self.mean_abs_dp:.4f}")
        if self.auc_fp32 is not None:
            line += f"; AUC fp32 {self.auc_fp32:.4f}, {precision} {self.auc_reduced:.4f} ({self.labelled} labelled)"
        if self.skipped:
            line += f"; {self.skipped} unreadable file(s) skipped"
        return line


def calibration_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PrecisionError(f"calibration folder {folder} does not exist")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
    if len(files) < MIN_IMAGES:
        raise PrecisionError(f"calibration folder {folder} holds {len(files)} image(s); at least {MIN_IMAGES} "
                             "are needed (200 or more of your own to trust the figure)")
    return files


def score(model_bytes: bytes, precision: str, tensors: list[Any], cfg: PipelineConfig) -> np.ndarray:
    scorer = Scorer(load_model(model_bytes, precision), cfg)
    out: list[float] = []
    for i in range(0, len(tensors), BATCH):
        out += scorer.predict(tensors[i:i + BATCH])
    del scorer
    release_memory()
    return np.array(out)


def measure(fp32_bytes: bytes, reduced_bytes: bytes, precision: str, cfg: PipelineConfig, folder: Path,
            labels_csv: Path | None = None) -> Agreement:
    files = calibration_images(folder)
    tensors, names, skipped = [], [], 0
    for f in files:
        try:
            tensors.append(load_tensor(f.read_bytes(), cfg))
            names.append(f)
        except (InputError, OSError):
            skipped += 1
    if len(tensors) < MIN_IMAGES:
        raise PrecisionError(f"only {len(tensors)} readable image(s) in {folder}; at least {MIN_IMAGES} needed")
    p32 = score(fp32_bytes, "fp32", tensors, cfg)
    pr = score(reduced_bytes, precision, tensors, cfg)
    d = np.abs(pr - p32)
    auc32 = aucr = None
    labelled = 0
    if labels_csv is not None:
        from isic import metrics
        from isic.labels import LabelError, read_labels

        try:
            labels = read_labels(labels_csv)
        except LabelError as e:
            raise PrecisionError(str(e)) from None
        idx = [i for i, f in enumerate(names) if f.stem in {Path(n).stem for n in labels}]
        by_stem = {Path(n).stem: v for n, v in labels.items()}
        y = np.array([by_stem[names[i].stem] for i in idx])
        labelled = len(idx)
        if labelled and 0 < y.sum() < labelled:
            auc32, aucr = metrics.auc(y, p32[idx]), metrics.auc(y, pr[idx])
    return Agreement(len(tensors), skipped, float(d.max()), float(d.mean()), auc32, aucr, labelled)

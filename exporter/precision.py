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
CALIBRATION_SHARE = 4  # int8: every 4th image calibrates the quantiser; agreement is measured on the others
MAX_CALIBRATION_IMAGES = 64


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
    calibrated_on: int = 0  # int8: images that calibrated the quantiser, none of them among `images`

    def to_mapping(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def report(self, precision: str) -> str:
        which = (f"image(s) it was not calibrated on ({self.calibrated_on} others calibrated it)"
                 if self.calibrated_on else "validation image(s)")
        line = (f"{precision} vs fp32 on {self.images} {which}: max |dp| {self.max_abs_dp:.4f}, "
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


def split_for_int8(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(calibrate, measure): int8's activation ranges are fitted on some of the user's images, so its agreement
    is measured on the others; a figure on the images it was fitted to would flatter it."""
    calibrate = files[::CALIBRATION_SHARE][:MAX_CALIBRATION_IMAGES]
    chosen = set(calibrate)
    measured = [f for f in files if f not in chosen]
    if len(measured) < MIN_IMAGES:
        need = MIN_IMAGES + -(-MIN_IMAGES // (CALIBRATION_SHARE - 1))
        raise PrecisionError(f"--precision int8 needs at least {need} images ({len(files)} given): a quarter "
                             f"calibrate the quantiser and at least {MIN_IMAGES} others measure it")
    return calibrate, measured


def load_tensors(files: list[Path], cfg: PipelineConfig) -> tuple[list[Any], list[Path], int]:
    """Preprocessed tensors of the readable files, their paths, and how many could not be read."""
    tensors, names, skipped = [], [], 0
    for f in files:
        try:
            tensors.append(load_tensor(f.read_bytes(), cfg))
            names.append(f)
        except (InputError, OSError):
            skipped += 1
    return tensors, names, skipped


def score(model_bytes: bytes, precision: str, tensors: list[Any], cfg: PipelineConfig,
          runtime: str | None = None) -> np.ndarray:
    scorer = Scorer(load_model(model_bytes, precision, runtime, cfg.tta_views), cfg)
    out: list[float] = []
    for i in range(0, len(tensors), BATCH):
        out += scorer.predict(tensors[i:i + BATCH])
    del scorer
    release_memory()
    return np.array(out)


def measure(fp32_bytes: bytes, reduced_bytes: bytes, precision: str, cfg: PipelineConfig, files: list[Path],
            labels_csv: Path | None = None, calibrated_on: int = 0, runtime: str | None = None) -> Agreement:
    """Both models on `files` through the serving pipeline. `calibrated_on`: how many other images calibrated
    the reduced model (int8), for the report. `runtime`: what runs both (openvino: one ONNX file in f32 and in
    the reduced precision); by default each precision's own (load_model)."""
    tensors, names, skipped = load_tensors(files, cfg)
    if len(tensors) < MIN_IMAGES:
        raise PrecisionError(f"only {len(tensors)} readable image(s) of {len(files)}; at least {MIN_IMAGES} needed")
    p32 = score(fp32_bytes, "fp32", tensors, cfg, runtime)
    pr = score(reduced_bytes, precision, tensors, cfg, runtime)
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
    return Agreement(len(tensors), skipped, float(d.max()), float(d.mean()), auc32, aucr, labelled, calibrated_on)

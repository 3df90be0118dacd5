"""ISIC-format data for training: labels, a patient-grouped split, a decoded-once image cache, augmentation.

The cache holds each image exactly as serving has it just before normalisation
(handler/pipeline.py: decode -> EXIF -> RGB -> resize), so training sees the served pixels and an epoch
costs network time, not JPEG decoding. Validation normalises the cached array with the same function the
handler uses; augmentation runs only on training batches, between resize and normalise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from handler.pipeline import InputError, PipelineConfig, decode_image, resize, to_tensor
from isic.labels import LabelError, LabelRow, find_images, read_label_rows

CACHE_FORMAT = 1  # bump when what a cache entry holds changes


class DataError(Exception):
    """Input that cannot be trained on; the message is one actionable line."""


@dataclass(frozen=True)
class Dataset:
    rows: list[LabelRow]
    paths: list[Path]

    @property
    def targets(self) -> np.ndarray:
        return np.array([r.target for r in self.rows], dtype=np.int64)


def load_dataset(labels: Path, images: Path) -> Dataset:
    """Labels and their image files, or DataError naming what is wrong before anything is trained."""
    try:
        rows = read_label_rows(labels)
    except LabelError as e:
        raise DataError(str(e)) from None
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"label file {labels}: image {dup} is listed more than once")
    found, missing = find_images(images, names)
    if missing:
        raise DataError(f"{len(missing)} of {len(rows)} labelled image(s) not found under {images} "
                        f"(e.g. {', '.join(missing[:3])}); fix --images or drop those rows")
    positives = sum(r.target for r in rows)
    if positives in (0, len(rows)):
        raise DataError(f"label file {labels}: all {len(rows)} image(s) are "
                        f"{'melanoma' if positives else 'benign'}; training needs both classes")
    return Dataset(rows, [found[n] for n in names])


def grouped_split(rows: Sequence[LabelRow], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and validation indices with no patient on both sides, stratified: patients with a melanoma
    and patients without are split separately, so both sides keep the data's prevalence."""
    if not 0 < val_fraction < 1:
        raise DataError("--val-fraction must be between 0 and 1")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.group, []).append(i)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for positive in (True, False):
        keys = sorted(g for g, idx in groups.items() if any(rows[i].target for i in idx) == positive)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        want = sum(len(groups[k]) for k in keys) * val_fraction
        taken = 0
        for k in keys:
            if taken >= want:
                break
            val += groups[k]
            taken += len(groups[k])
    val_set = set(val)
    train = [i for i in range(len(rows)) if i not in val_set]
    for name, idx in (("training", train), ("validation", sorted(val))):
        ys = {rows[i].target for i in idx}
        if ys != {0, 1}:
            raise DataError(f"the {name} split has {'no' if not idx else 'one class:'} "
                            f"{'images' if not idx else ('melanoma' if 1 in ys else 'benign')} only; "
                            "add labelled images of both classes (melanomas from more patients) or change "
                            "--val-fraction")
    return train, sorted(val)


def _cache_key(paths: Sequence[Path], cfg: PipelineConfig) -> str:
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "size": cfg.image_size,
                                   "reduced_decode": cfg.reduced_decode}).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_cache(paths: Sequence[Path], cfg: PipelineConfig, cache_dir: Path, workers: int = 0,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """N x S x S x 3 uint8: every image decoded and resized once, as serving does, memory-mapped from
    cache_dir. Reused while the files, the image size and the decode settings are unchanged."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"images-{cfg.image_size}px-{_cache_key(paths, cfg)}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    s = cfg.image_size
    partial = path.with_suffix(f".{os.getpid()}.partial")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(paths), s, s, 3))

    def one(i: int) -> int:
        try:
            out[i] = resize(decode_image(paths[i].read_bytes(), cfg), cfg)
        except InputError as e:
            raise DataError(f"{paths[i]}: {e}") from None
        except OSError as e:
            raise DataError(f"{paths[i]}: cannot read it ({e.strerror})") from None
        return i

    try:
        # Pillow and OpenCV release the GIL while decoding and resizing: threads use every core.
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for _ in pool.map(one, range(len(paths))):
                if progress:
                    progress(1)
        out.flush()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def augmentation() -> A.Compose:
    """What the SIIM-ISIC 2020 solutions used, on the resized image: the dihedral flips (serving's TTA
    views), shift-scale-rotate, brightness/contrast, hue, and coarse dropout."""
    return A.Compose([
        A.Transpose(p=0.5),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(translate_percent=(-0.1, 0.1), scale=(0.85, 1.15), rotate=(-20, 20),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15),
                        fill=0, p=0.3),
    ], seed=0)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """One augmentation seed per (run, epoch, position in the epoch): a resumed run draws the same
    augmentations as an uninterrupted one, whatever was drawn before the interruption."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


def train_batch(cache: np.ndarray, indices: Sequence[int], aug: A.Compose | None, cfg: PipelineConfig,
                seed: int, epoch: int, start: int) -> torch.Tensor:
    """Augmented, normalised N x 3 x S x S batch of cached images (positions start.. in the epoch)."""
    out = []
    for j, i in enumerate(indices):
        img = np.asarray(cache[i])
        if aug is not None:
            aug.set_random_seed(sample_seed(seed, epoch, start + j))
            img = aug(image=img)["image"]
        out.append(to_tensor(img, cfg))
    return torch.stack(out)


def eval_tensors(cache: np.ndarray, indices: Sequence[int], cfg: PipelineConfig) -> list[torch.Tensor]:
    """Validation images exactly as the handler preprocesses them (no augmentation)."""
    return [to_tensor(np.asarray(cache[i]), cfg) for i in indices]

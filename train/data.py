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
from typing import NamedTuple

import albumentations as A
import cv2
import numpy as np
import torch

from handler.pipeline import InputError, PipelineConfig, decode_image, resize, to_tensor
from isic.labels import LabelError, LabelRow, LabelSet, find_images, read_sources

CACHE_FORMAT = 1  # bump when what a cache entry holds changes
# Pipeline fields that act after the cached array (normalisation, TTA, the decision): they do not change what
# the cache holds. Every other field (size, resize, decode) is part of the cache key.
AFTER_CACHE = frozenset({"mean", "std", "max_pixel_value", "tta_views", "threshold", "temperature"})


class DataError(Exception):
    """Input that cannot be trained on; the message is one actionable line."""


@dataclass(frozen=True)
class Dataset:
    rows: list[LabelRow]
    paths: list[Path]
    labels: LabelSet | None = None  # the sources read, for the per-source table

    @property
    def targets(self) -> np.ndarray:
        return np.array([r.target for r in self.rows], dtype=np.int64)


def load_dataset(labels: Path | Sequence[Path], images: Path | Sequence[Path],
                 indeterminate: str = "exclude") -> Dataset:
    """Labels (one file or several sources, isic/labels.py) and their image files, or DataError naming what is
    wrong before anything is trained."""
    labels = [labels] if isinstance(labels, Path) else list(labels)
    folders = [images] if isinstance(images, Path) else list(images)
    try:
        label_set = read_sources(labels, indeterminate)
    except LabelError as e:
        raise DataError(str(e)) from None
    rows = label_set.rows
    where = labels[0] if len(labels) == 1 else "the label files"
    if not rows:
        raise DataError(f"{where}: no labelled image left (excluded: "
                        f"{'; '.join(f'{s.name}: {s.excluded}' for s in label_set.sources)})")
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist")
    names = [r.name for r in rows]
    found, missing = find_images(folders, names)
    if missing:
        under = folders[0] if len(folders) == 1 else ", ".join(map(str, folders))
        raise DataError(f"{len(missing)} of {len(rows)} labelled image(s) not found under {under} "
                        f"(e.g. {', '.join(missing[:3])}); fix --images or drop those rows")
    positives = sum(r.target for r in rows)
    if positives in (0, len(rows)):
        raise DataError(f"label file {where}: all {len(rows)} image(s) are "
                        f"{'melanoma' if positives else 'benign'}; training needs both classes")
    return Dataset(rows, [found[n] for n in names], label_set)


class Split(NamedTuple):
    train: list[int]
    validation: list[int]
    unused: list[int]  # --val-source: other sources' images of a validation patient or lesion


def grouped_split(rows: Sequence[LabelRow], val_fraction: float, seed: int,
                  val_source: str | None = None) -> Split:
    """Train and validation indices with no group (patient, else lesion, else image: isic/labels.py joins images
    that share either) on both sides, stratified: groups with a melanoma and groups without are split
    separately, so both sides keep the data's prevalence. `val_source`: validation images come from that source
    alone (val_fraction of its images), and the other sources' images of a validation group are left unused."""
    if not 0 < val_fraction < 1:
        raise DataError("--val-fraction must be between 0 and 1")
    sources = sorted({r.source for r in rows})
    if val_source is not None and val_source not in sources:
        raise DataError(f"--val-source {val_source}: no such source among the labels ({', '.join(sources)})")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.group, []).append(i)
    counted = lambda idx: [i for i in idx if val_source is None or rows[i].source == val_source]  # noqa: E731
    rng = np.random.default_rng(seed)
    taken_groups: list[str] = []
    for positive in (True, False):
        keys = sorted(g for g, idx in groups.items()
                      if counted(idx) and any(rows[i].target for i in counted(idx)) == positive)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        want = sum(len(counted(groups[k])) for k in keys) * val_fraction
        taken = 0
        for k in keys:
            if taken >= want:
                break
            taken_groups.append(k)
            taken += len(counted(groups[k]))
    in_val = {i for k in taken_groups for i in groups[k]}
    val = sorted(i for i in in_val if val_source is None or rows[i].source == val_source)
    unused = sorted(in_val - set(val))
    train = [i for i in range(len(rows)) if i not in in_val]
    for name, idx in (("training", train), ("validation", val)):
        ys = {rows[i].target for i in idx}
        if ys != {0, 1}:
            raise DataError(f"the {name} split has {'no' if not idx else 'one class:'} "
                            f"{'images' if not idx else ('melanoma' if 1 in ys else 'benign')} only; "
                            "add labelled images of both classes (melanomas from more patients) or change "
                            "--val-fraction")
    check_split(rows, train, val)
    return Split(train, val, unused)


def check_split(rows: Sequence[LabelRow], train: Sequence[int], validation: Sequence[int]) -> None:
    """DataError unless no patient and no lesion is on both sides: what the groups exist for, checked on the
    identifiers themselves at every split, so a grouping bug cannot leak a lesion into validation unnoticed."""
    for what, key in (("patient", lambda r: r.patient), ("lesion", lambda r: r.lesion)):
        both = {key(rows[i]) for i in train} & {key(rows[i]) for i in validation} - {""}
        if both:
            raise DataError(f"the split puts {what} {sorted(both)[0]} on both sides ({len(both)} such); "
                            "this is a bug in the grouping: please report it")


def _cache_key(paths: Sequence[Path], cfg: PipelineConfig) -> str:
    """The files and every pipeline field the cached pixels depend on: all but those applied after the cache
    (AFTER_CACHE), so a field added to PipelineConfig later is in the key until someone says it may not be."""
    fields = {k: v for k, v in cfg.to_mapping().items() if k not in AFTER_CACHE}
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_cache(paths: Sequence[Path], cfg: PipelineConfig, cache_dir: Path, workers: int = 0,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """N x S x S x 3 uint8: every image decoded and resized once, as serving does, memory-mapped from
    cache_dir. Reused while the files and the decode and resize settings (_cache_key) are unchanged."""
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

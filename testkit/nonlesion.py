"""Generated images that are not skin-lesion photos, for the out-of-distribution check: text, checkerboards,
flat colours and natural-scene-like noise (1/f amplitude spectrum, the statistics of natural images)."""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("text", "checkerboard", "flat", "natural_noise")


def text_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    img = np.full((size, size, 3), rng.integers(200, 256, 3), np.uint8)
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    words = ["melanoma", "invoice", "TOTAL 42.00", "hello world", "Lorem ipsum", "screenshot", "2026-12-01"]
    for row in range(rng.integers(4, 9)):
        y = 24 + row * int(rng.integers(22, 34))
        cv2.putText(img, str(rng.choice(words)), (int(rng.integers(2, 30)), y), int(rng.integers(0, 8)),
                    float(rng.uniform(0.5, 1.1)), ink, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def checkerboard(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    cell = int(rng.integers(4, 48))
    yy, xx = np.mgrid[0:size, 0:size] // cell
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return np.where(((yy + xx) % 2 == 0)[..., None], a, b).astype(np.uint8)


def flat(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    return np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)


def natural_noise(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Colour noise with a 1/f amplitude spectrum: clouds, foliage, textures, not a lesion on skin."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    out = np.empty((size, size, 3))
    for c in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f ** rng.uniform(0.9, 1.4)
        plane = np.fft.ifft2(spectrum).real
        out[..., c] = (plane - plane.mean()) / (plane.std() + 1e-12)
    return np.clip(128 + 50 * out, 0, 255).astype(np.uint8)


GENERATORS = {"text": text_image, "checkerboard": checkerboard, "flat": flat, "natural_noise": natural_noise}


def nonlesion_images(per_kind: int = 25, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(kind, GENERATORS[kind](rng)) for kind in KINDS for _ in range(per_kind)]

"""Test images, generated at test time: no binary fixtures in the repository."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def lesion_rgb(height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A smooth skin-like background with a dark, irregular blob and mild noise (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    r = rng.uniform(0.15, 0.3) * min(height, width)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6)))
    blob = 1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - radius) / (0.05 * r)))
    skin = np.array([rng.uniform(180, 230), rng.uniform(130, 170), rng.uniform(110, 150)])
    lesion = np.array([rng.uniform(40, 110), rng.uniform(20, 70), rng.uniform(10, 50)])
    shade = 1 - 0.15 * (xx / width)
    img = (skin * (1 - blob[..., None]) + lesion * blob[..., None]) * shade[..., None]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str = "JPEG", **kw: object) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 92)
    if fmt == "HEIF":  # what phones save; Pillow writes it through pillow-heif
        from pillow_heif import register_heif_opener

        register_heif_opener()
        kw.setdefault("quality", 90)
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def heic_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    """A HEIC whose stored pixels are `rgb` and whose EXIF asks viewers to rotate it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(rgb, "HEIF", exif=exif.tobytes())


def jpeg_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels are `rgb` and whose EXIF asks viewers to rotate it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(rgb, "JPEG", exif=exif.tobytes())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def variants(seed: int = 0) -> dict[str, bytes]:
    """The same lesion in the encodings and modes users send."""
    rgb = lesion_rgb(seed=seed)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    return {
        "jpeg": encode(rgb, "JPEG"),
        "png": encode(rgb, "PNG"),
        "rgba_png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "gray_png": encode(Image.fromarray(rgb).convert("L"), "PNG"),
        "exif6_jpeg": jpeg_with_orientation(rgb, 6),
        "webp": encode(rgb, "WEBP", lossless=True),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF"),
        "gif": encode(Image.fromarray(rgb).convert("P"), "GIF"),
        "heic": encode(rgb, "HEIF"),
        "exif6_heic": heic_with_orientation(rgb, 6),
    }

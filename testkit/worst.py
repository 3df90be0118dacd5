"""The costliest image of every accepted format at the pipeline's limits, generated at run time (no binaries in
the repository): what the input-cost test sends to a real worker and bench/decode_cost.py measures.

"Costliest" per format is the mode and layout whose decoder holds the most bytes a pixel at its peak
(measured, handler/pipeline.py PEAK_BYTES_PER_PIXEL): 16-bit RGBA for PNG, 32-bit integers in one strip for
TIFF, RGBA for WebP and HEIF, palette for GIF and BMP (the most pixels a 26 MiB body holds), CMYK for JPEG
(progressive: every coefficient buffered; baseline: too thin to be decoded at a reduced scale). Flat content:
the cost of these decoders depends on the pixels decoded, not on what they show.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable

from PIL import Image

from handler.pipeline import PipelineConfig, decoded_pixel_limit


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, depth: int, color_type: int, row: bytes | None = None) -> bytes:
    """A PNG of `height` copies of one row (zeros unless given), compressed as it is written: a 50 MP file in
    a second and a few MB of memory."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    line = b"\x00" + (row if row is not None else bytes((width * channels * depth + 7) // 8))
    co = zlib.compressobj(9)
    idat = b"".join(co.compress(line) for _ in range(height)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    palette = _chunk(b"PLTE", bytes(range(256)) * 3) if color_type == 3 else b""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + palette + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def issue_png16(side: int = 7000) -> bytes:
    """Issue #40's upload: a ~100 KB 16-bit grayscale gradient of 7000 x 7000 (under the 50 MP limit)."""
    row = b"".join(struct.pack(">H", round(65535 * x / (side - 1))) for x in range(side))
    return png_raw(side, side, 16, 0, row)


def bmp8(width: int, height: int) -> bytes:
    """An uncompressed 8-bit palette BMP: one byte a pixel, the most pixels a BMP body can hold."""
    stride = (width + 3) & ~3
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + stride * height, 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, stride * height, 2835, 2835, 256, 0)
    return header + info + palette + bytes(stride * height)


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _side(pixels: int) -> int:
    return math.isqrt(pixels)


def worst_inputs(cfg: PipelineConfig | None = None, heif: bool = True) -> dict[str, Callable[[], bytes]]:
    """name -> a function making that input (each is made only when asked for: some take seconds)."""
    cfg = cfg or PipelineConfig()
    whole, _ = decoded_pixel_limit("PNG", False, cfg)
    webp, _ = decoded_pixel_limit("WEBP", False, cfg)
    buffered, _ = decoded_pixel_limit("JPEG", False, cfg)
    side = _side(whole)
    thin = 65500  # JPEG's widest: a strip this wide cannot be decoded at a reduced scale below 512 rows
    cases: dict[str, Callable[[], bytes]] = {
        "PNG 16-bit gray 7000x7000 (issue #40)": issue_png16,
        "PNG 16-bit RGBA": lambda: png_raw(side, side, 16, 6),
        "PNG 16-bit gray": lambda: png_raw(side, side, 16, 0),
        "TIFF 32-bit int, one strip": lambda: _save(Image.new("I", (side, side), 70000), "TIFF",
                                                    compression="tiff_adobe_deflate", tiffinfo={278: side}),
        "GIF palette": lambda: _save(Image.new("P", (side, side), 3), "GIF"),
        "BMP 8-bit palette": lambda: bmp8(side, side),
        "WebP RGBA lossless": lambda: _save(Image.new("RGBA", (_side(webp),) * 2, (10, 20, 30, 128)), "WEBP",
                                            lossless=True, method=0),
        "JPEG baseline 4:4:4, 50 MP": lambda: _save(Image.new("RGB", (10000, cfg.max_image_pixels // 10000),
                                                              (90, 60, 50)), "JPEG", quality=90, subsampling=0),
        "JPEG baseline CMYK, too thin to reduce": lambda: _save(Image.new("CMYK", (thin, whole // thin),
                                                                          (10, 20, 30, 40)), "JPEG", quality=90),
        "JPEG progressive CMYK, too thin to reduce": lambda: _save(
            Image.new("CMYK", (thin, buffered // thin), (10, 20, 30, 40)), "JPEG", quality=90, progressive=True),
    }
    if heif:
        def heic() -> bytes:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            return _save(Image.new("RGBA", (side, side), (90, 60, 50, 128)), "HEIF", quality=10,
                         enc_params={"preset": "ultrafast"})

        cases["HEIC RGBA"] = heic
    return cases

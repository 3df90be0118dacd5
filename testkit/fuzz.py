"""A seeded mutation fuzzer for the pipeline's decode + preprocess (the decoders are C libraries:
libjpeg-turbo, libpng, libwebp, libtiff, giflib). Property: every input gives either a 3 x S x S finite
tensor or the pipeline's own InputError, within TIME_LIMIT_S; anything else is a finding."""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from handler.pipeline import InputError, PipelineConfig, load_tensor
from testkit.imaging import encode, lesion_rgb, png_header_only

TIME_LIMIT_S = 2.0  # per input; a 24 MP photo decodes in ~0.3 s on this machine


def seeds() -> dict[str, bytes]:
    """One small image of each accepted format and mode."""
    rgb = lesion_rgb(96, 128, seed=5)
    im = Image.fromarray(rgb)
    return {
        "jpeg": encode(rgb, "JPEG"),
        "jpeg-progressive": encode(rgb, "JPEG", progressive=True),
        "png-rgb": encode(rgb, "PNG"),
        "png-rgba": encode(im.convert("RGBA"), "PNG"),
        "png-palette": encode(im.convert("P"), "PNG"),
        "png-gray16": encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
        "webp": encode(rgb, "WEBP", quality=80),
        "tiff": encode(rgb, "TIFF"),
        "tiff-deflate": encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "gif": encode(im.convert("P"), "GIF"),
        "bmp": encode(rgb, "BMP"),
        "heic": encode(rgb, "HEIF"),
        "png-huge-declared": png_header_only(60000, 60000),
    }


INTERESTING = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits: bit flips, byte overwrites (often in the header), truncation, chunk
    duplication or deletion, inserted junk, or a huge size written where headers keep dimensions."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not buf:
            break
        op = rng.randrange(8)
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            j = rng.randrange(min(64, len(buf)))  # header bytes
            buf[j] = rng.choice(INTERESTING)
        elif op == 2:
            buf[i] = rng.randrange(256)
        elif op == 3:
            del buf[rng.randrange(1, len(buf) + 1):]
        elif op == 4:
            n = rng.randint(1, 256)
            buf[i:i] = buf[i:i + n]
        elif op == 5:
            del buf[i:i + rng.randint(1, 256)]
        elif op == 6:
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            j = rng.randrange(min(32, max(1, len(buf) - 4)))
            buf[j:j + 4] = struct.pack(rng.choice([">I", "<I"]), rng.choice([0, 1, 65535, 2**31 - 1, 2**32 - 1]))
    return bytes(buf)


@dataclass
class FuzzReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[tuple[str, str, bytes]] = field(default_factory=list)  # (seed, problem, input)
    slowest_s: float = 0.0


def check(data: bytes, cfg: PipelineConfig) -> str:
    """'tensor', 'input_error:<status>', or raises AssertionError / the unexpected exception."""
    try:
        x = load_tensor(data, cfg)
    except InputError as e:
        return f"input_error:{e.status}"
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == (3, cfg.image_size, cfg.image_size), tuple(x.shape)
    assert bool(torch.isfinite(x).all()), "non-finite values"
    return "tensor"


def fuzz(n: int, seed: int = 0, cfg: PipelineConfig | None = None,
         on_input: Callable[[str, bytes], None] | None = None) -> FuzzReport:
    cfg = cfg or PipelineConfig()
    rng = random.Random(seed)
    corpus = seeds()
    report = FuzzReport()
    names = sorted(corpus)
    for k in range(n):
        name = names[k % len(names)]
        data = mutate(corpus[name], rng)
        if on_input is not None:
            on_input(name, data)
        t0 = time.perf_counter()
        try:
            report.outcomes[check(data, cfg)] += 1
        except Exception as e:  # a finding: keep the input
            report.findings.append((name, f"{type(e).__name__}: {e}"[:300], data))
            report.outcomes["finding"] += 1
        elapsed = time.perf_counter() - t0
        report.slowest_s = max(report.slowest_s, elapsed)
        if elapsed > TIME_LIMIT_S:
            report.findings.append((name, f"took {elapsed:.2f} s (> {TIME_LIMIT_S} s)", data))
    return report

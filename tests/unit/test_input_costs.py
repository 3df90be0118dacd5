"""What an accepted input may cost (issue #40), without a server: the decode limits, the structure checks that run
before Pillow parses a file, the JSON and KServe-envelope limits, and that none of it changes a single pixel of
what an 8-bit image decodes to (the training transform's input)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import handler.pipeline as pipeline
from handler import containers
from handler.pipeline import InputError, PipelineConfig, decode_image, preprocess
from handler.request import MAX_INSTANCES, MAX_JSON_PUNCTUATION, Refused, envelope_instances, parse_json, request_bytes
from testkit.imaging import encode, lesion_rgb, png_header_only
from testkit.worst import png_raw

FULL = PipelineConfig(reduced_decode=False)


def reference_decode(data: bytes) -> np.ndarray:
    """What the pipeline decoded before issue #40 (Pillow's whole-image conversions, float64 for 16-bit), written
    out: the decode must stay equal to it pixel for pixel."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.clip(np.rint(np.asarray(im).astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        gray = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def with_orientation(im: Image.Image, fmt: str, orientation: int, **kw: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **kw)


def modes() -> dict[str, Image.Image]:
    rgb = lesion_rgb(70, 90, seed=40)
    im = Image.fromarray(rgb)
    alpha = Image.fromarray(np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8))
    return {"RGB": im, "RGBA": Image.merge("RGBA", (*im.split(), alpha)), "L": im.convert("L"),
            "LA": Image.merge("LA", (im.convert("L"), alpha)), "P": im.convert("P"), "1": im.convert("1"),
            "CMYK": im.convert("CMYK")}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK"])
def test_strip_conversion_and_orientation_equal_pillows_whole_image(mode: str, orientation: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted a few rows at a time (strips of 1 KiB here, so every image spans many) and turned with numpy,
    every mode and EXIF orientation decodes to exactly what Pillow's exif_transpose + convert("RGB") gave."""
    monkeypatch.setattr(pipeline, "STRIP_BYTES", 1024)
    im = modes()[mode]
    fmt = "JPEG" if mode == "CMYK" else "PNG"  # the CMYK photos users send are JPEGs
    data = with_orientation(im, fmt, orientation)
    got = decode_image(data, FULL)
    np.testing.assert_array_equal(got, reference_decode(data))
    assert np.array_equal(preprocess(got, FULL).numpy(), preprocess(reference_decode(data), FULL).numpy())


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_reduced_jpeg_decode_is_unchanged(orientation: int) -> None:
    """The JPEG path (DCT-scaled draft, then the turn) gives what Pillow's draft + exif_transpose gave."""
    data = with_orientation(Image.fromarray(lesion_rgb(700, 900, seed=41)), "JPEG", orientation)
    cfg = PipelineConfig()
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (2 * cfg.image_size,) * 2)
    np.testing.assert_array_equal(decode_image(data, cfg), np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


def test_16_bit_gray_is_round_v_over_257_for_every_value() -> None:
    """16-bit grayscale keeps its documented result, round(v / 257), now computed in integers: checked on all
    65,536 values, against the float64 formula it replaces."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = decode_image(encode(Image.fromarray(values), "PNG"), FULL)[..., 0]
    np.testing.assert_array_equal(got, np.rint(values / 257.0).astype(np.uint8))
    assert got[0, 128] == 0 and got[0, 129] == 1  # 128/257 rounds down, 129/257 up: no ties to break


def test_32_bit_and_float_gray_keep_their_documented_results() -> None:
    """TIFF 32-bit integers scale like 16-bit and clip outside 0..65535; float grayscale rounds and clips."""
    ints = np.array([[-70000, -1, 0, 128, 129, 65535, 65663, 65664, 2**31 - 1]], np.int32)
    got = decode_image(encode(Image.fromarray(ints, "I"), "TIFF"), FULL)[..., 0]
    np.testing.assert_array_equal(got, np.clip(np.rint(ints / 257.0), 0, 255).astype(np.uint8))
    floats = np.array([[-3.0, 0.4, 0.5, 1.5, 254.5, 255.4, 1e9]], np.float32)
    got = decode_image(encode(Image.fromarray(floats, "F"), "TIFF"), FULL)[..., 0]
    np.testing.assert_array_equal(got, np.clip(np.rint(floats.astype(np.float64)), 0, 255).astype(np.uint8))


def test_decoded_pixel_limits_by_format() -> None:
    """Refused from the header (413), before a pixel is decoded: a format decoded whole above max_decoded_pixels;
    WebP above half of it and a progressive JPEG above 2/3 (their decoders hold more buffers: ~16 and ~12 bytes a
    pixel against ~8); a baseline JPEG by the size it decodes to at a reduced scale."""
    cfg = PipelineConfig(max_decoded_pixels=120_000)
    cases = [  # image, format, save options, accepted
        (Image.new("RGB", (346, 346)), "PNG", {}, True),  # 119,716
        (Image.new("RGB", (347, 347)), "PNG", {}, False),  # 120,409
        (Image.new("RGB", (347, 347)), "GIF", {}, False),
        (Image.new("RGB", (347, 347)), "TIFF", {}, False),
        (Image.new("RGB", (347, 347)), "BMP", {}, False),
        (Image.new("RGB", (244, 244)), "WEBP", {}, True),  # 59,536 <= 60,000
        (Image.new("RGB", (245, 245)), "WEBP", {}, False),
        (Image.new("RGB", (282, 282)), "JPEG", {"progressive": True}, True),  # 79,524 <= 80,000
        (Image.new("RGB", (283, 283)), "JPEG", {"progressive": True}, False),
        (Image.new("RGB", (1200, 1200)), "JPEG", {}, True),  # 1.44 MP, decoded at 1/4: 300 x 300
        (Image.new("RGB", (3000, 300)), "JPEG", {}, False),  # cannot be reduced (300 < 512): 900,000
    ]
    for im, fmt, kw, accepted in cases:
        data = encode(im, fmt, **kw)
        if accepted:
            assert decode_image(data, cfg).shape[2] == 3, (fmt, im.size)
        else:
            with pytest.raises(InputError) as e:
                decode_image(data, cfg)
            assert e.value.status == 413 and "megapixels" in str(e.value), (fmt, im.size, str(e.value))


def test_issue_png_is_refused_before_decoding() -> None:
    with pytest.raises(InputError) as e:
        decode_image(png_raw(7000, 7000, 16, 0), PipelineConfig())
    assert e.value.status == 413 and "decoded whole" in str(e.value)
    with pytest.raises(InputError) as e:  # the declared-size check still comes first
        decode_image(png_header_only(40000, 40000), PipelineConfig())
    assert e.value.status == 413 and "the limit is 50 megapixels" in str(e.value)


def test_jpeg_streams_tells_sequential_from_buffered() -> None:
    im = Image.fromarray(lesion_rgb(64, 64, seed=42))
    assert containers.jpeg_streams(encode(im, "JPEG"))
    assert containers.jpeg_streams(encode(im.convert("CMYK"), "JPEG"))
    assert not containers.jpeg_streams(encode(im, "JPEG", progressive=True))
    baseline = encode(im, "JPEG")
    sof = baseline.index(b"\xff\xc0")
    lossless = baseline[:sof] + b"\xff\xc3" + baseline[sof + 2:]  # the same frame marked lossless
    assert not containers.jpeg_streams(lossless)
    sos = baseline.index(b"\xff\xda")
    one_component = baseline[:sos + 4] + b"\x01" + baseline[sos + 5:]  # first scan: 1 of 3 components
    assert not containers.jpeg_streams(one_component)


def _jpeg_with_segments(n: int) -> bytes:
    data = encode(lesion_rgb(32, 32, seed=43), "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * n + data[2:]


def _png_with_chunks(n: int) -> bytes:
    data = encode(lesion_rgb(32, 32, seed=44), "PNG")
    empty = struct.pack(">I", 0) + b"abCD" + struct.pack(">I", zlib.crc32(b"abCD"))
    at = data.index(b"IDAT") - 4
    return data[:at] + empty * n + data[at:]


def _gif_with_blocks(n: int) -> bytes:
    data = encode(Image.new("P", (32, 32), 1), "GIF")
    at = data.index(b"\x2c", 13 + 3 * 2 ** ((data[10] & 7) + 1))
    return data[:at] + b"\x21\xfe" + b"\x01A" * n + b"\x00" + data[at:]


def _tiff_with_strips(n: int) -> bytes:
    entries = [(256, 4, 1, 1), (257, 4, 1, n), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, n, 0), (278, 4, 1, 1), (279, 4, n, 0)]
    table_at = 8 + 2 + 12 * len(entries) + 4
    offsets_at, counts_at = table_at, table_at + 4 * n
    pixels_at = counts_at + 4 * n
    fixed = {273: offsets_at, 279: counts_at}
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, fixed.get(tag, value)) for tag, kind, count, value in entries)
    return (b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + struct.pack(f"<{n}I", *[pixels_at] * n)
            + struct.pack(f"<{n}I", *[1] * n) + b"\x80")


def _bmp_rle(width: int, height: int) -> bytes:
    row = bytes([255, 7]) * (width // 255) + (bytes([width % 255, 7]) if width % 255 else b"") + b"\x00\x00"
    pixels = row * height + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
            + palette + pixels)


def _jpeg_with_scans(n: int) -> bytes:
    data = encode(lesion_rgb(32, 32, seed=45), "JPEG", progressive=True)
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * (n - data.count(b"\xff\xda")) + data[end:]


STRUCTURES = [  # name, file with `limit` parts, limit
    ("JPEG segments", _jpeg_with_segments, containers.MAX_JPEG_SEGMENTS - 16),  # + the file's own ~10
    ("JPEG scans", _jpeg_with_scans, containers.MAX_JPEG_SCANS),
    ("PNG chunks", _png_with_chunks, containers.MAX_PNG_CHUNKS - 8),  # + IHDR, IDAT, IEND
    ("GIF blocks", _gif_with_blocks, containers.MAX_GIF_BLOCKS - 2),
    ("TIFF strips", _tiff_with_strips, containers.MAX_TIFF_STRIPS),
]


@pytest.mark.parametrize("name,make,limit", STRUCTURES, ids=[s[0] for s in STRUCTURES])
def test_structures_beyond_any_real_files_are_refused_before_parsing(name: str, make, limit: int) -> None:
    """Pillow reads these parts in Python: 6 M empty JPEG comments took 9.2 s and 413 MiB, 3 M one-row TIFF
    strips 25 s and 1 GiB, before any pixel. A file with one part more than the limit is refused (413) by a
    bounded walk; at the limit it still decodes (the limits sit far above real files)."""
    assert decode_image(make(limit), FULL).shape[2] == 3
    with pytest.raises(InputError) as e:
        decode_image(make(limit + 8), FULL)
    assert e.value.status == 413 and "too costly to parse" in str(e.value), str(e.value)


def test_rle_bmp_is_limited_to_what_pillows_python_decoder_does_quickly() -> None:
    side = int(containers.MAX_BMP_RLE_PIXELS ** 0.5)
    assert decode_image(_bmp_rle(side, side), FULL).shape == (side, side, 3)
    with pytest.raises(InputError) as e:
        decode_image(_bmp_rle(side + 1, side + 1), FULL)
    assert e.value.status == 413 and "RLE" in str(e.value)


def test_json_bodies_are_parsed_only_when_small() -> None:
    """TorchServe's worker no longer parses JSON (TS_DECODE_INPUT_REQUEST=false in the handler): a body of empty
    objects is refused by counting its punctuation, before json.loads builds millions of objects."""
    jpeg = encode(lesion_rgb(seed=46))
    body = json.dumps({"image": base64.b64encode(jpeg).decode(), "overlay": True}).encode()
    assert request_bytes({"body": body}) == jpeg
    assert request_bytes({"body": bytearray(body)}) == jpeg
    assert request_bytes({"body": base64.b64encode(jpeg)}) == jpeg  # text/plain base64 now arrives as bytes
    assert request_bytes({"data": base64.b64encode(jpeg)}) == base64.b64encode(jpeg)  # a multipart field: as before
    bomb = b"[" + b"{}," * 10_000 + b"{}]"
    with pytest.raises(InputError) as e:
        request_bytes({"body": bomb})
    assert e.value.status == 413 and f"the limit is {MAX_JSON_PUNCTUATION}" in str(e.value)
    assert isinstance(parse_json(b"[" * 250 + b"]" * 250), list)  # nesting within the limit parses
    with pytest.raises(InputError) as e:
        request_bytes({"body": b"[1, 2]"})
    assert e.value.status == 400 and "must be an object" in str(e.value)


def test_kserve_envelope_instances_are_limited() -> None:
    instance = {"data": base64.b64encode(encode(lesion_rgb(32, 32, seed=47))).decode()}
    ok = envelope_instances(json.dumps({"instances": [instance] * MAX_INSTANCES}).encode())
    assert len(ok) == MAX_INSTANCES and ok[0] == instance
    (over,) = envelope_instances(json.dumps({"instances": [instance] * (MAX_INSTANCES + 1)}).encode())
    assert isinstance(over, Refused) and over.error.status == 413 and "instances" in str(over.error)
    (bomb,) = envelope_instances(b'{"instances": [' + b"{}," * 10_000 + b"{}]}")
    assert isinstance(bomb, Refused) and bomb.error.status == 413
    (bad,) = envelope_instances(b'{"inputs": []}')
    assert isinstance(bad, Refused) and bad.error.status == 400 and '"instances"' in str(bad.error)

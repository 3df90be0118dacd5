"""What an image file's structure costs to parse, checked before Pillow parses it.

Pillow reads some containers in Python loops over their parts: a JPEG's segments, a PNG's chunks, a GIF's
extension blocks, a TIFF's strips (one tile record each), a BMP's RLE runs. A body of 26 MiB of tiny parts
cost seconds of CPU and hundreds of MiB before a single pixel was decoded (measured: 6 M empty JPEG comment
segments 9.2 s and 413 MiB; 2 M empty PNG chunks 8.3 s; 3 M one-row TIFF strips 25 s and 1 GiB; RLE8 BMP runs
of one pixel, 5.4 s). Real files have a few dozen parts; these walks count them with a bounded loop (and C
searches) and refuse a file with more than any real one needs. No TorchServe import.
"""

from __future__ import annotations

import struct

# Far above what real files carry (counted on camera, phone, scanner and web files: JPEG < 50 segments before
# the first scan and <= 12 scans; PNG a few dozen chunks, 8 KiB IDAT chunks at most ~3,300 in a 26 MiB file;
# TIFF one strip per row of a 6000-row photo), far below the seconds the attacks above cost.
MAX_JPEG_SEGMENTS = 1024  # markers before the first scan (Pillow reads each in Python)
MAX_JPEG_SCANS = 32  # progressive scans: libjpeg visits every block of the image in each
MAX_PNG_CHUNKS = 65_536  # Pillow reads each chunk (IDAT included) in Python
MAX_GIF_BLOCKS = 65_536  # extension sub-blocks before the first image, read in Python
MAX_TIFF_ENTRIES = 4096  # tags in the first directory
MAX_TIFF_STRIPS = 16_384  # strips or tiles: Pillow makes a tile record for each
MAX_BMP_RLE_PIXELS = 2_000_000  # Pillow decodes RLE4/RLE8 in Python, ~0.45 us a run


class StructureError(ValueError):
    """The file has more parts than any real image; `status` 413, as for too many pixels."""

    status = 413


def check_structure(data: bytes | bytearray | memoryview) -> None:
    """Raise StructureError when a file's parts would cost more to parse than any real image's do. Files it
    cannot read are left to the decoder, which says what is wrong with them."""
    view = memoryview(data)
    head = bytes(view[:16])
    if head.startswith(b"\xff\xd8"):
        _jpeg(view, data if isinstance(data, (bytes, bytearray)) else bytes(view))
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        _png(view)
    elif head.startswith((b"GIF87a", b"GIF89a")):
        _gif(view)
    elif head.startswith((b"II", b"MM")):
        _tiff(view)
    elif head.startswith(b"BM"):
        _bmp(view)


def _jpeg(view: memoryview, raw: bytes | bytearray) -> None:
    i, n = 2, len(view)
    for _ in range(MAX_JPEG_SEGMENTS):
        if i + 4 > n or view[i] != 0xFF:
            break
        marker = view[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, TEM, RSTn, SOI: no length
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:  # first scan: the rest is entropy-coded data and libjpeg's (C) business
            break
        i += 2 + int.from_bytes(view[i + 2:i + 4], "big")
    else:
        raise StructureError(f"JPEG with more than {MAX_JPEG_SEGMENTS} segments before its image data")
    # 0xFF 0xDA cannot occur inside entropy-coded data (0xFF is stuffed there), so this counts the scans (and
    # those of an embedded thumbnail or an MPO's second image: a few more, well within the limit).
    scans = raw.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise StructureError(f"JPEG with {scans} scans (the limit is {MAX_JPEG_SCANS})")


def jpeg_streams(data: bytes | bytearray | memoryview, max_segments: int = MAX_JPEG_SEGMENTS) -> bool:
    """Whether libjpeg decodes this JPEG row by row at a reduced scale: sequential Huffman or arithmetic DCT
    (SOF0, SOF1, SOF9) whose first scan holds every component. Otherwise (progressive, lossless, hierarchical,
    or components in separate scans) it keeps the coefficients of the whole image, ~2 bytes per sample at
    full resolution whatever the scale. Reads the markers up to the first scan; anything unexpected: False."""
    view = memoryview(data)
    i, n, sof, components = 2, len(view), None, None
    for _ in range(max_segments):
        if i + 4 > n or view[i] != 0xFF:
            return False
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            i += 2
            continue
        length = int.from_bytes(view[i + 2:i + 4], "big")
        segment = view[i + 4:i + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            sof, components = marker, segment[5] if len(segment) > 5 else None
        elif marker == 0xDA:  # the first start of scan
            return sof in (0xC0, 0xC1, 0xC9) and components is not None and len(segment) > 0 \
                and segment[0] == components
        i += 2 + length
    return False


def _png(view: memoryview) -> None:
    i, n = 8, len(view)
    for _ in range(MAX_PNG_CHUNKS):
        if i + 8 > n:
            return
        length = int.from_bytes(view[i:i + 4], "big")
        if bytes(view[i + 4:i + 8]) == b"IEND":
            return
        i += 12 + length
    raise StructureError(f"PNG with more than {MAX_PNG_CHUNKS} chunks")


def _gif(view: memoryview) -> None:
    n = len(view)
    if n < 13:
        return
    flags = view[10]
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while i < n and view[i] == 0x21:  # extensions before the first image descriptor (0x2C)
        i += 2
        while i < n:
            size = view[i]
            i += 1 + size
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise StructureError(f"GIF with more than {MAX_GIF_BLOCKS} blocks before its first image")
            if size == 0:
                break


# TIFF tags whose counts are the number of strips or tiles
_STRIP_TAGS = {273, 279, 324, 325}


def _tiff(view: memoryview) -> None:
    head = bytes(view[:16])
    order = "<" if head.startswith(b"II") else ">"
    if len(head) < 8:
        return
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic == 42:  # classic TIFF: 2-byte entry count, 12-byte entries, 4-byte counts
        offset = struct.unpack(order + "I", head[4:8])[0]
        count_fmt, entry_size, count_at, value_fmt = "H", 12, 4, "I"
    elif magic == 43 and len(head) >= 16:  # BigTIFF: 8-byte entry count, 20-byte entries, 8-byte counts
        offset = struct.unpack(order + "Q", head[8:16])[0]
        count_fmt, entry_size, count_at, value_fmt = "Q", 20, 4, "Q"
    else:
        return
    width = struct.calcsize(count_fmt)
    if offset + width > len(view):
        return
    entries = struct.unpack(order + count_fmt, view[offset:offset + width])[0]
    if entries > MAX_TIFF_ENTRIES:
        raise StructureError(f"TIFF with {entries} tags in its first directory (the limit is {MAX_TIFF_ENTRIES})")
    value_size = struct.calcsize(value_fmt)
    for k in range(entries):
        at = offset + width + k * entry_size
        if at + count_at + value_size > len(view):
            return
        tag = struct.unpack(order + "H", view[at:at + 2])[0]
        if tag in _STRIP_TAGS:
            count = struct.unpack(order + value_fmt, view[at + count_at:at + count_at + value_size])[0]
            if count > MAX_TIFF_STRIPS:
                raise StructureError(f"TIFF with {count} strips or tiles (the limit is {MAX_TIFF_STRIPS})")


def _bmp(view: memoryview) -> None:
    if len(view) < 34:
        return
    header = int.from_bytes(view[14:18], "little")
    if header < 40:  # OS/2 1.x headers have no compression field
        return
    width, height = struct.unpack("<ii", view[18:26])
    compression = int.from_bytes(view[30:34], "little")
    if compression in (1, 2) and abs(width) * abs(height) > MAX_BMP_RLE_PIXELS:
        raise StructureError(f"RLE-compressed BMP of {abs(width)}x{abs(height)}: Pillow decodes RLE slowly, and "
                             f"the limit for it is {MAX_BMP_RLE_PIXELS / 1e6:.0f} megapixels (send a PNG)")

"""The one scoring pipeline: bytes -> RGB -> preprocess -> TTA -> probability.

Everything that scores an image (the TorchServe handler, the export check, the client's offline
mode, the evaluation tool, the bench and the tests) goes through this module, so that training,
serving and offline scores cannot drift apart. It must not import TorchServe.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, NamedTuple

# albumentations checks PyPI for updates at import unless told not to: never touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from pillow_heif import register_heif_opener  # noqa: E402

from handler.containers import StructureError, check_structure, jpeg_streams  # noqa: E402

# HEIC/HEIF (what phones save) through libheif. pillow-heif applies the container's rotation and mirror and
# resets the EXIF orientation to 1, so exif_transpose below never turns a HEIC photo twice.
register_heif_opener()

# The model's input side in pixels when nothing says otherwise (the seed's): the one place it is written. A network
# trained at another size records it in its checkpoint (train/), and the archive is built from that record.
IMAGE_SIZE = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TTA_CHOICES = (1, 2, 4, 8)
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "lanczos4": cv2.INTER_LANCZOS4}
# Formats Pillow decodes without external delegates, and HEIF (pillow-heif). MPO is what many phone cameras
# write as JPEG.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF"})
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF or HEIC"
# How each allowed format's bytes begin (MPO is a JPEG): what base64 text must decode to before it is taken for an
# image rather than text (handler/request.py). HEIF is an ISO base media file: a box size, "ftyp", then a brand.
SIGNATURES = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG",), "GIF": (b"GIF8",), "WEBP": (b"RIFF",), "BMP": (b"BM",),
              "TIFF": (b"II*\x00", b"MM\x00*")}
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})


def sniff_format(head: bytes) -> str | None:
    """The allowed format `head` (an image's first bytes) starts like, or None."""
    fmt = next((f for f, prefixes in SIGNATURES.items() if head.startswith(prefixes)), None)
    if fmt is None and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        fmt = "HEIF"
    return fmt
# The fields that decide the pixels the network sees (decode, resize, normalise): a network must be served with the
# values it was trained with. The others (TTA views, threshold, temperature, the size limit) are serving choices.
PREPROCESSING = ("image_size", "mean", "std", "max_pixel_value", "reduced_decode", "interpolation",
                 "area_for_downscale")


class InputError(ValueError):
    """A request that cannot be scored; `status` is the HTTP code the caller should answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PipelineConfig:
    """The preprocessing and decision contract. Travels in the .mar's model-config.yaml `handler:`."""

    image_size: int = IMAGE_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixel_value: float = 255.0
    tta_views: int = 8
    threshold: float = 0.5
    # Larger images are refused before decoding (decompression bombs); 50 MP covers phone photos.
    max_image_pixels: int = 50_000_000
    # Pixels decoded at full resolution: every format but JPEG, a JPEG that libjpeg must buffer whole
    # (progressive, lossless, or a first scan without every component: its coefficients for the whole image),
    # and a JPEG's reduced-scale size. Decoding costs ~8 bytes per such pixel at its peak (the decoder's image,
    # then our uint8 RGB), so 24 MP (6000 x 4000) keeps the worst accepted input of every format under
    # 250 MiB of worker memory and 2 s of CPU (docs/SECURITY.md, "Image decoders", has the table).
    max_decoded_pixels: int = 24_000_000
    # Decode JPEGs at a reduced DCT scale that keeps the shorter side >= 2x image_size.
    reduced_decode: bool = True
    # The resize training used: OpenCV `interpolation`, and INTER_AREA whenever the image shrinks
    # (albumentations' area_for_downscale="image"). Part of the contract, so a checkpoint trained with
    # another resize says so in its archive instead of being served through this one.
    interpolation: str = "linear"
    area_for_downscale: bool = True
    # Temperature scaling fitted at build time on the user's labelled validation set (exporter/calibration.py):
    # probability = sigmoid(logit(raw TTA score) / temperature). 1.0: uncalibrated, the probability is the raw score.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.tta_views not in TTA_CHOICES:
            raise ValueError(f"tta_views must be one of {TTA_CHOICES}, got {self.tta_views}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.image_size < 16 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("image_size must be >= 16 and mean/std must have 3 values")
        if any(s <= 0 for s in self.std) or self.max_pixel_value <= 0 or min(self.max_image_pixels,
                                                                            self.max_decoded_pixels) <= 0:
            raise ValueError("std, max_pixel_value, max_image_pixels and max_decoded_pixels must be positive")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], ignore: Sequence[str] = ()) -> PipelineConfig:
        """Build from a YAML section; unknown keys are an error so a typo cannot go unnoticed."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known - set(ignore)
        if unknown:
            raise ValueError(f"unknown pipeline setting(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_mapping(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def preprocessing(self) -> dict[str, Any]:
        """The PREPROCESSING fields, as to_mapping writes them."""
        d = self.to_mapping()
        return {k: d[k] for k in PREPROCESSING}


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


def decode_image(data: bytes | bytearray | memoryview, cfg: PipelineConfig) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, EXIF orientation applied."""
    return decode(data, cfg)[0]


def decode(data: bytes | bytearray | memoryview, cfg: PipelineConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """decode_image, and the photo's (width, height) as sent, EXIF orientation applied: a JPEG may be decoded
    at a reduced scale, and the input checks judge the resolution of the photo, not of its decoding.

    What a decode may cost is decided from the header, before any pixel is decoded: at most max_image_pixels
    declared, and at most max_decoded_pixels decoded at full resolution (413 otherwise). The pixels are then
    converted to uint8 RGB in strips, never as a full-size float or 16-bit copy."""
    if not data:
        raise InputError(f"empty request body: send the image bytes ({FORMAT_NAMES})")
    try:
        check_structure(data)
    except StructureError as e:
        raise InputError(f"image too costly to parse: {e}", e.status) from None
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(f"not an image: the body is not {FORMAT_NAMES} data", 415) from None
    except Image.DecompressionBombError as e:
        limit = f"the limit is {cfg.max_image_pixels / 1e6:.0f} megapixels"
        raise InputError(f"image too large ({e}); {limit}", 413) from None
    except Exception as e:  # Pillow raises many types on malformed headers
        raise InputError(f"unreadable image header: {e}") from None
    if im.format not in ALLOWED_FORMATS:
        raise InputError(f"unsupported image format {im.format}: send {FORMAT_NAMES}", 415)
    width, height = im.size
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    if width * height > cfg.max_image_pixels:
        raise InputError(
            f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"the limit is {cfg.max_image_pixels / 1e6:.0f} megapixels",
            413,
        )
    jpeg = im.format in ("JPEG", "MPO")
    streamed = jpeg and jpeg_streams(data)
    limit, how = decoded_pixel_limit(im.format, streamed, cfg)
    if not streamed and width * height > limit:
        raise InputError(
            f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels; {how}, and the limit "
            f"for that is {limit / 1e6:.3g} megapixels (a baseline JPEG may have {cfg.max_image_pixels / 1e6:.3g})",
            413,
        )
    drafted = cfg.reduced_decode and jpeg
    if drafted:
        # Pillow picks the largest 1/2, 1/4 or 1/8 scale keeping both sides >= the requested size.
        side = 2 * cfg.image_size
        im.draft("RGB", (side, side))
    if streamed and im.size[0] * im.size[1] > limit:  # too thin to be reduced enough, or reduced_decode off
        raise InputError(
            f"image too large: {width}x{height} decodes to {im.size[0] * im.size[1] / 1e6:.1f} megapixels at "
            f"its smallest scale; the limit for that is {limit / 1e6:.3g} megapixels",
            413,
        )
    try:
        im.load()
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
        if im.format == "WEBP":  # libwebp's canvases and the frame's bytes: full-size copies no longer needed
            im._decoder = None  # type: ignore[attr-defined]
            im.fp = None
        rgb = _to_rgb(im)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"corrupt or truncated image data ({im.format}): {e}") from None
    im.close()
    del im  # the decoder's full-size image goes before the turned copy is made
    rgb = orient(rgb, orientation)
    if not drafted:
        height, width = rgb.shape[:2]
    elif width != height and (rgb.shape[1] > rgb.shape[0]) != (width > height):
        width, height = height, width  # turned a quarter by its EXIF orientation
    return rgb, (width, height)


ORIENTATION_TAG = 0x0112
# EXIF orientation -> the numpy view that ImageOps.exif_transpose's Image.transpose gives, pixel for pixel.
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (Pillow turns counter-clockwise)
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}


def orient(rgb: np.ndarray, orientation: object) -> np.ndarray:
    """Apply an EXIF orientation to HxWx3 pixels exactly as ImageOps.exif_transpose does (other values: none)."""
    turn = _ORIENT.get(orientation) if isinstance(orientation, int) else None
    return rgb if turn is None else np.ascontiguousarray(turn(rgb))


# Peak bytes per decoded pixel, measured (docs/SECURITY.md, "Image decoders"): the decoder's image (Pillow keeps
# 4 bytes a pixel for every mode wider than one byte) and our uint8 RGB (3), ~8 for most decoders. Pillow's WebP
# also holds libwebp's two canvases and the frame's bytes (~16); a progressive or multi-scan JPEG holds every
# coefficient (up to 8 bytes a pixel for CMYK) beside its image (~12).
PEAK_BYTES_PER_PIXEL = {"default": 8, "WEBP": 16, "buffered JPEG": 12}


def decoded_pixel_limit(fmt: str | None, streamed_jpeg: bool, cfg: PipelineConfig) -> tuple[int, str]:
    """How many pixels a format may decode at full resolution, and why (for the 413 message): max_decoded_pixels
    for a decoder that peaks at ~8 bytes a pixel, proportionally fewer for the hungrier ones, so that every
    format's worst input costs the same. A JPEG that libjpeg streams is bounded by the size it decodes to
    (reduced), every other image by its own size."""
    if streamed_jpeg:
        kind, how = "default", "a JPEG decoded at a reduced scale"
    elif fmt in ("JPEG", "MPO"):
        kind, how = "buffered JPEG", "this JPEG (progressive, lossless or multi-scan) is buffered whole"
    elif fmt == "WEBP":
        kind, how = "WEBP", "a WebP image is decoded whole, in several buffers"
    else:
        kind, how = "default", f"a {fmt} image is decoded whole"
    return cfg.max_decoded_pixels * PEAK_BYTES_PER_PIXEL["default"] // PEAK_BYTES_PER_PIXEL[kind], how


STRIP_BYTES = 4 << 20  # converted a few MiB at a time: a strip's copies are small next to the image


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Every mode to 8-bit RGB, in horizontal strips written into one uint8 array: the decoder's image and
    the result are the only full-size buffers. Alpha is dropped, as cv2.imread(IMREAD_COLOR) does in training
    code. 16-bit and 32-bit integer grayscale scale their full range to 8 bits, round(v / 257) (Pillow's
    convert would clip at 255), in integers; float grayscale rounds and clips its values."""
    width, height = im.size
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, STRIP_BYTES // (4 * width))
    for top in range(0, height, rows):
        strip = im.crop((0, top, width, min(height, top + rows)))
        out[top:top + rows] = _strip_rgb(strip)
    return out


def _strip_rgb(im: Image.Image) -> np.ndarray:
    """One strip to uint8 RGB (or uint8 gray, broadcast over the channels by the caller)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # round(v / 257) without floats: 257 is odd, so v / 257 is never a tie and (v + 128) // 257 is exact.
        a = np.asarray(im).astype(np.int64)
        return np.clip((a + 128) // 257, 0, 255).astype(np.uint8)[:, :, None]
    if im.mode == "F":
        return np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)[:, :, None]
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


# ---------------------------------------------------------------------------------------------
# Preprocess
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _resize(cfg: PipelineConfig) -> A.Resize:
    return A.Resize(cfg.image_size, cfg.image_size, interpolation=INTERPOLATIONS[cfg.interpolation],
                    area_for_downscale="image" if cfg.area_for_downscale else None)


@lru_cache(maxsize=8)
def _normalize(cfg: PipelineConfig) -> A.Normalize:
    return A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=cfg.max_pixel_value)


def resize(rgb: np.ndarray, cfg: PipelineConfig) -> np.ndarray:
    """HxWx3 uint8 RGB -> SxSx3 uint8: the array training caches and augments (train/data.py)."""
    return _resize(cfg)(image=rgb)["image"]


def to_tensor(resized: np.ndarray, cfg: PipelineConfig) -> torch.Tensor:
    """SxSx3 uint8 -> 3xSxS float32, normalised."""
    out = _normalize(cfg)(image=resized)["image"]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32))


def preprocess(rgb: np.ndarray, cfg: PipelineConfig) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xSxS float32 tensor, exactly the training transform (resize, then normalise)."""
    return to_tensor(resize(rgb, cfg), cfg)


class Prepared(NamedTuple):
    tensor: torch.Tensor  # 3xSxS float32, what the model scores
    resized: np.ndarray  # SxSx3 uint8, what the input checks measure
    size: tuple[int, int]  # the photo's (width, height) as sent


def prepare(data: bytes | bytearray | memoryview, cfg: PipelineConfig) -> Prepared:
    """decode -> resize -> tensor, keeping what the input checks need (handler/checks.py)."""
    rgb, size = decode(data, cfg)
    small = resize(rgb, cfg)
    return Prepared(to_tensor(small, cfg), small, size)


def load_tensor(data: bytes | bytearray | memoryview, cfg: PipelineConfig) -> torch.Tensor:
    return prepare(data, cfg).tensor


# ---------------------------------------------------------------------------------------------
# TTA and probability
# ---------------------------------------------------------------------------------------------


def tta_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """N x C x H x W -> (views*N) x C x H x W, view-major, in the dihedral order:
    x, flip W, flip H, flip H+W, then the same four of x with H and W transposed."""
    if views not in TTA_CHOICES:
        raise ValueError(f"views must be one of {TTA_CHOICES}")
    out = [x, x.flip(3), x.flip(2), x.flip(2, 3)]
    if views == 8:
        t = x.transpose(2, 3)
        out += [t, t.flip(3), t.flip(2), t.flip(2, 3)]
    return torch.cat(out[:views], dim=0)


def calibrate(raw: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature scaling of the TTA score: sigmoid(logit(raw) / temperature), float64. Applied to the TTA mean
    rather than to each view, so that it is monotone in the raw score: the ranking (and any AUC measured on raw
    scores) is unchanged, and a raw threshold maps to exactly one calibrated threshold."""
    if temperature == 1.0:
        return raw
    return torch.sigmoid(torch.logit(raw.double()) / temperature)


def view_probabilities(logits: torch.Tensor, n: int, views: int, temperature: float = 1.0) -> torch.Tensor:
    """(views*N) x 1 logits -> N probabilities: mean over views of sigmoid, in float64, then calibrated."""
    if logits.shape != (views * n, 1):
        raise RuntimeError(f"model returned shape {tuple(logits.shape)}, expected ({views * n}, 1)")
    return calibrate(torch.sigmoid(logits.reshape(views, n).double()).mean(dim=0), temperature)


class Score(NamedTuple):
    probability: float  # what the archive serves: calibrated when it was built with --calibrate
    raw_score: float  # the uncalibrated TTA mean of sigmoid(logit); equal to probability when uncalibrated


Model = Callable[[torch.Tensor], torch.Tensor]  # N x 3 x S x S -> N x 1 logits (handler/archive.py loads it)


class Scorer:
    """Scores preprocessed tensors with a model that maps N x 3 x S x S to N x 1 malignancy logits."""

    def __init__(self, model: Model, cfg: PipelineConfig) -> None:
        self.model = model
        self.cfg = cfg

    def outputs(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray | None]:
        """(views*N) x 1 float32 logits, view-major, and N x D pooled features averaged over the views (float64;
        None for a model that returns logits only). All views of all images go through ONE forward pass; the
        features are that pass's own second output (exporter/export.py: LogitAndFeatures), so the logits, and
        with them the score, are the same whether or not anything reads the features."""
        n = len(tensors)
        batch = tta_views(torch.stack(list(tensors)), self.cfg.tta_views).contiguous()
        with torch.inference_mode():
            out = self.model(batch).float()
        if out.ndim != 2 or out.shape[0] != self.cfg.tta_views * n:
            raise RuntimeError(f"model returned shape {tuple(out.shape)}, expected ({self.cfg.tta_views * n}, 1 + D)")
        if out.shape[1] == 1:
            return out, None
        features = out[:, 1:].double().reshape(self.cfg.tta_views, n, -1).mean(dim=0).numpy()
        return out[:, :1].contiguous(), features

    def logits(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.outputs(tensors)[0]

    def score_and_features(self, tensors: Sequence[torch.Tensor]) -> tuple[list[Score], np.ndarray | None]:
        if not tensors:
            return [], None
        logits, features = self.outputs(tensors)
        raw = view_probabilities(logits, len(tensors), self.cfg.tta_views)
        calibrated = calibrate(raw, self.cfg.temperature)
        return [Score(p, r) for p, r in zip(calibrated.tolist(), raw.tolist(), strict=True)], features

    def score(self, tensors: Sequence[torch.Tensor]) -> list[Score]:
        return self.score_and_features(tensors)[0]

    def predict(self, tensors: Sequence[torch.Tensor]) -> list[float]:
        """The served probabilities (calibrated when the archive is)."""
        return [s.probability for s in self.score(tensors)]

    def score_bytes(self, data: bytes) -> Score:
        return self.score([load_tensor(data, self.cfg)])[0]

    def predict_bytes(self, data: bytes) -> float:
        return self.score_bytes(data).probability

    def warm_up(self, runs: int = 3) -> None:
        """The TorchScript profiling executor optimises over the first calls: pay that at start-up."""
        dummy = torch.zeros(3, self.cfg.image_size, self.cfg.image_size)
        for _ in range(runs):
            self.predict([dummy])

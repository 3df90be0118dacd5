"""The one scoring pipeline: bytes -> RGB -> preprocess -> TTA -> probability.

Everything that scores an image (the TorchServe handler, the export check, the client's offline
mode, the evaluation tool, the bench and the tests) goes through this module, so that training,
serving and offline scores cannot drift apart. It must not import TorchServe.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

# albumentations checks PyPI for updates at import unless told not to: never touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TTA_CHOICES = (1, 2, 4, 8)
# Formats Pillow decodes without external delegates. MPO is what many phone cameras write as JPEG.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
DEMO_WARNING = (
    "DEMO MODEL: untrained weights from a fixed seed. This score means nothing; "
    "build the archive from your own checkpoint (./build_mar.sh your.ckpt)."
)

# Names of the files inside the .mar (and the export folder) that this module reads.
MODEL_FILE = "model.pt"
BF16_MODEL_FILE = "model.pt2"  # AOTInductor package (exporter/export.py: export_bf16)
MODEL_CONFIG_FILE = "model-config.yaml"
METADATA_FILE = "metadata.json"
EXPLAIN_FILE = "explain.pt"  # Grad-CAM parts (handler/explain.py); absent in --no-explain archives


class InputError(ValueError):
    """A request that cannot be scored; `status` is the HTTP code the caller should answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PipelineConfig:
    """The preprocessing and decision contract. Travels in the .mar's model-config.yaml `handler:`."""

    image_size: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixel_value: float = 255.0
    tta_views: int = 8
    threshold: float = 0.5
    # Larger images are refused before decoding (decompression bombs); 50 MP covers phone photos.
    max_image_pixels: int = 50_000_000
    # Decode JPEGs at a reduced DCT scale that keeps the shorter side >= 2x image_size.
    reduced_decode: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.tta_views not in TTA_CHOICES:
            raise ValueError(f"tta_views must be one of {TTA_CHOICES}, got {self.tta_views}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.image_size < 16 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("image_size must be >= 16 and mean/std must have 3 values")
        if any(s <= 0 for s in self.std) or self.max_pixel_value <= 0 or self.max_image_pixels <= 0:
            raise ValueError("std, max_pixel_value and max_image_pixels must be positive")

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


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


def decode_image(data: bytes | bytearray | memoryview, cfg: PipelineConfig) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, EXIF orientation applied."""
    if not data:
        raise InputError("empty request body: send the image bytes (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(
            "not an image: the body is not JPEG, PNG, WebP, BMP, GIF or TIFF data", 415
        ) from None
    except Image.DecompressionBombError as e:
        limit = f"the limit is {cfg.max_image_pixels / 1e6:.0f} megapixels"
        raise InputError(f"image too large ({e}); {limit}", 413) from None
    except Exception as e:  # Pillow raises many types on malformed headers
        raise InputError(f"unreadable image header: {e}") from None
    if im.format not in ALLOWED_FORMATS:
        raise InputError(f"unsupported image format {im.format}: send JPEG, PNG, WebP, BMP, GIF or TIFF", 415)
    width, height = im.size
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    if width * height > cfg.max_image_pixels:
        raise InputError(
            f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"the limit is {cfg.max_image_pixels / 1e6:.0f} megapixels",
            413,
        )
    if cfg.reduced_decode and im.format in ("JPEG", "MPO"):
        # Pillow picks the largest 1/2, 1/4 or 1/8 scale keeping both sides >= the requested size.
        side = 2 * cfg.image_size
        im.draft("RGB", (side, side))
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"corrupt or truncated image data ({im.format}): {e}") from None
    return rgb


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Every mode to 8-bit RGB. Alpha is dropped, as cv2.imread(IMREAD_COLOR) does in training code."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: scale the full range to 8 bits (Pillow's convert would clip at 255).
        a = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if im.mode == "F":
        gray = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


# ---------------------------------------------------------------------------------------------
# Preprocess
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _resize(cfg: PipelineConfig) -> A.Resize:
    return A.Resize(cfg.image_size, cfg.image_size, area_for_downscale="image")


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


def load_tensor(data: bytes | bytearray | memoryview, cfg: PipelineConfig) -> torch.Tensor:
    return preprocess(decode_image(data, cfg), cfg)


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


def view_probabilities(logits: torch.Tensor, n: int, views: int) -> torch.Tensor:
    """(views*N) x 1 logits -> N probabilities: mean over views of sigmoid, in float64."""
    if logits.shape != (views * n, 1):
        raise RuntimeError(f"model returned shape {tuple(logits.shape)}, expected ({views * n}, 1)")
    return torch.sigmoid(logits.reshape(views, n).double()).mean(dim=0)


Model = Callable[[torch.Tensor], torch.Tensor]


def load_model(source: bytes | str | os.PathLike[str], precision: str = "fp32") -> Model:
    """Load the archive's model and optimise it for this CPU.

    fp32: frozen TorchScript. optimize_for_inference (oneDNN prepacked convolutions, conv-BN folding)
    measured ~15-25 % faster than the frozen module here, but its result cannot be saved and reloaded, so
    it runs at load time. bf16: an AOTInductor package, compiled at build time (check_runtime says whether
    this machine can run it). The build verifies exactly this load path against the eager model.
    """
    if precision == "bf16":
        return _load_aoti(source)
    # From a path when there is one: reading the file into bytes first would hold a second copy
    # of the weights (~115 MB) in the worker for as long as the allocator keeps it.
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    model = torch.jit.load(f, map_location="cpu").eval()
    try:
        return torch.jit.optimize_for_inference(model)
    except Exception as e:  # pragma: no cover - depends on the CPU/oneDNN build
        warnings.warn(f"optimize_for_inference failed ({e}); serving the frozen model", stacklevel=2)
        return model


def _load_aoti(source: bytes | str | os.PathLike[str]) -> Model:
    """An AOTInductor package, loaded the way torch._inductor.aoti_load_package does once past its device
    check: that check compiles test programs with g++ in the serving process (and only warns). check_runtime
    has already matched this CPU's flags to the package's, without a compiler."""
    import tempfile

    from torch.export.pt2_archive._package import AOTICompiledModel

    def load(path: str) -> Model:
        # Extracts the package's shared library to a temporary folder, maps it, removes the folder when freed.
        return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1))

    if isinstance(source, (bytes, bytearray)):
        with tempfile.NamedTemporaryFile(suffix=".pt2") as f:
            f.write(source)
            f.flush()
            return load(f.name)
    return load(str(source))


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): after loading and optimising the
    model this takes the worker from ~590 to ~420 MiB RSS, which decides whether a t2.micro fits."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Scorer:
    """Scores preprocessed tensors with a model that maps N x 3 x S x S to N x 1 malignancy logits."""

    def __init__(self, model: Model, cfg: PipelineConfig) -> None:
        self.model = model
        self.cfg = cfg

    def predict(self, tensors: Sequence[torch.Tensor]) -> list[float]:
        """All views of all images go through ONE forward pass."""
        if not tensors:
            return []
        x = torch.stack(list(tensors))
        batch = tta_views(x, self.cfg.tta_views).contiguous()
        with torch.inference_mode():
            logits = self.model(batch)
        return view_probabilities(logits.float(), len(tensors), self.cfg.tta_views).tolist()

    def predict_bytes(self, data: bytes) -> float:
        return self.predict([load_tensor(data, self.cfg)])[0]

    def warm_up(self, runs: int = 3) -> None:
        """The TorchScript profiling executor optimises over the first calls: pay that at start-up."""
        dummy = torch.zeros(3, self.cfg.image_size, self.cfg.image_size)
        for _ in range(runs):
            self.predict([dummy])


def result(probability: float, cfg: PipelineConfig, model_info: Mapping[str, Any]) -> dict[str, Any]:
    """The response schema shared by the handler and the client's offline mode."""
    out: dict[str, Any] = {
        "probability": probability,
        "label": "malignant" if probability >= cfg.threshold else "benign",
        "threshold": cfg.threshold,
        "tta_views": cfg.tta_views,
        "model": {
            "name": model_info.get("name", "melanoma"),
            "version": model_info.get("version", ""),
            "weights_sha256": model_info.get("weights_sha256", ""),
            "demo": bool(model_info.get("demo", False)),
            "precision": precision_of(model_info),
        },
    }
    if out["model"]["demo"]:
        out["warning"] = DEMO_WARNING
    return out


# ---------------------------------------------------------------------------------------------
# Archives: the exported model folder, or the .mar that packs it
# ---------------------------------------------------------------------------------------------


RUNTIME_KEYS = ("threads",)  # handler settings that are not part of the scoring contract


def read_model_config(text: str) -> tuple[PipelineConfig, dict[str, Any]]:
    """Parse model-config.yaml; return the pipeline contract and the handler section."""
    doc = yaml.safe_load(text) or {}
    section = doc.get("handler") or {}
    return PipelineConfig.from_mapping(section, ignore=RUNTIME_KEYS), dict(section)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class LoadedArchive:
    scorer: Scorer
    cfg: PipelineConfig
    metadata: dict[str, Any]
    threads: int
    source: Path

    def score(self, data: bytes) -> dict[str, Any]:
        return result(self.scorer.predict_bytes(data), self.cfg, self.metadata)

    def has_member(self, name: str) -> bool:
        if self.source.is_dir():
            return (self.source / name).is_file()
        with zipfile.ZipFile(self.source) as z:
            return name in z.namelist()

    def read_member(self, name: str) -> bytes:
        """A file of the archive, read when needed (explain.pt is only loaded on a first explanation)."""
        if self.source.is_dir():
            return (self.source / name).read_bytes()
        with zipfile.ZipFile(self.source) as z:
            return z.read(name)


def load_archive(path: str | os.PathLike[str], threads: int | None = None,
                 model_file: str | None = None) -> LoadedArchive:
    """Load a .mar (zip) or an unpacked archive folder (what TorchServe hands the handler).

    Torch threads: `threads`, else the archive's `threads` setting, else every CPU this process may use;
    the server and the offline tools thus run the same way. The model file is `model_file`, else the
    one the metadata names (model.pt for fp32, model.pt2 for bf16).
    """
    p = Path(path)
    if p.is_dir():
        read = lambda name: (p / name).read_bytes()  # noqa: E731
    elif zipfile.is_zipfile(p):
        read = zipfile.ZipFile(p).read
    else:
        raise FileNotFoundError(f"{p}: not a .mar archive or archive folder")
    cfg, section = read_model_config(read(MODEL_CONFIG_FILE).decode())
    metadata = json.loads(read(METADATA_FILE))
    check_runtime(metadata)
    model_file = model_file or str(metadata.get("model_file") or MODEL_FILE)
    model_source: bytes | Path = p / model_file if p.is_dir() else read(model_file)
    threads = threads or int(section.get("threads") or 0) or usable_cpus()
    torch.set_num_threads(threads)
    model = load_model(model_source, precision_of(metadata))
    return LoadedArchive(Scorer(model, cfg), cfg, metadata, threads, p)


def precision_of(metadata: Mapping[str, Any]) -> str:
    return str((metadata.get("precision") or {}).get("name", "fp32"))


# CPU features without which a precision runs slower than fp32 (oneDNN emulates bf16 otherwise).
PRECISION_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16")}


def precision_warning(precision: str, cpuinfo: str | None = None) -> str | None:
    """A warning when this CPU lacks the instructions that make `precision` fast, else None."""
    flags_needed = PRECISION_CPU_FLAGS.get(precision)
    if not flags_needed:
        return None
    flags = cpu_flags(cpuinfo)
    if not flags:
        return f"cannot read /proc/cpuinfo to check that this CPU runs {precision} at speed"
    if flags & set(flags_needed):
        return None
    return (f"this archive is {precision}, but this CPU has none of {', '.join(flags_needed)}: {precision} is "
            f"emulated and slower than fp32 here; build the archive with --precision fp32 for this machine")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return set(next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []))


def check_runtime(metadata: Mapping[str, Any], cpuinfo: str | None = None) -> None:
    """Refuse, with what to do, an archive whose compiled model this machine cannot run: an AOTInductor
    package is native code for one torch version and one CPU vector ISA, and running it elsewhere would
    crash the worker (illegal instruction) or fail deep inside torch."""
    precision = metadata.get("precision") or {}
    if precision.get("name", "fp32") == "fp32":
        return
    if precision.get("format") != "aotinductor":
        raise RuntimeError(f"this {precision.get('name')} archive was built by an earlier version in a format "
                           "no longer served; rebuild it with ./build_mar.sh --precision bf16")
    rebuild = "rebuild it on this machine (./build_mar.sh --precision bf16 ...) or use an fp32 archive"
    built_with = str(precision.get("torch", ""))
    if built_with != torch.__version__:
        raise RuntimeError(f"this bf16 archive was compiled for torch {built_with}, this is torch "
                           f"{torch.__version__}: {rebuild}")
    have = cpu_flags(cpuinfo)
    missing = [f for f in precision.get("cpu_flags", []) if f not in have] if have else []
    if missing:
        raise RuntimeError(f"this bf16 archive was compiled for CPUs with {', '.join(precision['cpu_flags'])}; "
                           f"this CPU lacks {', '.join(missing)}: {rebuild}")

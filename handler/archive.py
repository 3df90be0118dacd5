"""An archive (.mar, or the folder TorchServe unpacks it to): its files, its typed metadata, the model
loaded for this CPU, and the response schema. handler/pipeline.py stays decode -> preprocess -> TTA ->
probability; this module is everything around it that an archive decides. No TorchServe import.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from handler.checks import OOD_FILE, OOD_METHOD, OodModel, QualityLimits, run_checks
from handler.pipeline import Model, PipelineConfig, Score, Scorer, prepare

DEMO_WARNING = (
    "DEMO MODEL: untrained weights from a fixed seed. This score means nothing; "
    "build the archive from your own checkpoint (./build_mar.sh your.ckpt)."
)

# Names of the files inside the .mar (and the export folder) that this module reads.
MODEL_FILE = "model.pt"
COMPILED_MODEL_FILE = "model.pt2"  # AOTInductor package, bf16 or int8 (exporter/export.py: export_compiled)
ONNX_MODEL_FILE = "model.onnx"  # --runtime openvino (exporter/export.py: export_openvino)
MODEL_CONFIG_FILE = "model-config.yaml"
METADATA_FILE = "metadata.json"
EXPLAIN_FILE = "explain.pt"  # the model split at one stage (handler/explain.py); absent in --no-explain archives
# How handler/explain.py turns activations and gradients into a map. LayerCAM (Jiang et al., IEEE TIP 2021)
# weighs each activation by its own positive gradient; Grad-CAM by the channel's mean gradient. At layer3
# Grad-CAM's map was all-negative (no heatmap) for half of the lesions trained networks scored malignant
# (docs/EXPLANATIONS.md). Archives built before LayerCAM say "grad-cam" and keep it.
EXPLAIN_METHODS = ("layer-cam", "grad-cam")
EXPLAIN_METHOD = "layer-cam"

METADATA_SCHEMA = 1  # bump when metadata.json's keys or their meaning change; readers refuse other schemas
PRECISIONS = ("fp32", "bf16", "int8")
# What runs the model, by precision: precision["format"] in metadata.json (absent for TorchScript fp32).
RUNTIMES = {"fp32": ("torchscript", "openvino"), "bf16": ("aotinductor", "openvino"), "int8": ("aotinductor",)}
# OpenVINO's INFERENCE_PRECISION_HINT for each precision it serves.
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}
# Only through set-up: a bare `pip install -r requirements-openvino.txt` outside its .venv would resolve the
# torch pin to PyPI's CUDA build (set-up installs the +cpu wheel first).
OPENVINO_SETUP = "scripts/setup.sh --openvino"


def require_openvino(*also: str) -> None:
    """RuntimeError naming what is missing and how to install it, unless OpenVINO (and `also`) import."""
    import importlib.util

    missing = [m for m in ("openvino", *also) if importlib.util.find_spec(m) is None]
    if missing:
        what = "OpenVINO, which is" if missing == ["openvino"] else f"{' and '.join(missing)}, which are"
        raise RuntimeError(f"this needs {what} not installed: {OPENVINO_SETUP}")


class ArchiveError(ValueError):
    """An archive this version cannot serve; the message says what to do (one line)."""


OPERATING_TARGETS = ("sensitivity", "specificity")


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


@dataclass(frozen=True)
class ArchiveMetadata:
    """metadata.json, typed and versioned. Written by exporter/build_mar.py through to_mapping(), read back
    through from_mapping(): an unknown or missing key, a wrong type or another schema fails at load."""

    name: str = "melanoma"
    version: str = ""
    architecture: str = ""
    head: str = "sigmoid"
    outputs: int = 1
    checkpoint_form: str = ""
    source_file: str = ""
    weights_sha256: str = ""
    model_file: str = MODEL_FILE
    model_sha256: str = ""
    demo: bool = False
    precision: dict[str, Any] = field(default_factory=lambda: {"name": "fp32"})
    explain: dict[str, Any] | None = None  # {"file", "method", "layer"}, or None in --no-explain archives
    # Fitted on the user's labelled validation set at build time (exporter/calibration.py), or None:
    # {"method": "temperature", "temperature", "images", "positives", "ece_before", "ece_after", ...}
    calibration: dict[str, Any] | None = None
    # {"target": "sensitivity" | "specificity", "value", "threshold", "sensitivity", "sensitivity_95ci",
    #  "specificity", "specificity_95ci", "images", "positives", "bootstrap"}, or None: a fixed --threshold
    operating_point: dict[str, Any] | None = None
    # The input checks (handler/checks.py): {"limits": QualityLimits, "features": {stage: size} the model's second
    # output holds (absent: a logit-only model), "ood": the out-of-distribution fit (exporter/ood.py) or None}
    checks: dict[str, Any] = field(default_factory=lambda: {"limits": QualityLimits().to_mapping(), "features": {},
                                                            "ood": None})
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    schema: int = METADATA_SCHEMA

    def __post_init__(self) -> None:
        where = "metadata.json"
        for f in fields(self):
            value = getattr(self, f.name)
            want = {"int": int, "bool": bool, "str": str}.get(str(f.type))
            if want is not None and (type(value) is not want):
                raise ArchiveError(f"{where}: {f.name} must be {want.__name__}, got {value!r}: rebuild the archive "
                                   "with this version's ./build_mar.sh")
        if not isinstance(self.precision, dict) or self.precision.get("name") not in PRECISIONS:
            raise ArchiveError(f"{where}: precision must be an object whose name is one of {', '.join(PRECISIONS)}, "
                               f"got {self.precision!r}: rebuild the archive with this version's ./build_mar.sh")
        if "format" in self.precision and self.runtime not in RUNTIMES[self.precision["name"]]:
            article = "an" if self.precision["name"][0] in "aeiou" else "a"
            raise ArchiveError(f"{where}: {article} {self.precision['name']} model runs on "
                               f"{' or '.join(RUNTIMES[self.precision['name']])}, not {self.runtime!r}: rebuild the "
                               "archive with ./build_mar.sh")
        if self.explain is not None and not (isinstance(self.explain, dict)
                                             and {"file", "method", "layer"} <= set(self.explain)):
            raise ArchiveError(f"{where}: explain must be null or an object with file, method and layer: rebuild the "
                               "archive with this version's ./build_mar.sh")
        if self.explain is not None and self.explain["method"] not in EXPLAIN_METHODS:
            raise ArchiveError(f"{where}: explain.method {self.explain['method']!r} is not one of "
                               f"{', '.join(EXPLAIN_METHODS)}: rebuild the archive with this version's ./build_mar.sh")
        if self.calibration is not None and not (isinstance(self.calibration, dict)
                                                 and self.calibration.get("method") == "temperature"
                                                 and _positive(self.calibration.get("temperature"))):
            raise ArchiveError(f"{where}: calibration must be null or an object with method \"temperature\" and a "
                               "positive temperature: rebuild the archive with this version's ./build_mar.sh")
        if self.operating_point is not None and not (
                isinstance(self.operating_point, dict)
                and self.operating_point.get("target") in OPERATING_TARGETS
                and isinstance(self.operating_point.get("threshold"), (int, float))):
            raise ArchiveError(f"{where}: operating_point must be null or an object with a target "
                               f"({' or '.join(OPERATING_TARGETS)}) and a threshold: rebuild the archive with "
                               "this version's ./build_mar.sh")
        if not (isinstance(self.checks, dict) and isinstance(self.checks.get("limits"), dict)
                and isinstance(self.checks.get("features"), dict) and "ood" in self.checks
                and (self.checks["ood"] is None or (isinstance(self.checks["ood"], dict)
                                                    and self.checks["ood"].get("method") == OOD_METHOD))):
            raise ArchiveError(f"{where}: checks must be an object with limits, features and ood (null or a "
                               f"{OOD_METHOD} fit): rebuild the archive with this version's ./build_mar.sh")
        try:
            QualityLimits.from_mapping(self.checks["limits"])
        except (TypeError, ValueError) as e:
            raise ArchiveError(f"{where}: checks.limits: {e}: rebuild the archive with ./build_mar.sh") from None
        if self.outputs not in (1, 2) or not isinstance(self.versions, dict):
            raise ArchiveError(f"{where}: outputs must be 1 or 2 and versions an object: rebuild the archive with "
                               "this version's ./build_mar.sh")

    @classmethod
    def from_mapping(cls, data: Any) -> ArchiveMetadata:
        if not isinstance(data, Mapping):
            raise ArchiveError("metadata.json must hold an object: rebuild the archive with ./build_mar.sh")
        schema = data.get("schema", 1)  # archives from before the field existed are schema 1
        if schema != METADATA_SCHEMA:
            raise ArchiveError(f"metadata.json is schema {schema}; this handler reads schema {METADATA_SCHEMA}: "
                               "rebuild the archive with this version's ./build_mar.sh")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data) - {"schema"})
        if unknown or missing:
            raise ArchiveError("metadata.json: " + "; ".join(
                [*([f"unknown key(s) {', '.join(unknown)}"] if unknown else []),
                 *([f"missing key(s) {', '.join(missing)}"] if missing else [])])
                + ": rebuild the archive with this version's ./build_mar.sh")
        return cls(**{**data, "schema": schema})

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def precision_name(self) -> str:
        return str(self.precision["name"])

    @property
    def runtime(self) -> str:
        """torchscript (the default archive), aotinductor (bf16) or openvino (--runtime openvino)."""
        return str(self.precision.get("format", "torchscript"))




def load_model(source: bytes | str | os.PathLike[str], precision: str = "fp32", runtime: str | None = None,
               views: int = 8) -> Model:
    """Load the archive's model and optimise it for this CPU. `runtime`: one of RUNTIMES[precision], by
    default the first (TorchScript for fp32, AOTInductor for bf16 and int8). `views`: the archive's TTA views,
    the batch OpenVINO's model is compiled for (OpenVinoModel).

    fp32: frozen TorchScript. The optimize-for-inference pass (oneDNN prepacked convolutions, conv-BN
    folding) measured ~15-25 % faster than the frozen module here, but its result cannot be saved and
    reloaded, so it runs at load time. bf16, int8: an AOTInductor package, compiled at build time (check_runtime
    says whether this machine can run it). openvino (fp32, bf16): the ONNX graph compiled by OpenVINO.
    The build verifies exactly this load path against the eager model.
    """
    runtime = runtime or RUNTIMES[precision][0]
    if runtime not in RUNTIMES.get(precision, ()):
        raise ValueError(f"no {runtime} runtime for {precision}: {precision} runs on {', '.join(RUNTIMES[precision])}")
    if runtime == "aotinductor":
        return _load_aoti(source)
    if runtime == "openvino":
        return OpenVinoModel(source, torch.get_num_threads(), precision, views)
    # From a path when there is one: reading the file into bytes first would hold a second copy
    # of the weights (~115 MB) in the worker for as long as the allocator keeps it.
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    model = torch.jit.load(f, map_location="cpu").eval()
    if model.state_dict():  # not frozen (an archive from an older export): freeze once, here
        model = torch.jit.freeze(model)
    try:
        # The pass, in place. torch.jit.optimize_for_inference would freeze the already frozen module
        # again: a clone whose original graph, with a full copy of the weights as its constants, stays
        # alive beside it (+115 MiB RSS in the worker, for bit-identical outputs).
        torch._C._jit_pass_optimize_for_inference(model._c, [])
    except Exception as e:  # pragma: no cover - depends on the CPU/oneDNN build
        warnings.warn(f"optimize_for_inference failed ({e}); serving the frozen model", stacklevel=2)
    return model


@contextlib.contextmanager
def _as_file(source: bytes | str | os.PathLike[str], suffix: str) -> Iterator[str]:
    """A path to `source`: its own, or a temporary file holding its bytes (removed on exit)."""
    if not isinstance(source, (bytes, bytearray)):
        yield str(source)
        return
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(source)
        f.flush()
        yield f.name


def _load_aoti(source: bytes | str | os.PathLike[str]) -> Model:
    """An AOTInductor package, loaded the way torch._inductor.aoti_load_package does once past its device
    check: that check compiles test programs with g++ in the serving process (and only warns). check_runtime
    has already matched this CPU's flags to the package's, without a compiler."""
    from torch.export.pt2_archive._package import AOTICompiledModel

    # Extracts the package's shared library to a temporary folder, maps it, removes the folder when freed.
    with _as_file(source, ".pt2") as path:
        return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1))


class OpenVinoModel:
    """The model's ONNX graph compiled by OpenVINO for this CPU (--runtime openvino): a Model like the
    TorchScript one, taking and returning torch tensors, so the pipeline around it is unchanged.

    The precision is always set: OpenVINO's default on CPUs with AVX512-BF16 or AMX is to run "f32" models in
    bf16, a silent precision change the build's verification would not have seen; and where a CPU cannot run
    bf16, OpenVINO would quietly run a bf16 archive in f32, which the build did not measure either: refused.
    One stream and `threads` threads, as the TorchScript model runs; a worker serves one batch at a time.

    fp32 is compiled for a static batch of `views` rows (one image's TTA views) and run one such chunk at a
    time, the last one zero-padded: OpenVINO ran the static shape ~5 % faster than the ONNX file's dynamic
    batch (measured in one process), and every row of a static batch gets the same numbers whatever its
    position and batch-mates (checked bit for bit), so the build's verification on any batching is what the
    server computes. bf16 keeps the dynamic batch: compiled static, the export's gross check refused it on the
    trained fixture (pooled layer4 features 2.4 off, past its relative bound), while the dynamic compile
    passed. Each is verified as it is served."""

    def __init__(self, source: bytes | str | os.PathLike[str], threads: int, precision: str = "fp32",
                 views: int = 8) -> None:
        require_openvino()
        import openvino as ov

        core = ov.Core()
        with _as_file(source, ".onnx") as path:
            net = core.read_model(path)
        self._views = views if precision == "fp32" else 0  # 0: the dynamic batch, one call
        if self._views:
            shape = net.input(0).get_partial_shape()
            net.reshape({0: [views, *(d.get_length() for d in list(shape)[1:])]})
        hint = OPENVINO_HINTS[precision]
        self._compiled = core.compile_model(net, "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"})
        del net  # the compiled model holds its own (repacked) weights
        runs = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if runs != hint:
            raise RuntimeError(f"OpenVINO runs this {precision} model in {runs} on this CPU (no "
                               f"{' or '.join(PRECISION_CPU_FLAGS.get(precision, ()))}): use an fp32 archive")
        self._request = self._compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows, n = x.detach().float().contiguous().numpy(), len(x)
        if not self._views:
            return torch.from_numpy(self._request.infer({0: rows})[0].copy())
        outs = []
        for i in range(0, n, self._views):
            chunk = rows[i:i + self._views]
            if len(chunk) < self._views:
                chunk = np.concatenate([chunk, np.zeros((self._views - len(chunk), *chunk.shape[1:]), np.float32)])
            # copied: the request reuses its output buffer on the next call
            outs.append(self._request.infer({0: chunk})[0][:min(self._views, n - i)].copy())
        return torch.from_numpy(np.concatenate(outs))


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): after loading and optimising the
    model this takes the worker from ~590 to ~420 MiB RSS, which decides whether a t2.micro fits."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def operating_point_summary(cfg: PipelineConfig, meta: ArchiveMetadata) -> dict[str, Any]:
    """What every response says about its threshold: chosen for a validation sensitivity or specificity
    (with what that set measured), or a fixed number."""
    op = meta.operating_point
    if op is None:
        return {"threshold": cfg.threshold, "chosen_for": "fixed threshold (build_mar.sh --threshold)"}
    return {"threshold": cfg.threshold, "chosen_for": f"{op['target']} >= {op['value']:g} on the validation set",
            "validation_sensitivity": op["sensitivity"], "validation_specificity": op["specificity"]}


def check_contract(cfg: PipelineConfig, meta: ArchiveMetadata) -> None:
    """model-config.yaml (what scores) and metadata.json (what the build measured) must tell one story."""
    temperature = meta.calibration["temperature"] if meta.calibration else 1.0
    if cfg.temperature != temperature:
        raise ArchiveError(f"model-config.yaml's temperature {cfg.temperature} is not the {temperature} "
                           "metadata.json records: rebuild the archive with ./build_mar.sh")
    if meta.operating_point is not None and cfg.threshold != meta.operating_point["threshold"]:
        raise ArchiveError(f"model-config.yaml's threshold {cfg.threshold} is not the operating point's "
                           f"{meta.operating_point['threshold']} in metadata.json: rebuild the archive with "
                           "./build_mar.sh")


def result(score: Score, cfg: PipelineConfig, meta: ArchiveMetadata,
           checks: dict[str, Any] | None = None) -> dict[str, Any]:
    """The response schema shared by the handler and the client's offline mode; `checks`: run_checks'."""
    probability = score.probability
    out: dict[str, Any] = {
        "probability": probability,
        "raw_score": score.raw_score,
        "label": "malignant" if probability >= cfg.threshold else "benign",
        "threshold": cfg.threshold,
        "operating_point": operating_point_summary(cfg, meta),
        "calibration": ({"method": "temperature", "temperature": cfg.temperature} if meta.calibration
                        else {"method": "none"}),
        "tta_views": cfg.tta_views,
        "model": {
            "name": meta.name,
            "version": meta.version,
            "weights_sha256": meta.weights_sha256,
            "demo": meta.demo,
            "precision": meta.precision_name,
            "runtime": meta.runtime,
        },
    }
    if checks is not None:
        out["checks"] = checks
    if out["model"]["demo"]:
        out["warning"] = DEMO_WARNING
    return out




RUNTIME_KEYS = ("threads",)  # handler settings that are not part of the scoring contract


def read_model_config(text: str) -> tuple[PipelineConfig, dict[str, Any]]:
    """Parse model-config.yaml; return the pipeline contract and the handler section."""
    doc = yaml.safe_load(text) or {}
    section = doc.get("handler") or {}
    return PipelineConfig.from_mapping(section, ignore=RUNTIME_KEYS), dict(section)


def usable_cpus(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int:
    """The CPUs this process may really use: the smaller of its affinity and its cgroup CPU quota, rounded
    down, at least 1. In a container limited by a quota (`docker --cpus 2`, Kubernetes limits.cpu) the
    affinity is the whole node; one torch thread per node core would be throttled (kserve/kserve#1031)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path(cgroup_root))
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs granted by the cgroup quota (cgroup v2 cpu.max "QUOTA PERIOD", v1 cpu.cfs_quota_us /
    cpu.cfs_period_us), or None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


@dataclass
class LoadedArchive:
    scorer: Scorer
    cfg: PipelineConfig
    metadata: ArchiveMetadata
    threads: int
    source: Path
    ood: OodModel | None = None

    @cached_property
    def limits(self) -> QualityLimits:  # parsed once, not per request
        return QualityLimits.from_mapping(self.metadata.checks["limits"])

    def score(self, data: bytes) -> dict[str, Any]:
        """The served response for one image: score and input checks, as the handler answers."""
        prepared = prepare(data, self.cfg)
        (score,), features = self.scorer.score_and_features([prepared.tensor])
        return result(score, self.cfg, self.metadata,
                      self.checks(*prepared.size, prepared.resized, None if features is None else features[0]))

    def checks(self, width: int, height: int, resized: Any, features: Any) -> dict[str, Any]:
        """run_checks for one image; `features`: its row of Scorer.score_and_features' (None: a logit-only model)."""
        return run_checks(width, height, resized, features, self.limits, self.ood)

    def has_member(self, name: str) -> bool:
        if self.source.is_dir():
            return (self.source / name).is_file()
        with zipfile.ZipFile(self.source) as z:
            return name in z.namelist()

    def open_member(self, name: str) -> str | io.BytesIO:
        """A file of the archive for torch.jit.load, opened when needed (explain.pt is only loaded on a first
        explanation): its path where TorchServe unpacked it, so that its bytes are never a second copy of the
        weights in the worker (~115 MB); its bytes only when reading a .mar directly."""
        if self.source.is_dir():
            return str(self.source / name)
        with zipfile.ZipFile(self.source) as z:
            return io.BytesIO(z.read(name))


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
    try:
        metadata = ArchiveMetadata.from_mapping(json.loads(read(METADATA_FILE)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArchiveError(f"metadata.json does not parse ({e}): rebuild the archive with ./build_mar.sh") from None
    check_contract(cfg, metadata)
    check_runtime(metadata.precision)
    model_file = model_file or metadata.model_file
    model_source: bytes | Path = p / model_file if p.is_dir() else read(model_file)
    threads = threads or int(section.get("threads") or 0) or usable_cpus()
    torch.set_num_threads(threads)
    model = load_model(model_source, metadata.precision_name, metadata.runtime, cfg.tta_views)
    ood = OodModel.from_bytes(read(OOD_FILE)) if metadata.checks["ood"] else None
    return LoadedArchive(Scorer(model, cfg), cfg, metadata, threads, p, ood)


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


def check_runtime(precision: Mapping[str, Any], cpuinfo: str | None = None) -> None:
    """Refuse, with what to do, an archive whose compiled model this machine cannot run: an AOTInductor
    package is native code for one torch version and one CPU vector ISA, and running it elsewhere would
    crash the worker (illegal instruction) or fail deep inside torch. `precision`: the metadata's."""
    name = precision.get("name", "fp32")
    if precision.get("format") == "openvino":
        require_openvino()
        # bf16: the agreement was measured with the build machine's bf16 kernels (AMX or AVX512-BF16);
        # another kind computes other roundings. fp32 records no flags.
        have = cpu_flags(cpuinfo)
        if have and set(precision.get("cpu_flags", [])) != have & set(PRECISION_CPU_FLAGS.get(name, ())):
            raise RuntimeError(f"this {name} OpenVINO archive was measured on a CPU with "
                               f"{', '.join(precision['cpu_flags']) or 'no bf16 instructions'}; this one has "
                               f"{', '.join(sorted(have & set(PRECISION_CPU_FLAGS[name]))) or 'none of them'}: "
                               f"rebuild it on this machine (./build_mar.sh --runtime openvino --precision {name} "
                               "...) or use an fp32 archive")
        return
    if name == "fp32":
        return
    if precision.get("format") != "aotinductor":
        raise RuntimeError(f"this {name} archive was built by an earlier version in a format "
                           f"no longer served; rebuild it with ./build_mar.sh --precision {name}")
    rebuild = f"rebuild it on this machine (./build_mar.sh --precision {name} ...) or use an fp32 archive"
    built_with = str(precision.get("torch", ""))
    if built_with != torch.__version__:
        raise RuntimeError(f"this {name} archive was compiled for torch {built_with}, this is torch "
                           f"{torch.__version__}: {rebuild}")
    have = cpu_flags(cpuinfo)
    missing = [f for f in precision.get("cpu_flags", []) if f not in have] if have else []
    if missing:
        raise RuntimeError(f"this {name} archive was compiled for CPUs with {', '.join(precision['cpu_flags'])}; "
                           f"this CPU lacks {', '.join(missing)}: {rebuild}")

"""Checkpoint -> verified, frozen TorchScript that outputs one malignancy logit per image."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.checkpoint import LoadedCheckpoint, build_model, tensors_sha256
from handler.archive import load_model
from handler.pipeline import IMAGE_SIZE

DEMO_SEED = 20200817  # fixed: the demo archive is the same on every machine with the same torch
# The export is verified against the eager model with |dlogit| <= RTOL * (|logit| + scale), where scale is
# the median |logit| over the verification photos (at least 1): the network's typical logit size. Why
# relative: fp32 rounding through ~50 layers is relative to the size of the numbers summed, so a head whose
# logits reach +-30 is off by ~30x more than one within +-1. Why `scale` and not a fixed atol: a logit near 0
# is a sum of terms of the network's usual size and carries their rounding (measured at logits bisected to
# ~0: 1.6e-4, 1.3e-3, 3.2e-3 for the trained fixture with its head x1, x8, x20: 4.2e-5 x scale). Measured
# elsewhere (eager ATen against oneDNN, and against the optimised load path, on photos, flat colours and
# noise): <= 3.3e-5 x (|logit| + 1). RTOL is >= 12x both (README). A wrong graph (a baked-in branch, a stale
# weight, a lost layer) misses by far more.
RTOL = 5e-4
VERIFY_BATCHES = (3, 8)  # two sizes other than the trace's 2, so a baked-in batch size is caught


class MalignancyLogit(nn.Module):
    """Wraps a 1- or 2-output model so that it returns N x 1 logits of 'malignant'.
    For softmax heads, softmax(l)[1] == sigmoid(l1 - l0) exactly, so one pipeline serves both."""

    def __init__(self, model: nn.Module, outputs: int) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.outputs == 2:
            return out[:, 1:2] - out[:, 0:1]
        return out


STAGES = ("layer1", "layer2", "layer3", "layer4")
FEATURE_STAGES = ("layer2", "layer3", "layer4")  # pooled for the out-of-distribution check (docs/INPUT_CHECKS.md)


class LogitAndFeatures(nn.Module):
    """What an archive's model returns: N x (1 + D), the malignancy logit (as MalignancyLogit), then the
    spatially pooled activations after each of FEATURE_STAGES (512 + 1024 + 2048 for ResNeSt-50), from the same
    forward pass. The input checks measure how far an image's features are from the validation set's
    (handler/checks.py); the extra output costs three means and a concatenation, and the logit is the head's
    own. ResNeSt's forward, spelled out so the stages' outputs can leave it."""

    def __init__(self, model: nn.Module, outputs: int) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        a = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        pooled = []
        for name in STAGES:
            a = getattr(m, name)(a)
            if name in FEATURE_STAGES:
                pooled.append(a.mean(dim=(2, 3)))
        out = m.fc(torch.flatten(m.avgpool(a), 1))  # m.drop is a no-op in eval
        logit = out[:, 1:2] - out[:, 0:1] if self.outputs == 2 else out
        return torch.cat([logit, *pooled], dim=1)


RESNEST_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


def has_stages(module: nn.Module) -> bool:
    """A module LogitAndFeatures can spell out: ResNeSt's parts by name. Not so a frozen or foreign TorchScript
    checkpoint (exporter/checkpoint.py serves such a script as it is): its archive returns the logit alone, and
    the out-of-distribution check says it cannot run."""
    return all(hasattr(module, name) for name in RESNEST_PARTS)


def served_module(module: nn.Module, outputs: int) -> nn.Module:
    """What an archive's model computes: logit and pooled features where the network has stages, else the logit."""
    if has_stages(module):
        return LogitAndFeatures(module, outputs).eval()
    return MalignancyLogit(module, outputs).eval()


def eager_outputs(eager: MalignancyLogit, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The eager model's logits through its own forward, and each FEATURE_STAGES output pooled (hooks): the
    reference LogitAndFeatures is verified against."""
    if not has_stages(eager.model):
        return eager(x).float(), []
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(eager.model, name).register_forward_hook(
        lambda _m, _a, out, name=name: seen.__setitem__(name, out.float().mean(dim=(2, 3))))
        for name in FEATURE_STAGES]
    try:
        logits = eager(x).float()
    finally:
        for h in handles:
            h.remove()
    return logits, [seen[name] for name in FEATURE_STAGES]


def feature_sizes(ckpt: LoadedCheckpoint) -> dict[str, int]:
    """{stage: channels} of FEATURE_STAGES, in the order the model's feature output holds them ({}: none)."""
    if not has_stages(ckpt.module):
        return {}
    with torch.inference_mode():
        _, feats = eager_outputs(MalignancyLogit(ckpt.module, ckpt.outputs).eval(), torch.zeros(1, 3, 64, 64))
    return {name: int(f.shape[1]) for name, f in zip(FEATURE_STAGES, feats, strict=True)}


class ExportError(Exception):
    pass


# A reduced-precision package (AOTInductor bf16 or int8, OpenVINO bf16) is held to what that precision itself
# does, never to fp32 with a constant: the same network run eagerly at that precision (at_precision: bf16 weights
# and activations; the quantised graph before compilation for int8) is the reference, and on each verification
# input the compiled package may differ from it by at most REDUCED_MULTIPLE times the reference's own distance
# from fp32 there (x max(own error on the input, median own error) + RTOL, in the units of verify()).
# Why 8: a compiler rounds in other places than the eager network (it folds and fuses), and on the check's noise
# inputs AOTInductor's bf16 package was up to 3.2x as far from the eager bf16 network as that network is from
# fp32 (the trained fixture, AVX2; the demo 1.7x): 8 is 2.5x that. What a broken compile does, planted on the
# same packages (the reference given other weights than the package holds): a residual block lost
# 51-350x, one convolution zeroed 86x (demo) and 369x (trained), one layer1 convolution x1.1 10x and
# 58x, the head's bias +0.5 17x and 11x: refused. Within rounding's reach and so not refused: +0.1 on the
# head's bias (3.4x, 3.6x), one layer3 convolution x1.05 (8.3x, 5.2x); the agreement on the user's images
# measures what such a difference does to a probability. docs/PRECISION.md has the figures.
# Whether the precision itself is close enough to fp32 is a separate question, the agreement, measured in
# probability on the user's own images (exporter/precision.py, --max-delta): --force-precision overrides that
# one, never this one.
REDUCED_MULTIPLE = 8.0


class Bfloat16Logit(nn.Module):
    """The model in bfloat16 weights and channels-last activations; takes and returns float32, so the
    pipeline around it is unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).float()


def demo_checkpoint(image_size: int = IMAGE_SIZE) -> LoadedCheckpoint:
    """Deterministic, untrained weights whose scores still spread over (0, 1).

    A freshly initialised ResNeSt gives nearly the same logit for every image, which would make
    every numeric test vacuous. So the head is scaled, from pooled features of fixed synthetic
    images, to logits of mean 0 and std 1.5. It is still untrained: its scores mean nothing.
    """
    torch.manual_seed(DEMO_SEED)
    model = build_model(1).eval()
    rng = np.random.default_rng(DEMO_SEED)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    images = []
    for _ in range(32):
        cx, cy, r = rng.uniform(0.25, 0.75, 2).tolist() + [rng.uniform(0.1, 0.35)]
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        skin, lesion = rng.uniform(-1, 1.5, 3), rng.uniform(-2, 0.5, 3)
        img = skin[:, None, None] * (1 - blob) + lesion[:, None, None] * blob
        images.append(img + rng.normal(0, 0.2, img.shape))
    x = torch.tensor(np.stack(images), dtype=torch.float32)
    fc = model.fc
    model.fc = nn.Identity()
    with torch.inference_mode():
        feats = model(x).double()
    model.fc = fc
    w = torch.randn(feats.shape[1], dtype=torch.float64)
    z = feats @ w
    scale = 1.5 / z.std()
    with torch.no_grad():
        fc.weight.copy_((w * scale).float()[None])
        fc.bias.fill_(float(-(z.mean() * scale)))
    sd = model.state_dict()
    return LoadedCheckpoint(model, 1, "demo", tensors_sha256(sd), ["untrained demo weights"])


def export_torchscript(ckpt: LoadedCheckpoint, image_size: int) -> bytes:
    """Trace and freeze; return the serialized file after verifying it (reloaded and optimised exactly
    as handler/pipeline.py loads it) against the eager model: the bytes checked are the bytes shipped.
    Raises ExportError if they disagree."""
    eager = MalignancyLogit(ckpt.module, ckpt.outputs).eval()
    example = torch.randn(2, 3, image_size, image_size)
    with torch.inference_mode():
        traced = torch.jit.trace(served_module(ckpt.module, ckpt.outputs), example, check_trace=False)
    frozen = torch.jit.freeze(traced.eval())
    buf = io.BytesIO()
    torch.jit.save(frozen, buf)
    data = buf.getvalue()
    verify(eager, load_model(data), image_size)
    return data


# Inductor's -m flags -> the /proc/cpuinfo flags a CPU needs to run the compiled kernels.
_ISA_FLAG_NAMES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
                   "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "amx-fp16": "amx_fp16"}


def cpu_flags_for(arch_flags: str) -> list[str]:
    """'-mavx512f -mfma -mavx512vnni' -> ['avx512_vnni', 'avx512f', 'fma']."""
    names = {f[2:] for f in arch_flags.split() if f.startswith("-m") and not f.startswith("-march")}
    return sorted({_ISA_FLAG_NAMES.get(n, n.replace("-", "_")) for n in names})


def cxx_compiler() -> str | None:
    """The compiler a bf16 build uses: $CXX if set (and nothing else), else g++ or c++ on PATH."""
    cxx = os.environ.get("CXX")
    return shutil.which(cxx) if cxx else shutil.which("g++") or shutil.which("c++")


def compile_cache_key(reference: nn.Module, image_size: int, compiler: str, isa: object, precision: str = "bf16",
                      extra: bytes = b"") -> str:
    """What the compiled package depends on: the precision, the weights (every tensor's bytes), the export code
    (this file and exporter/int8.py), resnest, torch, the compiler, the vector ISA Inductor picked, and `extra`
    (int8: the calibration images and torchao). Anything else changed, it compiles anew."""
    from importlib import metadata

    h = hashlib.sha256(f"melanoma-aoti-{precision}-v1\0".encode())
    for part in (torch.__version__, metadata.version("resnest"), os.path.realpath(compiler), str(isa),
                 " ".join(isa.build_arch_flags()) if isa else "", str(image_size)):
        h.update(part.encode() + b"\0")
    h.update(Path(__file__).read_bytes())
    h.update(Path(__file__).with_name("int8.py").read_bytes())
    h.update(extra)
    for name, t in reference.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def private_cache_dir(folder: str | Path) -> Path:
    """A cache of native code must be this user's alone: created 0700, refused if others may write to it."""
    path = Path(folder).expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ExportError(f"compile cache {path} is not private (owner uid {st.st_uid}, mode "
                          f"{st.st_mode & 0o777:o}): it holds native code the build and server run; "
                          "chmod 700 it or choose another")
    return path


def export_bf16(ckpt: LoadedCheckpoint, image_size: int,
                cache: str | Path | None = None) -> tuple[bytes, dict[str, Any]]:
    """The model in bf16, compiled ahead of time by AOTInductor into a .pt2 package (export_compiled)."""
    return export_compiled(ckpt, image_size, "bf16", cache)


def export_int8(ckpt: LoadedCheckpoint, image_size: int, calibration: Sequence[torch.Tensor],
                cache: str | Path | None = None) -> tuple[bytes, dict[str, Any]]:
    """The model quantised to static int8 on `calibration` (exporter/int8.py), compiled like bf16."""
    return export_compiled(ckpt, image_size, "int8", cache, calibration)


def export_compiled(ckpt: LoadedCheckpoint, image_size: int, precision: str, cache: str | Path | None = None,
                    calibration: Sequence[torch.Tensor] = ()) -> tuple[bytes, dict[str, Any]]:
    """The model in a reduced precision (bf16, or int8 calibrated on `calibration`), compiled ahead of time
    by AOTInductor into a .pt2 package, with weight freezing.

    Why not TorchScript: its best bf16 (channels-last, frozen) ran the 8-view forward only 1.6-1.9x faster
    than fp32 here, its fused-kernel paths (oneDNN Graph) 3x slower; Inductor fuses the split-attention
    blocks' element-wise work and runs 1.9-2.2x (docs/PRECISION.md); int8 exists only through PT2E, whose
    speed is Inductor's (freezing folds the quantised weights into oneDNN's int8 convolutions). The package
    holds native code for this CPU's vector ISA and this torch: both are recorded, and the loader refuses a
    mismatch rather than crash. Needs a C++ compiler now, none at serving time. Returns the package and
    what it needs.

    `cache` (opt-in, build_mar.sh --compile-cache): a private folder of packages by compile_cache_key, so a
    rebuild of the same weights (another threshold, bound or calibration set) skips the compile. A package
    from the cache is verified against the eager model exactly like a fresh one.
    """
    compiler = cxx_compiler()
    if compiler is None:
        raise ExportError(f"--precision {precision} needs a C++ compiler to compile the model, and "
                          f"{os.environ.get('CXX') or 'g++'} was not found (sudo apt-get install g++, or set CXX)")
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    reference = MalignancyLogit(ckpt.module, ckpt.outputs).eval()
    with inductor_config.patch({"cpp.cxx": (None, compiler)}):
        isa = pick_vec_isa()  # what the compile will target (it asks this compiler)
    info: dict[str, Any] = {"format": "aotinductor", "vec_isa": str(isa) if isa else "none",
                            "cpu_flags": cpu_flags_for(isa.build_arch_flags()) if isa else [],
                            "torch": torch.__version__}
    extra = b""
    photos = None  # verify_reduced() on its generated images and noise
    if precision == "int8":
        from importlib import metadata

        from handler.pipeline import tta_views

        extra = metadata.version("torchao").encode() + b"".join(t.numpy().tobytes() for t in calibration)
        # The user's own images, in their TTA views: what int8 was calibrated for (see verify_reduced()).
        photos = tta_views(torch.stack(list(calibration)), 8)[:16].contiguous()
    # The network at this precision, run eagerly: what is compiled, and the reference the package is held to.
    eager, recipe = at_precision(reference, precision, calibration, image_size)
    if cache is None:
        return _compile(reference, eager, recipe, info, image_size, precision, compiler, photos, None)
    key = compile_cache_key(reference, image_size, compiler, isa, precision, extra)
    cached = private_cache_dir(cache) / f"{precision}-{key}.pt2"
    # Two builds of the same weights at once (two tests, or a user's two terminals) compile once: the second
    # waits for the first's package instead of compiling it again beside it.
    with open(cached.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cached.is_file() and cached.with_suffix(".json").is_file():
            data = cached.read_bytes()
            check = verify_reduced(reference, eager, load_model(data, precision), image_size, precision,
                                   f"compiled {precision} package (from the cache)", photos)
            print(f"{precision}: compiled package reused from {cached}", file=sys.stderr)
            return data, {**info, **json.loads(cached.with_suffix(".json").read_text()), "export_check": check}
        return _compile(reference, eager, recipe, info, image_size, precision, compiler, photos, cached)


def _compile(reference: MalignancyLogit, eager: nn.Module, recipe: dict[str, Any], info: dict[str, Any],
             image_size: int, precision: str, compiler: str, photos: torch.Tensor | None,
             cached: Path | None) -> tuple[bytes, dict[str, Any]]:
    """export_compiled's compile, verification and (with a cache) filing of the verified package."""
    import torch._inductor.config as inductor_config
    from torch._inductor import aoti_compile_and_package
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    example = torch.randn(8, 3, image_size, image_size)
    # A private Inductor cache: nothing from an earlier build is reused, nothing is left behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="melanoma-aoti.") as tmp, temporary_cache_dir(tmp):
        try:
            with inductor_config.patch({"freezing": True, "cpp.cxx": (None, compiler)}), torch.no_grad():
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.export.export(eager, (example,), dynamic_shapes=({0: batch},))
                path = aoti_compile_and_package(program, package_path=os.path.join(tmp, "model.pt2"))
            data = Path(path).read_bytes()
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"AOTInductor could not compile the {precision} model: {type(e).__name__}: "
                              f"{first}") from None
    del program
    if precision == "int8":
        recipe["int8_kernels"] = int8_kernels(data)
        if not recipe["int8_kernels"]:  # without freezing, or a pattern Inductor no longer matches: fp32 in disguise
            raise ExportError("AOTInductor did not turn the quantised model into int8 kernels (none in the "
                              "generated code); it would run in fp32: nothing written")
    check = verify_reduced(reference, eager, load_model(data, precision), image_size, precision,
                           f"compiled {precision} package", photos)
    if cached is not None:  # only a verified package is kept; each file written whole or not at all
        for target, payload in ((cached.with_suffix(".json"), json.dumps(recipe).encode()), (cached, data)):
            tmp_file = target.with_name(f".{target.name}.{os.getpid()}")
            tmp_file.write_bytes(payload)
            os.replace(tmp_file, target)
    return data, {**info, **recipe, "export_check": check}


def at_precision(reference: MalignancyLogit, precision: str, calibration: Sequence[torch.Tensor] = (),
                 image_size: int = 128) -> tuple[nn.Module, dict[str, Any]]:
    """The served network (logit and features) at `precision`, eager: bf16 weights and activations
    (Bfloat16Logit), or int8 quantised and calibrated on `calibration` (exporter/int8.py; the graph before
    compilation). What AOTInductor compiles, and the reference verify_reduced holds every reduced package to.
    Returns it and, for int8, what was done (the archive's metadata)."""
    served = served_module(copy.deepcopy(reference.model), reference.outputs).eval()
    if precision == "bf16":
        return Bfloat16Logit(served).eval(), {}
    if precision == "int8":
        from exporter.int8 import quantize

        return quantize(served, calibration, image_size)
    raise ValueError(f"no reduced precision {precision!r}")


def int8_kernels(package: bytes) -> int:
    """How many oneDNN int8 convolutions and linears the AOTInductor package's generated code calls."""
    import re
    import zipfile

    with zipfile.ZipFile(io.BytesIO(package)) as z:
        code = "".join(z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith(".wrapper.cpp"))
    return len(re.findall(r"aoti_torch_cpu__q(?:conv|conv2d|linear)_pointwise", code))


def export_openvino(ckpt: LoadedCheckpoint, image_size: int, precision: str = "fp32",
                    views: int = 8) -> tuple[bytes, dict[str, Any]]:
    """The model as ONNX (opset 17, any batch size) for the opt-in OpenVINO runtime, verified exactly as
    handler/archive.py will run it (OpenVINO, f32) against the eager model with the TorchScript bound (RTOL).
    bf16: the same file, which OpenVINO then runs in bf16 (INFERENCE_PRECISION_HINT); also verified in bf16
    against the network run eagerly in bf16 (verify_reduced), and the CPU's bf16 instructions recorded
    (check_runtime).
    Its agreement with fp32 on the user's images is measured by the build, as for every reduced precision.
    `views`: the archive's TTA views, the static batch OpenVINO compiles for (handler/archive.py).

    Why: on the CPUs measured, OpenVINO f32 runs this network's 8-view forward in 0.75-0.8x TorchScript's
    time and Inductor did not close the gap (docs/PERFORMANCE.md, bench/runtimes.py); OpenVINO bf16 runs it in
    0.7-0.9x AOTInductor bf16's (as served). ONNX rather than OpenVINO's IR: one file, read by OpenVINO at
    load, and by any other runtime a user may try. Returns the file and what metadata records about it."""
    import warnings

    from handler.archive import PRECISION_CPU_FLAGS, cpu_flags, require_openvino

    try:
        require_openvino("onnx")  # onnx: torch's TorchScript-based exporter writes through it
    except RuntimeError as e:
        raise ExportError(f"--runtime openvino: {e}") from None
    import openvino

    eager = MalignancyLogit(ckpt.module, ckpt.outputs).eval()
    example = torch.randn(8, 3, image_size, image_size)
    with tempfile.TemporaryDirectory(prefix="melanoma-onnx.") as tmp, torch.inference_mode(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: the one that
        # needs no extra package and exports this traced network as it is served
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(served_module(ckpt.module, ckpt.outputs), (example,), path, input_names=["x"],
                          output_names=["logit_and_features"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "logit_and_features": {0: "batch"}}, dynamo=False)
        data = Path(path).read_bytes()
    verify(eager, load_model(data, "fp32", "openvino", views), image_size, what="OpenVINO model")
    info: dict[str, Any] = {"format": "openvino", "openvino": openvino.__version__.split("-")[0]}
    if precision != "fp32":
        try:
            reduced = load_model(data, precision, "openvino", views)
        except RuntimeError as e:  # this CPU has no bf16 instructions: OpenVINO would run f32
            raise ExportError(f"--runtime openvino --precision {precision}: {e}") from None
        info["export_check"] = verify_reduced(eager, at_precision(eager, precision)[0], reduced, image_size,
                                              precision, f"OpenVINO {precision} model")
        info["cpu_flags"] = sorted(cpu_flags() & set(PRECISION_CPU_FLAGS[precision]))
    return data, info


EXPLAIN_LAYER = "layer3"  # 8x8 at 128 px; see docs/EXPLANATIONS.md for the evidence against layer4 (4x4)


class _Stage(nn.Module):
    """ResNeSt stem and stages up to `layer` (the activations Grad-CAM weighs)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model, self.names = model, STAGES[: STAGES.index(layer) + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for name in self.names:
            x = getattr(m, name)(x)
        return x


class _Head(nn.Module):
    """The rest of the network after `layer`: remaining stages, pooling, fc, as MalignancyLogit."""

    def __init__(self, model: nn.Module, outputs: int, layer: str) -> None:
        super().__init__()
        self.model, self.outputs, self.names = model, outputs, STAGES[STAGES.index(layer) + 1:]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        m = self.model
        for name in self.names:
            a = getattr(m, name)(a)
        out = m.fc(torch.flatten(m.avgpool(a), 1))  # m.drop is a no-op in eval
        if self.outputs == 2:
            return out[:, 1:2] - out[:, 0:1]
        return out


class CamParts(nn.Module):
    """explain.pt: forward(x) = rest(stage(x)) = the malignancy logit; Grad-CAM calls the two halves."""

    def __init__(self, model: nn.Module, outputs: int, layer: str) -> None:
        super().__init__()
        self.features = _Stage(model, layer)
        self.head = _Head(model, outputs, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def rest(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(a)


def export_explainer(ckpt: LoadedCheckpoint, image_size: int, layer: str = EXPLAIN_LAYER) -> bytes:
    """Trace the model as stage + rest (frozen, not optimised for inference: Grad-CAM needs autograd
    through the rest), verify rest(stage(x)) against the eager model, return the serialized file."""
    if layer not in STAGES:
        raise ExportError(f"explain layer must be one of {', '.join(STAGES)}, got {layer}")
    module = CamParts(ckpt.module.eval(), ckpt.outputs, layer).eval()
    example = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        inputs = {"forward": example, "stage": example, "rest": module.stage(example)}
        traced = torch.jit.trace_module(module, inputs, check_trace=False)
    parts = torch.jit.freeze(traced.eval(), preserved_attrs=["stage", "rest"])
    buf = io.BytesIO()
    torch.jit.save(parts, buf)
    data = buf.getvalue()
    loaded = torch.jit.load(io.BytesIO(data)).eval()
    verify(MalignancyLogit(ckpt.module, ckpt.outputs).eval(), lambda x: loaded.rest(loaded.stage(x)), image_size)
    return data


def feature_scale(features: torch.Tensor) -> torch.Tensor:
    """The export check's unit for pooled features (N x D): |feature| + the image's mean |feature|."""
    return features.abs() + features.abs().mean(dim=1, keepdim=True).clamp_min(1e-6)


def verification_noise(image_size: int) -> list[torch.Tensor]:
    """The export check's noise batches (one per VERIFY_BATCHES size), fixed by a seed."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, image_size, image_size, generator=gen) for n in VERIFY_BATCHES]


def verification_images(image_size: int, n: int = 16) -> torch.Tensor:
    """n preprocessed images across the value range a model meets: lesion-like blobs of many tones and
    sizes, flat skin, white, black and saturated colours, dark and over-exposed shots; fixed by a seed."""
    from handler.pipeline import PipelineConfig, preprocess

    cfg = PipelineConfig(image_size=image_size)
    rng = np.random.default_rng(2020)
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s] / s
    flats = [(205, 150, 130), (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255), (40, 25, 15)]
    images = [np.full((s, s, 3), c, np.float64) for c in flats]
    while len(images) < n:
        cx, cy, r = *rng.uniform(0.3, 0.7, 2), rng.uniform(0.08, 0.35)
        blob = 1 / (1 + np.exp((np.hypot(xx - cx, yy - cy) - r) / 0.02))
        skin, lesion = rng.uniform(150, 240, 3), rng.uniform(10, 130, 3)
        img = skin * (1 - blob[..., None]) + lesion * blob[..., None]
        img = img * rng.choice([0.25, 1.0, 1.6]) + rng.normal(0, 5, img.shape)  # dark, normal, over-exposed
        images.append(img)
    return torch.stack([preprocess(np.clip(im, 0, 255).astype(np.uint8), cfg) for im in images[:n]])


def logit_bound(ref: torch.Tensor, relative: float = RTOL,
                typical: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The export bound on |dlogit| for each logit in `ref`: relative x (|logit| + scale), where scale is the typical
    |logit| (the median over `typical`, by default `ref` itself), at least 1. Returns (bound, scale)."""
    scale = max(1.0, float((ref if typical is None else typical).abs().median()))
    return relative * (ref.abs() + scale), scale


def verify(eager: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], image_size: int,
           relative: float = RTOL, what: str = "TorchScript export", photos: torch.Tensor | None = None) -> float:
    """Compare logits on realistic images and noise, in batches of 3 and 8, and TTA probabilities through
    the serving pipeline; ExportError when |dlogit| > relative x (|logit| + scale) (see RTOL) or when a
    probability differs by more than that bound implies (sigmoid is 1/4-Lipschitz). Returns max |dlogit|.

    `photos` (16 preprocessed images) replaces the generated images and drops the noise: for static int8,
    whose activations are clipped to the ranges of its calibration images, so flat saturated colours and
    noise are off by design (measured on the trained fixture: logit 120 served as 3)."""
    from handler.pipeline import tta_views, view_probabilities

    noise: list[torch.Tensor] = []
    if photos is None:
        photos, noise = verification_images(image_size), verification_noise(image_size)
    batches = [photos[:3], photos[3:11], photos[11:], *noise]
    refs, gots, ref_feats, got_feats = [], [], [], []
    with torch.inference_mode():
        for x in batches:
            (ref, ref_feat), got = eager_outputs(eager, x), exported(x).float()
            width = 1 + sum(f.shape[1] for f in ref_feat)
            if got.shape not in ((len(x), 1), (len(x), width)):
                raise ExportError(f"the {what} returns {tuple(got.shape)} for a batch of {len(x)}, expected "
                                  f"({len(x)}, 1) or ({len(x)}, {width}): logit and features")
            refs.append(ref)
            gots.append(got[:, :1])
            if got.shape[1] > 1:
                ref_feats.append(ref_feat)
                got_feats.append(torch.split(got[:, 1:], [f.shape[1] for f in ref_feat], dim=1))
    ref, got = torch.cat(refs), torch.cat(gots)
    bound, scale = logit_bound(ref, relative, ref[:len(photos)])  # typical on the photos: noise is no typical input
    diff = (got - ref).abs()
    worst = float(diff.max())
    if not bool((diff <= bound).all()):
        i = int((diff - bound).argmax())
        raise ExportError(
            f"the {what} differs from the eager model by {float(diff[i]):.2e} in logit at logit "
            f"{float(ref[i]):.3g} (bound {relative:g} x (|logit| + {scale:.3g}) = {float(bound[i]):.2e}); "
            "the checkpoint's model does not export faithfully"
        )
    # The pooled features, the same form of bound, per stage: a feature is a sum over the layers before it like
    # the logit, and its scale is the image's mean |feature| at that stage. Measured on the demo and the trained
    # fixture: <= 7e-6 x (|feature| + scale), 70x under RTOL.
    for j, name in enumerate(FEATURE_STAGES if got_feats else ()):
        rf, gf = torch.cat([r[j] for r in ref_feats]), torch.cat([g[j] for g in got_feats])
        if not bool(((gf - rf).abs() <= relative * feature_scale(rf)).all()):
            raise ExportError(f"the {what}'s pooled {name} features differ from the eager model's by up to "
                              f"{float((gf - rf).abs().max()):.2e} (bound {relative:g} x (|feature| + the image's "
                              "mean |feature|)); the checkpoint's model does not export faithfully")
    # The probability a user gets: served pipeline (all views in one forward) against the eager model
    # one view at a time, on four photos.
    views = 8
    x = photos[6:10]
    with torch.inference_mode():
        p_exp = view_probabilities(exported(tta_views(x, views).contiguous()).float()[:, :1], len(x), views)
        per_view = torch.stack([eager(v[None]).float()[0, 0] for v in tta_views(x, views)]).reshape(views, len(x))
    p_ref = torch.sigmoid(per_view.double()).mean(0)
    p_bound = 0.25 * relative * (per_view.abs() + scale).double().mean(0)
    dp = (p_exp - p_ref).abs()
    if not bool((dp <= p_bound).all()):
        raise ExportError(f"the {what}'s probability through the serving pipeline differs from the eager "
                          f"model's by {float(dp.max()):.2e} (bound {float(p_bound.max()):.2e})")
    return worst


def _groups(out: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """N x (1 + D) -> [logit N x 1, then one N x d per feature stage]."""
    return [out[:, :1], *torch.split(out[:, 1:], list(sizes), dim=1)] if sizes else [out[:, :1]]


def verify_reduced(fp32: nn.Module, reference: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor],
                   image_size: int, precision: str, what: str, photos: torch.Tensor | None = None) -> dict[str, Any]:
    """The export check of a reduced-precision package (see REDUCED_MULTIPLE): `exported` against `reference`,
    the network run eagerly at `precision` (at_precision), with `fp32` (MalignancyLogit) measuring the
    reference's own error. On the images and noise of verify() in batches of 3, 8 and 5, plus four photos in
    their 8 TTA views in one batch (the served shape), the logit and each pooled stage of each input must satisfy
        max |exported - reference| / unit <= REDUCED_MULTIPLE x max(own, median own) + RTOL,
    own = max |reference - fp32| / unit on that input, unit = |logit| + scale for the logit (verify()) and
    feature_scale() for features. The median keeps one lucky input, whose own error happens to be ~0, from
    setting a bound below the rounding of any other compile. ExportError (never overridable) otherwise.
    `photos` replaces the generated images and drops the noise (int8: see verify()).

    Returns what the archive records: the multiple allowed, the worst multiple seen, and the precision's own
    error from fp32 on these inputs (its worst and its median, per output)."""
    from handler.pipeline import tta_views

    noise: list[torch.Tensor] = []
    if photos is None:
        photos, noise = verification_images(image_size), verification_noise(image_size)
    served = tta_views(photos[6:10], 8).contiguous()
    batches = [photos[:3], photos[3:11], photos[11:], *noise, served]
    kinds = ["photo"] * len(photos) + ["noise image"] * sum(len(n) for n in noise) + ["TTA view"] * len(served)
    fs, rs, cs = [], [], []
    sizes: list[int] = []
    with torch.inference_mode():
        for x in batches:
            f_logit, f_feats = eager_outputs(fp32, x)
            sizes = [f.shape[1] for f in f_feats]
            width = 1 + sum(sizes)
            r, c = reference(x).float(), exported(x).float()
            if r.shape != (len(x), width) and r.shape != (len(x), 1):
                raise ExportError(f"the eager {precision} network returns {tuple(r.shape)} for a batch of {len(x)}")
            if c.shape != r.shape:
                raise ExportError(f"export: the {what} returns {tuple(c.shape)} for a batch of {len(x)}, expected "
                                  f"{tuple(r.shape)}; nothing written (--force-precision does not override this)")
            fs.append([f_logit, *f_feats] if r.shape[1] > 1 else [f_logit])
            rs.append(_groups(r, sizes if r.shape[1] > 1 else ()))
            cs.append(_groups(c, sizes if r.shape[1] > 1 else ()))
    names = ["logit", *(f"pooled {n} features" for n in FEATURE_STAGES)]
    scale = max(1.0, float(torch.cat([f[0] for f in fs])[:len(photos)].abs().median()))
    record: dict[str, Any] = {"reference": f"the network run eagerly in {precision}", "multiple": REDUCED_MULTIPLE,
                              "worst_multiple": 0.0, "own_error": {}}
    for g in range(len(fs[0])):
        f, r, c = (torch.cat([b[g] for b in bs]) for bs in (fs, rs, cs))
        unit = f.abs() + scale if g == 0 else feature_scale(f)
        own = ((r - f).abs() / unit).amax(dim=1)
        got = ((c - r).abs() / unit).amax(dim=1)
        floor = float(own.median())
        base = own.clamp_min(floor)
        allowed = REDUCED_MULTIPLE * base + RTOL
        key = names[g].removeprefix("pooled ").removesuffix(" features")
        record["own_error"][key] = {"max": round(float(own.max()), 6), "median": round(floor, 6)}
        ratio = (got - RTOL).clamp_min(0) / base.clamp_min(1e-12)
        record["worst_multiple"] = max(record["worst_multiple"], round(float(ratio.max()), 4))
        if not bool((got <= allowed).all()):
            i = int((got - allowed).argmax())
            raise ExportError(
                f"export: the {what} does not compute what the network computes in {precision}: its {names[g]} "
                f"differ from the eager {precision} network's by {float(got[i]):.3g} (in the check's units) on a "
                f"{kinds[i]}, where {precision} itself is {float(own[i]):.3g} from fp32 (allowed "
                f"{REDUCED_MULTIPLE:g} x max({float(own[i]):.3g}, median {floor:.3g}) + {RTOL:g} = "
                f"{float(allowed[i]):.3g}); nothing written (--force-precision does not override this)")
    return record

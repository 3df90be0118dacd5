"""Checkpoint -> verified, frozen TorchScript that outputs one malignancy logit per image."""

from __future__ import annotations

import copy
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.checkpoint import LoadedCheckpoint, build_model, tensors_sha256
from handler.pipeline import load_model

DEMO_SEED = 20200817  # fixed: the demo archive is the same on every machine with the same torch
TRACE_TOLERANCE = 1e-4  # max |logit(trace) - logit(eager)|
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


class ExportError(Exception):
    pass


# bf16 export vs the fp32 eager model: bf16 keeps 8 significant bits, so its logit error grows with the
# logit (a trained head's logits reach |50| on noise inputs, where bf16's spacing is 0.25). A wrong graph
# misses by the size of the logit itself; the scores' real agreement is measured on the user's images.
BF16_TOLERANCE, BF16_RELATIVE = 0.1, 0.02


class Bfloat16Logit(nn.Module):
    """The model in bfloat16 weights and channels-last activations; takes and returns float32, so the
    pipeline around it is unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).float()


def demo_checkpoint(image_size: int = 128) -> LoadedCheckpoint:
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
        traced = torch.jit.trace(eager, example, check_trace=False)
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


def export_bf16(ckpt: LoadedCheckpoint, image_size: int) -> tuple[bytes, dict[str, Any]]:
    """The model in bf16, compiled ahead of time by AOTInductor into a .pt2 package.

    Why not TorchScript: its best bf16 (channels-last, frozen) ran the 8-view forward only 1.6-1.9x faster
    than fp32 here, its fused-kernel paths (oneDNN Graph) 3x slower; Inductor fuses the split-attention
    blocks' element-wise work and runs 1.9-2.2x (docs/PRECISION.md). The package holds native code for
    this CPU's vector ISA and this torch: both are recorded, and the loader refuses a mismatch rather
    than crash. Needs a C++ compiler now, none at serving time. Returns the package and what it needs.
    """
    compiler = cxx_compiler()
    if compiler is None:
        raise ExportError(f"--precision bf16 needs a C++ compiler to compile the model, and "
                          f"{os.environ.get('CXX') or 'g++'} was not found (sudo apt-get install g++, or set CXX)")
    import torch._inductor.config as inductor_config
    from torch._inductor import aoti_compile_and_package
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    reference = MalignancyLogit(ckpt.module, ckpt.outputs).eval()
    eager = Bfloat16Logit(copy.deepcopy(reference)).eval()
    example = torch.randn(8, 3, image_size, image_size)
    # A private Inductor cache: nothing from an earlier build is reused, nothing is left behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="melanoma-aoti.") as tmp, temporary_cache_dir(tmp):
        try:
            with inductor_config.patch({"freezing": True, "cpp.cxx": (None, compiler)}), torch.no_grad():
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.export.export(eager, (example,), dynamic_shapes=({0: batch},))
                path = aoti_compile_and_package(program, package_path=os.path.join(tmp, "model.pt2"))
                isa = pick_vec_isa()
            data = Path(path).read_bytes()
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"AOTInductor could not compile the bf16 model: {type(e).__name__}: {first}") from None
    del eager, program
    verify(reference, load_model(data, "bf16"), image_size, BF16_TOLERANCE, BF16_RELATIVE, "bf16 model")
    info = {"format": "aotinductor", "vec_isa": str(isa) if isa else "none",
            "cpu_flags": cpu_flags_for(isa.build_arch_flags()) if isa else [], "torch": torch.__version__}
    return data, info


STAGES = ("layer1", "layer2", "layer3", "layer4")
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


def verify(eager: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], image_size: int,
           tolerance: float = TRACE_TOLERANCE, relative: float = 0.0, what: str = "TorchScript export") -> float:
    """Max |exported - eager| logit over random batches; ExportError above tolerance + relative * |eager|."""
    gen = torch.Generator().manual_seed(0)
    worst = excess = 0.0
    for n in VERIFY_BATCHES:
        x = torch.randn(n, 3, image_size, image_size, generator=gen)
        with torch.inference_mode():
            ref = eager(x)
            got = exported(x)
        if got.shape != (n, 1):
            raise ExportError(f"exported model returns {tuple(got.shape)} for a batch of {n}, expected ({n}, 1)")
        diff = (got - ref).abs()
        worst = max(worst, float(diff.max()))
        excess = max(excess, float((diff - tolerance - relative * ref.abs()).max()))
    if not excess <= 0:
        bound = f"{tolerance:.0e}" + (f" + {relative:g} x |logit|" if relative else "")
        raise ExportError(
            f"the {what} differs from the eager model by {worst:.2e} in logit "
            f"(> {bound}); the checkpoint's model does not trace faithfully"
        )
    return worst

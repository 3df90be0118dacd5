"""Checkpoint -> verified, frozen TorchScript that outputs one malignancy logit per image."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

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


PRECISIONS = ("fp32", "bf16")
BF16_TOLERANCE = 0.1  # max |logit(trace) - logit(eager bf16)|: both bf16, only op order differs


class Bfloat16Logit(nn.Module):
    """The model in bfloat16 weights and channels-last activations (oneDNN's fastest bf16 path here,
    ~2x fp32 on AVX512-BF16); takes and returns float32, so the pipeline around it is unchanged."""

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


def export_torchscript(ckpt: LoadedCheckpoint, image_size: int, precision: str = "fp32") -> bytes:
    """Trace and freeze; return the serialized file after verifying it (reloaded and optimised exactly
    as handler/pipeline.py loads it) against the eager model: the bytes checked are the bytes shipped.
    Raises ExportError if they disagree. bf16 is verified against the eager model in bf16 here; its
    agreement with fp32 is measured on the user's images by build_mar.py."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    eager: nn.Module = MalignancyLogit(ckpt.module, ckpt.outputs).eval()
    if precision == "bf16":
        eager = Bfloat16Logit(copy.deepcopy(eager)).eval()
    example = torch.randn(2, 3, image_size, image_size)
    with torch.inference_mode():
        traced = torch.jit.trace(eager, example, check_trace=False)
    frozen = torch.jit.freeze(traced.eval())
    buf = io.BytesIO()
    torch.jit.save(frozen, buf)
    data = buf.getvalue()
    verify(eager, load_model(data, precision), image_size,
           TRACE_TOLERANCE if precision == "fp32" else BF16_TOLERANCE)
    return data


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
           tolerance: float = TRACE_TOLERANCE) -> float:
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in VERIFY_BATCHES:
        x = torch.randn(n, 3, image_size, image_size, generator=gen)
        with torch.inference_mode():
            ref = eager(x)
            got = exported(x)
        if got.shape != (n, 1):
            raise ExportError(f"exported model returns {tuple(got.shape)} for a batch of {n}, expected ({n}, 1)")
        worst = max(worst, float((got - ref).abs().max()))
    if not worst <= tolerance:
        raise ExportError(
            f"the TorchScript export differs from the eager model by {worst:.2e} in logit "
            f"(> {tolerance:.0e}); the checkpoint's model does not trace faithfully"
        )
    return worst

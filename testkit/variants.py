"""Checkpoints shaped like ones users bring: seeded ResNeSt variants and scaled heads (tests and bench)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from exporter.checkpoint import LoadedCheckpoint, build_model
from exporter.export import verification_images
from handler.pipeline import IMAGE_SIZE


def scaled(ckpt: LoadedCheckpoint, factor: float) -> LoadedCheckpoint:
    """The same network with its head scaled: logits `factor` times larger, as a more confident head gives."""
    module = copy.deepcopy(ckpt.module)
    with torch.no_grad():
        module.fc.weight.mul_(factor)
        module.fc.bias.mul_(factor)
    return LoadedCheckpoint(module, 1, ckpt.form, "scaled", [])


def seeded_variant(seed: int, reach: float = 30.0) -> nn.Module:
    """Seeded `resnest50_fast_4s1x64d` whose logits on the verification photos span -reach..+reach.

    BatchNorm running statistics are set to seeded values of the size trained networks carry (mean ~
    N(0, 0.2), log-variance ~ N(0, 0.5)). They are deliberately NOT estimated from photos with train-mode
    forwards: a randomly initialised ResNeSt normalised that way is chaotic (measured: its eager features
    differ by up to 45 % between a batch and one image at a time), so no export could be held to it. This
    construction is well conditioned (eager batch against single images: 3.7e-4 in logit at +-30).
    """
    torch.manual_seed(seed)
    model = build_model(1)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.exp(0.5 * torch.randn(m.num_features, generator=g)))
    model.eval()
    with torch.no_grad():
        logits = model(verification_images(IMAGE_SIZE))
        centre = logits.mean()
        k = reach / float((logits - centre).abs().max())
        model.fc.bias.sub_(centre).mul_(k)
        model.fc.weight.mul_(k)
    return model


def as_lightning(model: nn.Module) -> dict[str, object]:
    """A PyTorch Lightning checkpoint's layout (`model.` prefix, epoch/global_step) around `model`."""
    return {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0, "global_step": 0}

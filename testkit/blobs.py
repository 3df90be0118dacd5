"""A model whose head is fitted to respond to one dark blob, and images to point it at (Grad-CAM tests)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exporter.checkpoint import LoadedCheckpoint
from exporter.export import demo_checkpoint
from handler.pipeline import PipelineConfig, preprocess


def blob_image(size: int, center: tuple[float, float] | None, radius: float, seed: int) -> np.ndarray:
    """Flat skin-coloured square with mild noise and, if `center` (row, col) is given, one dark disc."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3))
    img[:] = [205.0, 150.0, 130.0]
    if center is not None:
        yy, xx = np.mgrid[0:size, 0:size]
        d = np.hypot(yy - center[0], xx - center[1])
        inside = 1 / (1 + np.exp((d - radius) / 1.5))
        img = img * (1 - inside[..., None]) + np.array([60.0, 35.0, 25.0]) * inside[..., None]
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_center(rng: np.random.Generator, size: int, radius: float) -> tuple[float, float]:
    lo, hi = radius + 4, size - radius - 4
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def fit_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> None:
    """Replace model.fc by a logistic regression of y on the pooled features of x (in place)."""
    fc = model.fc
    model.fc = nn.Identity()
    with torch.no_grad():
        feats = torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])
    model.fc = fc
    mu, sd = feats.mean(0), feats.std()  # one global scale: no feature's weight is blown up
    z = (feats - mu) / sd
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float()) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the fc layer
        fc.weight.copy_((w / sd)[None])
        fc.bias.copy_(b - (w * mu / sd).sum())


def blob_checkpoint(size: int = 256, radius: float = 28, n: int = 48, seed: int = 7) -> LoadedCheckpoint:
    """The demo backbone with a logistic-regression head fitted on pooled features to tell
    blob images from blank ones: a model whose logit responds to the blob, wherever it is."""
    ckpt = demo_checkpoint()
    model, cfg = ckpt.module, PipelineConfig()
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for i in range(n):
        has = i % 2 == 0
        images.append(blob_image(size, random_center(rng, size, radius) if has else None, radius, seed + i))
        targets.append(float(has))
    fit_head(model, torch.stack([preprocess(im, cfg) for im in images]), torch.tensor(targets))
    return LoadedCheckpoint(model, 1, "blob-fitted test model", "blob", ["head fitted to a dark blob"])

"""Class-activation heatmaps (LayerCAM; Grad-CAM for older archives) over the same decode -> preprocess ->
TTA path as handler/pipeline.py.

The archive's model.pt is frozen and optimised for inference (no autograd), so the build also packs
explain.pt: the same weights traced as two parts, `stage(x)` -> activations of one ResNeSt stage and
`rest(a)` -> malignancy logit. The probability always comes from pipeline.Scorer (the exact number
/predictions gives); explain.pt only provides the heatmap. Like pipeline.py, no TorchServe import.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from handler.archive import EXPLAIN_METHOD, EXPLAIN_METHODS, ArchiveMetadata, LoadedArchive, result
from handler.pipeline import InputError, PipelineConfig, Score, decode_image, load_tensor, tta_views, view_probabilities

# Heatmaps are upsampled to the input image's size, but no side beyond this: a 24 MP photo's full-size
# map would be ~200 MB of JSON (TorchServe's max_response_size is 6.5 MB by default).
MAX_HEATMAP_SIDE = 256
DECIMALS = 4
# explain.pt must reproduce the served probability; a larger gap means it does not belong to this
# model.pt, and no heatmap is better than a wrong one.
P_TOLERANCE = 1e-3


def untta(maps: torch.Tensor, n: int, views: int) -> torch.Tensor:
    """(views*N) x h x w maps, one per TTA view (pipeline.tta_views order), -> views x N x h x w,
    each mapped back to the original image's orientation (the inverse of the view's flips/transpose)."""
    m = maps.reshape(views, n, *maps.shape[1:])
    undo = [
        lambda a: a, lambda a: a.flip(-1), lambda a: a.flip(-2), lambda a: a.flip(-2, -1),
        # views 4..7 are flips of the transpose: undo the flip, then transpose back
        lambda a: a.transpose(-2, -1), lambda a: a.flip(-1).transpose(-2, -1),
        lambda a: a.flip(-2).transpose(-2, -1), lambda a: a.flip(-2, -1).transpose(-2, -1),
    ]
    return torch.stack([undo[v](m[v]) for v in range(views)])


def cam_map(method: str, a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """B x C x h x w activations and d logit / d activations -> B x h x w map of evidence for the logit."""
    if method == "layer-cam":
        return (torch.relu(grad) * a).sum(dim=1).clamp_min(0)  # activations are post-ReLU; clamp for safety
    if method == "grad-cam":
        weights = grad.mean(dim=(2, 3), keepdim=True)  # channel weight = mean gradient
        return torch.relu((weights * a).sum(dim=1))
    raise ValueError(f"unknown explanation method {method!r}; known: {', '.join(EXPLAIN_METHODS)}")


class Explainer:
    """A class-activation map of the malignancy logit at one stage, averaged over the TTA views."""

    def __init__(self, parts: torch.jit.ScriptModule, cfg: PipelineConfig, layer: str,
                 method: str = EXPLAIN_METHOD) -> None:
        if method not in EXPLAIN_METHODS:
            raise ValueError(f"unknown explanation method {method!r}; known: {', '.join(EXPLAIN_METHODS)}")
        self.parts = parts
        self.cfg = cfg
        self.layer = layer
        self.method = method

    def cams(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (N x h x w maps in [0, 1] at the stage's resolution, 1 at each map's own peak; the N peaks
        (the raw map's maximum, logit per activation unit); (views*N) logits).

        LayerCAM maps are min-max normalised, as in its authors' code: LayerCAM credits every positive
        gradient, so features that fire on all skin give a floor under the whole map (on a linear probe of
        the untrained demo backbone, ~0.7 of the peak), which would otherwise hide where the evidence stands out.
        Grad-CAM's maps are divided by their peak only, as archives built before LayerCAM did."""
        x = torch.stack(list(tensors))
        batch = tta_views(x, self.cfg.tta_views).contiguous()
        with torch.no_grad():
            a = self.parts.stage(batch)
        a.requires_grad_(True)
        with torch.enable_grad():
            logits = self.parts.rest(a)
            (grad,) = torch.autograd.grad(logits.sum(), a)
        cam = cam_map(self.method, a.detach(), grad).double()
        cam = untta(cam, len(tensors), self.cfg.tta_views).mean(dim=0)
        peak = cam.amax(dim=(1, 2), keepdim=True)
        floor = cam.amin(dim=(1, 2), keepdim=True) if self.method == "layer-cam" else torch.zeros_like(peak)
        span = peak - floor  # 0 when no position raised the logit, or when none stands out from the rest
        cam = torch.where(span > 0, (cam - floor) / span.clamp_min(1e-30), torch.zeros_like(cam))
        return cam, peak.reshape(-1), logits.detach().reshape(-1)


def load_explainer(archive: LoadedArchive) -> Explainer:
    info = archive.metadata.explain or {}
    if not info or not archive.has_member(info["file"]):
        raise InputError("this archive was built without explanations (build_mar.sh --no-explain); "
                         "rebuild it without that flag", 501)
    parts = torch.jit.load(archive.open_member(info["file"]), map_location="cpu").eval()
    for p in parts.parameters():
        p.requires_grad_(False)
    return Explainer(parts, archive.cfg, str(info["layer"]), str(info["method"]))


def original_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the image as a viewer shows it (EXIF rotation applied), from the header."""
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
        width, height = height, width
    return height, width


def heatmap_size(height: int, width: int, max_side: int = MAX_HEATMAP_SIDE) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """h x w map -> size, bilinear (the model saw the whole image stretched to a square, so the map
    stretches back over the whole image), clipped to [0, 1]."""
    up = torch.nn.functional.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)
    return up[0, 0].clamp(0, 1).numpy()


def colorize(heat: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB through OpenCV's Turbo colour map (perceptually ordered: dark blue at 0, dark red at 1)."""
    levels = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_TURBO)[..., ::-1].copy()  # OpenCV answers BGR


def overlay_png(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """The photo (EXIF-rotated, as a viewer shows it) at the heatmap's size, the coloured heatmap over it."""
    h, w = heat.shape
    photo = Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR)
    blend = Image.blend(photo, Image.fromarray(colorize(heat)), alpha)
    buf = io.BytesIO()
    blend.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def explain_images(explainer: Explainer, images: Sequence[bytes], scores: Sequence[Score],
                   model_info: ArchiveMetadata, overlay: Sequence[bool],
                   tensors: Sequence[torch.Tensor] | None = None,
                   checks: Sequence[dict[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    """Responses for images whose scores pipeline.Scorer gave: result() plus `explanation`.
    `tensors`: the images already preprocessed for that score (else they are decoded here)."""
    cfg = explainer.cfg
    # explain.pt is always fp32: beside a bf16 model.pt the two agree only within the build's measured bound.
    tolerance = max(P_TOLERANCE, 2 * float(model_info.precision.get("bound", 0.0)))
    if tensors is None:
        tensors = [load_tensor(d, cfg) for d in images]
    cams, peaks, logits = explainer.cams(tensors)
    # the served probability's own function (calibration included)
    check = view_probabilities(logits[:, None], len(images), cfg.tta_views, cfg.temperature)
    probabilities = [s.probability for s in scores]
    out = []
    for i, data in enumerate(images):
        if abs(float(check[i]) - probabilities[i]) > tolerance:
            raise RuntimeError(f"explain.pt disagrees with model.pt (p {float(check[i]):.6f} vs "
                               f"{probabilities[i]:.6f}): the archive is inconsistent")
        height, width = original_size(data)
        size = heatmap_size(height, width)
        # One scale for every image: the map relative to its own peak, times the probability. Its grid's
        # brightest cell is the probability, so a p = 0.02 image shows a cold map and p = 0.98 a hot one.
        heat = upsample(cams[i], size) * probabilities[i]
        body = result(scores[i], cfg, model_info, None if checks is None else checks[i])
        body["explanation"] = {
            "method": explainer.method,
            "layer": explainer.layer,
            "views_averaged": cfg.tta_views,
            "grid": list(cams[i].shape),
            "image_size": [height, width],
            "shape": list(size),
            "scale": "probability",
            "peak": float(f"{float(peaks[i]):.6g}"),
            "heatmap": np.round(heat, DECIMALS).tolist(),
            # The map keeps positive evidence for "malignant" only: a map of zeros means no region raised
            # the malignancy logit, or none more than the rest (common for clearly benign scores), not a failure.
            "no_positive_evidence": bool(cams[i].max() <= 0),
        }
        if overlay[i]:
            png = overlay_png(decode_image(data, cfg), heat)  # the photo itself is needed only here
            body["explanation"]["overlay_png"] = base64.b64encode(png).decode()
        out.append(body)
    return out

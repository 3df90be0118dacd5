"""LayerCAM (and Grad-CAM, for older archives) without a server: the maps' formulas, TTA un-mapping,
heatmap range/shape, mirror symmetry, and that the peak lands on the one structure a model was fitted to
respond to. Uses explain.pt exactly as build_mar.sh makes it."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exporter.export import EXPLAIN_LAYER, export_explainer
from handler.archive import ArchiveMetadata, LoadedArchive, load_archive
from handler.explain import (
    Explainer,
    explain_images,
    heatmap_size,
    load_explainer,
    original_size,
    untta,
    upsample,
)
from handler.pipeline import InputError, PipelineConfig, Score, Scorer, load_tensor, tta_views
from handler.request import request_headers, wants_overlay
from testkit.blobs import blob_checkpoint, blob_image, random_center
from testkit.imaging import encode, jpeg_with_orientation, lesion_rgb

CFG = PipelineConfig()


@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_untta_inverts_every_view(views: int) -> None:
    maps = torch.arange(2 * 6 * 6, dtype=torch.float64).reshape(2, 1, 6, 6)  # asymmetric, 2 images
    viewed = tta_views(maps, views)[:, 0]  # what each view "sees", in view order
    back = untta(viewed, 2, views)
    assert back.shape == (views, 2, 6, 6)
    for v in range(views):
        assert torch.equal(back[v], maps[:, 0]), f"view {v}"


def _explainer(ckpt) -> Explainer:  # noqa: ANN001
    parts = torch.jit.load(io.BytesIO(export_explainer(ckpt, CFG.image_size))).eval()
    return Explainer(parts, CFG, EXPLAIN_LAYER)


def _archived(archive: Path) -> Explainer:
    """The explain.pt an archive ships (build_mar exported and verified it): no second export here."""
    return load_explainer(load_archive(archive))


@pytest.fixture(scope="module")
def demo_explainer(demo_archive: Path) -> Explainer:
    return _archived(demo_archive)


def test_map_formulas() -> None:
    """LayerCAM: sum over channels of ReLU(gradient) x activation, per position; Grad-CAM: ReLU of the sum
    of activations weighted by each channel's mean gradient. Checked on random tensors with float64 sums."""
    from handler.explain import cam_map

    g = torch.Generator().manual_seed(0)
    a, grad = torch.rand(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    layer = np.einsum("bchw,bchw->bhw", np.maximum(grad.numpy(), 0).astype(np.float64), a.numpy())
    assert np.allclose(cam_map("layer-cam", a, grad).numpy(), layer, rtol=1e-6, atol=1e-6)
    w = grad.numpy().astype(np.float64).mean(axis=(2, 3))
    grad_cam = np.maximum(np.einsum("bc,bchw->bhw", w, a.numpy()), 0)
    assert np.allclose(cam_map("grad-cam", a, grad).numpy(), grad_cam, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="score-cam"):
        cam_map("score-cam", a, grad)


def test_heatmaps_finite_in_range_and_shaped(demo_explainer: Explainer) -> None:
    images = [encode(lesion_rgb(240, 320, seed=s)) for s in range(3)]
    cams, peaks, logits = demo_explainer.cams([load_tensor(d, CFG) for d in images])
    assert cams.shape == (3, 8, 8) and peaks.shape == (3,) and logits.shape == (24,)
    bodies = explain_images(demo_explainer, images, [Score(float(p), float(p)) for p in torch.sigmoid(
        logits.double().reshape(8, 3)).mean(0)], ArchiveMetadata(demo=True), [False, True, False])
    for body, peak in zip(bodies, peaks, strict=True):
        e = body["explanation"]
        heat = np.array(e["heatmap"])
        assert e["shape"] == [192, 256] and e["image_size"] == [240, 320] and heat.shape == (192, 256)
        assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= body["probability"] + 1e-4
        # one scale: the grid's brightest cell is the probability; bilinear samples within 1/48 of a cell of it
        # keep >= (1 - 1/48)^2 > 0.95 of it
        p = body["probability"]
        assert heat.max() == 0 if e["no_positive_evidence"] else 0.95 * p <= heat.max() <= p + 1e-4
        assert e["scale"] == "probability" and e["peak"] == pytest.approx(float(peak), rel=1e-5)
        assert e["layer"] == "layer3" and e["grid"] == [8, 8] and e["views_averaged"] == 8
        assert e["method"] == "layer-cam"
    assert sum(not b["explanation"]["no_positive_evidence"] for b in bodies) >= 1  # not vacuous
    png = Image.open(io.BytesIO(base64.b64decode(bodies[1]["explanation"]["overlay_png"])))
    assert png.format == "PNG" and png.size == (256, 192)
    assert "overlay_png" not in bodies[0]["explanation"]


def test_flipped_image_gives_mirrored_heatmap(demo_explainer: Explainer) -> None:
    rgb = lesion_rgb(240, 320, seed=1)
    a, _, _ = demo_explainer.cams([load_tensor(encode(rgb, "PNG"), CFG)])
    b, _, _ = demo_explainer.cams([load_tensor(encode(rgb[:, ::-1].copy(), "PNG"), CFG)])
    assert float(a.max()) == 1.0  # a map with a peak, or the comparison would be vacuous
    assert float((a[0] - b[0].flip(-1)).abs().max()) <= 1e-5
    c, _, _ = demo_explainer.cams([load_tensor(encode(rgb[::-1].copy(), "PNG"), CFG)])  # and vertically
    assert float((a[0] - c[0].flip(-2)).abs().max()) <= 1e-5


@pytest.mark.slow  # full depth only: not a main path, and ~30-60 s here
def test_heatmap_peak_falls_inside_the_blob() -> None:
    """A model whose head is fitted to respond to a dark blob: the heatmap's peak is on the blob,
    wherever the blob is (the pointing game of docs/EXPLANATIONS.md, 8 placements)."""
    ex = _explainer(blob_checkpoint())
    size, radius = 256, 28
    rng = np.random.default_rng(99)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(8):
        cy, cx = random_center(rng, size, radius)
        data = encode(blob_image(size, (cy, cx), radius, seed=500 + i), "PNG")
        cams, _, _ = ex.cams([load_tensor(data, CFG)])
        heat = upsample(cams[0], (size, size))
        py, px = np.unravel_index(np.argmax(heat), heat.shape)
        assert np.hypot(py - cy, px - cx) <= radius, f"placement {i}: peak ({py},{px}) vs blob ({cy:.0f},{cx:.0f})"
        assert heat[np.hypot(yy - cy, xx - cx) <= radius].mean() > 3 * heat.mean() / 2


@pytest.mark.slow
def test_trained_fixture_heatmap_peaks_on_the_lesion(trained_archive: Path) -> None:
    """The trained fixture (train/ on the synthetic task): for images of the positive class, the map's
    peak lies on the lesion (within one cell of the 8x8 map: what its border and patch look like is the
    evidence) and the map is hotter on the lesion than off it, wherever the lesion is."""
    from scipy import ndimage

    from train.synthetic import lesion_and_mask

    ex = _archived(trained_archive)
    rng = np.random.default_rng(2024)
    for i in range(8):
        img, mask = lesion_and_mask(1, rng)
        cams, _, logits = ex.cams([load_tensor(encode(img, "PNG"), CFG)])
        assert float(torch.sigmoid(logits.double()).mean()) > 0.5, f"image {i} is scored as its class"
        heat = upsample(cams[0], mask.shape)
        py, px = np.unravel_index(np.argmax(heat), heat.shape)
        distance = ndimage.distance_transform_edt(~mask)[py, px]
        assert distance <= mask.shape[0] / 8, f"image {i}: peak ({py},{px}) {distance:.0f} px off the lesion"
        assert heat[mask].mean() > 3 * heat[~mask].mean(), f"image {i}"


def test_sizes_follow_the_viewer() -> None:
    rgb = lesion_rgb(120, 200, seed=1)
    assert original_size(encode(rgb)) == (120, 200)
    assert original_size(jpeg_with_orientation(rgb, 6)) == (200, 120)  # rotated 90 degrees by EXIF
    assert heatmap_size(120, 200) == (120, 200)
    assert heatmap_size(3000, 4000) == (192, 256)
    assert heatmap_size(4000, 10) == (256, 1)


def test_archive_without_explain_answers_501() -> None:
    archive = LoadedArchive(Scorer(lambda x: x, CFG), CFG, ArchiveMetadata(), 1, Path("/nonexistent"))
    with pytest.raises(InputError) as e:
        load_explainer(archive)
    assert e.value.status == 501 and "--no-explain" in str(e.value)


class _Context:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.headers.get(key)


@pytest.mark.parametrize("row,headers,expected", [
    ({"body": bytearray(b"x")}, {}, False),
    ({"data": b"x", "overlay": bytearray(b"true")}, {}, True),
    ({"data": b"x", "overlay": bytearray(b"0")}, {}, False),
    ({"body": {"image": "eA==", "overlay": True}}, {}, True),
    ({"body": {"image": "eA==", "overlay": "no"}}, {}, False),
    ({"body": bytearray(b"x")}, {"X-Overlay": "true"}, True),
    ({"body": bytearray(b"x")}, {"x-overlay": "1"}, True),
])
def test_overlay_request(row: dict, headers: dict[str, str], expected: bool) -> None:
    assert wants_overlay(row, request_headers(_Context(headers), 0)) is expected


@pytest.mark.slow
def test_one_scale_low_probability_shows_a_cold_map(trained_archive: Path) -> None:
    """Maps share one scale (relative map x probability): a benign-scored image's brightest cell is its low
    probability, a malignant-scored one's its high probability, and the overlay colours follow."""
    from train.synthetic import lesion_and_mask

    ex = _archived(trained_archive)
    rng = np.random.default_rng(7)
    labels = [0, 0, 0, 1, 1, 1]
    images = [encode(lesion_and_mask(label, rng)[0], "PNG") for label in labels]
    _, peaks, logits = ex.cams([load_tensor(d, CFG) for d in images])
    probs = [float(p) for p in torch.sigmoid(logits.double().reshape(8, len(images))).mean(0)]
    bodies = explain_images(ex, images, [Score(p, p) for p in probs], ArchiveMetadata(), [False] * len(images))
    for label, body, p, peak in zip(labels, bodies, probs, peaks, strict=True):
        assert (p > 0.5) == bool(label), (label, p)  # each image is scored as its class
        top = np.array(body["explanation"]["heatmap"]).max()
        if float(peak) > 0:
            assert 0.95 * p <= top <= p + 1e-4, (top, p)  # the brightest cell is the probability
        else:  # no region raised the malignancy logit: an empty map, said so
            assert top == 0 and body["explanation"]["no_positive_evidence"]
        assert top <= p + 1e-4  # a benign score never shows a hot cell (per-image scaling showed every map at 1.0)
    assert any(float(peak) > 0 for peak in peaks[3:])  # not vacuous: a malignant-scored map with evidence


def test_colours_come_from_opencv_turbo() -> None:
    from handler.explain import colorize

    rgb = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    cold, hot = rgb[0, 0].astype(int), rgb[0, 2].astype(int)
    assert cold[2] > cold[0] and hot[0] > hot[2]  # blue at 0, red at 1

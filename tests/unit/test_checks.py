"""Input checks (handler/checks.py, exporter/ood.py): the fixed quality rules, the out-of-distribution fit's
arithmetic, and the issue's acceptance on the demo and the trained fixture, through the exported model exactly
as an archive serves it. The checks never change the score."""

from __future__ import annotations

import io
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from exporter.checkpoint import LoadedCheckpoint
from exporter.export import (
    FEATURE_STAGES,
    LogitAndFeatures,
    MalignancyLogit,
    demo_checkpoint,
    feature_sizes,
)
from exporter.ood import fit, fit_gaussian, ledoit_wolf
from handler.archive import load_archive, load_model
from handler.checks import OodModel, QualityLimits, quality, run_checks
from handler.pipeline import PipelineConfig, Scorer, decode, preprocess, resize
from testkit.imaging import encode, jpeg_with_orientation
from testkit.nonlesion import KINDS, nonlesion_images
from train.synthetic import lesion

CFG = PipelineConfig()
LIMITS = QualityLimits()


def _lesions(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [lesion(int(rng.random() < 0.5), rng) for _ in range(n)]


def _dense_distance(x: np.ndarray, fitted: np.ndarray, k: int) -> np.ndarray:
    """The distance straight from its definition: the dense shrunk covariance, its rank-k eigen part kept and
    the rest at their mean variance, inverted by numpy."""
    mean, cov, mu, s = ledoit_wolf(fitted)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    rest = evals[k:].mean() if k < len(evals) else 0.0
    lam = np.concatenate([evals[:k], np.full(len(evals) - k, rest)])
    sigma = evecs @ np.diag((1 - s) * lam + s * mu) @ evecs.T
    d = x - mean
    return np.sqrt(np.einsum("ij,jk,ik->i", d, np.linalg.inv(sigma), d))


@pytest.mark.parametrize("n,p", [(30, 12), (12, 30), (40, 300)])
def test_mahalanobis_matches_the_dense_shrunk_covariance(n: int, p: int) -> None:
    rng = np.random.default_rng(n * p)
    fitted = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) * rng.uniform(0.1, 3, p)
    x = rng.normal(size=(5, p)) * 2
    g, s = fit_gaussian(fitted)
    assert 0 < s <= 1
    k = len(g.variances)
    np.testing.assert_allclose(g.distance(x), _dense_distance(x, fitted, k), rtol=1e-8)
    assert float(g.distance(g.mean)[0]) == 0.0


def test_ledoit_wolf_shrinkage_is_small_for_plenty_of_data_and_large_for_little() -> None:
    rng = np.random.default_rng(0)
    p = 20
    assert ledoit_wolf(rng.normal(size=(5000, p)) * np.linspace(1, 3, p))[3] < 0.05
    assert ledoit_wolf(rng.normal(size=(10, p)))[3] > 0.3  # isotropic truth: shrink hard toward mu I


def test_ood_model_round_trips_through_its_file_without_pickle() -> None:
    rng = np.random.default_rng(1)
    sizes = (8, 16)
    feats = rng.normal(size=(40, 24))
    model, record = fit(feats, ("a", "b"), sizes, np.arange(40) // 2)
    again = OodModel.from_bytes(model.to_bytes())
    x = rng.normal(size=(6, 24)) * 3
    np.testing.assert_allclose(again.distance(x), model.distance(x), rtol=1e-6)  # components stored float32
    assert again.threshold == model.threshold == record["threshold"] and again.stages == ("a", "b")
    with np.load(io.BytesIO(model.to_bytes()), allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    # in-sample images sit below their own out-of-fold limit
    assert record["validation_flagged"] <= 0.05


def test_photo_size_is_the_one_sent_even_when_decoded_at_a_reduced_scale() -> None:
    rgb = np.zeros((600, 1000, 3), np.uint8)
    rgb[100:500, 200:800] = 180
    small, size = decode(encode(rgb, "JPEG"), CFG)
    assert size == (1000, 600) and small.shape[0] < 600  # decoded at 1/2
    turned, size = decode(jpeg_with_orientation(rgb, 6), CFG)  # EXIF: rotate 90
    assert size == (600, 1000) and turned.shape[0] > turned.shape[1]
    assert decode(encode(rgb[:50, :90], "PNG"), CFG)[1] == (90, 50)


def test_quality_rules_flag_tiny_blurred_and_badly_exposed_images_and_pass_lesions() -> None:
    lesions = _lesions(40, seed=11)
    for img in lesions:
        q = quality(img.shape[1], img.shape[0], resize(img, CFG), LIMITS)
        assert not any(v["flagged"] for v in q.values()), q
    for img in lesions[:10]:
        scale = img.shape[0] / CFG.image_size
        tiny = cv2.resize(img, (48, 48), interpolation=cv2.INTER_AREA)
        blurred = cv2.GaussianBlur(img, (0, 0), 2.0 * scale)  # sigma 2 px at the model's input size
        over = np.clip(img.astype(np.float64) * 1.9, 0, 255).astype(np.uint8)
        under = (img * 0.15).astype(np.uint8)
        assert quality(48, 48, resize(tiny, CFG), LIMITS)["resolution"]["flagged"]
        assert quality(*img.shape[1::-1], resize(blurred, CFG), LIMITS)["blur"]["flagged"]
        for bad in (over, under):
            assert quality(*img.shape[1::-1], resize(bad, CFG), LIMITS)["exposure"]["flagged"]


def test_checks_without_a_fit_say_why_and_pass_on_quality_alone() -> None:
    img = _lesions(1, seed=3)[0]
    c = run_checks(img.shape[1], img.shape[0], resize(img, CFG), None, LIMITS, None)
    assert c["out_of_distribution"]["flagged"] is None and "rebuild" in c["out_of_distribution"]["reason"]
    assert c["passed"] and c["warnings"] == []


# --- acceptance: the demo and the trained fixture, exported as an archive serves them ---------------------

@pytest.fixture(scope="module")
def images() -> dict[str, list[np.ndarray]]:
    return {"validation": _lesions(96, seed=2), "heldout": _lesions(96, seed=1),
            "nonlesion": [im for _, im in nonlesion_images(25, seed=0)]}


@pytest.mark.slow  # a statistical sweep: ~200 images x 8 views on each network
def test_out_of_distribution_flags_non_lesions_and_not_lesions(weights: str, checkpoint_of: LoadedCheckpoint,
                                                                 archive_of: Path,
                                                                 images: dict[str, list[np.ndarray]]) -> None:
    ckpt = checkpoint_of
    scorer = load_archive(archive_of).scorer  # the model.pt the archive serves (no second export)
    assert scorer.cfg == CFG
    sizes = feature_sizes(ckpt)
    assert list(sizes) == list(FEATURE_STAGES)

    def run(imgs: list[np.ndarray]) -> tuple[list[float], np.ndarray]:
        probs, feats = [], []
        for i in range(0, len(imgs), 8):
            tensors = [preprocess(im, CFG) for im in imgs[i:i + 8]]
            scores, f = scorer.score_and_features(tensors)
            assert f is not None and f.shape == (len(tensors), sum(sizes.values()))
            probs += [s.probability for s in scores]
            feats.append(f)
        return probs, np.concatenate(feats)

    _, fv = run(images["validation"])
    groups = np.arange(len(fv)) // 3  # write_dataset's three photos per patient
    model, record = fit(fv, list(sizes), list(sizes.values()), groups)
    held_p, fh = run(images["heldout"])
    _, fn = run(images["nonlesion"])
    held, non = model.distance(fh) > model.threshold, model.distance(fn) > model.threshold
    kinds = np.repeat(KINDS, 25)
    print(f"{weights}: threshold {model.threshold:.3f}; held-out lesions flagged {held.mean():.3f}; non-lesions "
          f"{non.mean():.3f} ({', '.join(f'{k} {non[kinds == k].mean():.2f}' for k in KINDS)})")
    assert non.mean() >= 0.90
    assert held.mean() <= 0.05
    # The logit column of the model with features is the logit-only model's: same probabilities.
    plain = torch.jit.freeze(torch.jit.trace(MalignancyLogit(ckpt.module, ckpt.outputs).eval(),
                                             torch.zeros(2, 3, 128, 128), check_trace=False).eval())
    buf = io.BytesIO()
    torch.jit.save(plain, buf)
    plain_scorer = Scorer(load_model(buf.getvalue()), CFG)
    for i in range(0, 16, 8):
        want = plain_scorer.predict([preprocess(im, CFG) for im in images["heldout"][i:i + 8]])
        assert np.abs(np.array(want) - np.array(held_p[i:i + 8])).max() <= 1e-6


def test_the_served_module_outputs_the_logit_then_the_pooled_stages() -> None:
    ckpt = demo_checkpoint()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = LogitAndFeatures(ckpt.module, 1).eval()(x)
        ref = MalignancyLogit(ckpt.module, 1).eval()(x)
    assert out.shape == (2, 1 + 512 + 1024 + 2048)
    assert torch.equal(out[:, :1], ref)


def test_fixed_limits_are_recorded_with_the_archive_defaults() -> None:
    assert QualityLimits.from_mapping(QualityLimits().to_mapping()) == QualityLimits()


@pytest.mark.parametrize("values,words", [
    ({"min_side": 0}, "min_side must be a whole number of pixels >= 1"),
    ({"min_side": 12.5}, "min_side must be a whole number of pixels >= 1"),
    ({"min_sharpness": -1.0}, "min_sharpness must be >= 0"),
    ({"min_sharpness": float("nan")}, "min_sharpness must be a finite number"),
    ({"max_clipped": 0.0}, "max_clipped must be in (0, 1]"),
    ({"max_clipped": 1.5}, "max_clipped must be in (0, 1]"),
    ({"min_median": 200.0, "max_median": 100.0}, "0 <= low < high <= 255"),
    ({"max_median": 300.0}, "0 <= low < high <= 255"),
])
def test_limits_off_their_scale_are_refused(values: dict[str, float], words: str) -> None:
    """Where a limit is set (build_mar.sh) and where it is read back (metadata.json), with the rule it breaks."""
    with pytest.raises(ValueError, match=re.escape(words)):
        QualityLimits(**values)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(words)):
        QualityLimits.from_mapping({**QualityLimits().to_mapping(), **values})
    edge = QualityLimits(min_side=1, min_sharpness=0.0, max_clipped=1.0, min_median=0.0, max_median=255.0)
    assert QualityLimits.from_mapping(edge.to_mapping()) == edge  # the widest limits are allowed

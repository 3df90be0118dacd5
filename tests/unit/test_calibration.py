"""Temperature scaling, the operating point and their metrics, without a model: synthetic logits whose true
probabilities are known. The archive-level checks (built, served, on the trained fixture) are in
tests/integration/test_calibrated_archive.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.calibration import (
    CalibrationError,
    ValidationScores,
    calibration_record,
    fit_temperature,
    operating_point,
    score_validation_set,
)
from handler.archive import ArchiveError, ArchiveMetadata, check_contract, result
from handler.pipeline import PipelineConfig, Score, Scorer, view_probabilities
from isic import metrics

VIEWS = 8


def calibrated_set(n: int, seed: int, scale: float = 1.0, patients: int = 1, views: int = VIEWS) -> ValidationScores:
    """Labels drawn from sigmoid(z): a model whose logits z are calibrated, times `scale`. The views wobble
    around z a little, as TTA views do."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    views = (z[None, :] + rng.normal(0, 0.05, (views, n)) * (views > 1)) * scale
    groups = np.array([f"P{i // patients}" for i in range(n)])
    return ValidationScores([f"img{i}" for i in range(n)], y, groups, views.astype(np.float32), [])


def test_probabilities_are_the_served_function() -> None:
    s = calibrated_set(50, 0)
    for t in (1.0, 2.5):
        served = view_probabilities(torch.from_numpy(s.logits).reshape(-1, 1), 50, VIEWS, t).numpy()
        assert np.array_equal(s.probabilities(t), served)
    raw = (1 / (1 + np.exp(-s.logits.astype(np.float64)))).mean(axis=0)
    assert np.allclose(s.probabilities(), raw, rtol=0, atol=1e-12)
    manual = 1 / (1 + np.exp(-np.log(raw / (1 - raw)) / 2.5))  # the TTA score is calibrated, not each view
    assert np.allclose(s.probabilities(2.5), manual, rtol=0, atol=1e-12)


def test_over_confident_head_recovers_its_temperature_and_ece_drops() -> None:
    """The issue's acceptance on a model known to be calibrated: logits x 3 -> T within 10 % of 3 (here within
    the sampling error of 4000 labels), and held-out ECE at least halved."""
    fit_on, held = calibrated_set(4000, 1, scale=3.0), calibrated_set(4000, 2, scale=3.0)
    t = fit_temperature(fit_on)
    assert abs(t - 3.0) <= 0.3, t
    before = metrics.expected_calibration_error(held.y, held.probabilities())
    after = metrics.expected_calibration_error(held.y, held.probabilities(t))
    assert after <= before / 2, (before, after)
    rec = calibration_record(fit_on, t)
    assert rec["temperature"] == t and rec["images"] == 4000 and rec["ece_after"] < rec["ece_before"]
    assert rec["brier_after"] < rec["brier_before"] and rec["nll_after"] < rec["nll_before"]


def test_temperature_follows_the_logit_scale() -> None:
    """One view: NLL(T; k*z) = NLL(T/k; z), so the fitted temperature scales with the logits exactly (optimiser
    and rounding only). With 8 views it holds as far as the views agree (the x3 test above)."""
    base = calibrated_set(600, 3, views=1)
    t1 = fit_temperature(base)
    for k in (0.5, 3.0):
        scaled = ValidationScores(base.names, base.y, base.groups, base.logits * np.float32(k), [])
        assert abs(fit_temperature(scaled) / t1 - k) <= 1e-4 * k


def test_temperature_keeps_the_ranking() -> None:
    """Monotone in the raw TTA score: the order of the images, and so the AUC, do not change."""
    s = calibrated_set(500, 4, scale=3.0)
    t = fit_temperature(s)
    raw, cal = s.probabilities(), s.probabilities(t)
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(cal[order]) >= 0) and not np.array_equal(raw, cal)
    assert abs(metrics.auc(s.y, raw) - metrics.auc(s.y, cal)) <= 1e-12


def test_a_set_the_model_cannot_separate_is_refused() -> None:
    s = calibrated_set(400, 5)
    noise = ValidationScores(s.names, s.y, s.groups, np.ones_like(s.logits), [])  # one score for every image
    with pytest.raises(CalibrationError, match="edge"):
        fit_temperature(noise)


@pytest.mark.parametrize("goal,value", [("sensitivity", 0.95), ("specificity", 0.9), ("sensitivity", 0.5)])
def test_operating_point_reaches_its_goal(goal: str, value: float) -> None:
    s = calibrated_set(800, 6, scale=3.0, patients=4)
    t = fit_temperature(s)
    op = operating_point(s, t, goal, value)
    p = s.probabilities(t)
    sens, spec = metrics.sens_spec(s.y, p, op["threshold"])
    assert (op["sensitivity"], op["specificity"]) == pytest.approx((sens, spec), abs=1e-6)
    assert (sens if goal == "sensitivity" else spec) >= value
    # the closest threshold that does: one step further would miss the goal
    scores = np.unique(p)
    i = int(np.searchsorted(scores, op["threshold"]))
    step = scores[i + 1] if goal == "sensitivity" else scores[i - 1]
    assert metrics.sens_spec(s.y, p, step)[0 if goal == "sensitivity" else 1] < value
    lo, hi = op[f"{goal}_95ci"]
    assert lo <= op[goal] <= hi and hi - lo > 0 and op["bootstrap"] == "patient"


def test_patient_bootstrap_is_wider_than_the_image_bootstrap() -> None:
    """Images of one patient are alike: resampling images as if independent understates the uncertainty."""
    rng = np.random.default_rng(7)
    patient_logit = rng.normal(0, 2, 60)
    z = np.repeat(patient_logit, 8) + rng.normal(0, 0.1, 480)
    y = np.repeat((rng.random(60) < 0.5).astype(int), 8)
    groups = np.repeat(np.arange(60), 8)
    img = metrics.bootstrap_ci(y, z, metrics.auc)
    pat = metrics.bootstrap_ci(y, z, metrics.auc, groups=groups)
    assert (pat[1] - pat[0]) > 1.5 * (img[1] - img[0])


def test_ece_and_brier() -> None:
    y = np.array([0, 0, 1, 1])
    assert metrics.brier(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0
    assert metrics.brier(y, np.array([0.5] * 4)) == 0.25
    assert metrics.expected_calibration_error(y, np.array([0.5] * 4)) == 0  # 50 % said, 50 % true
    assert metrics.expected_calibration_error(y, np.array([0.9] * 4)) == pytest.approx(0.4)
    assert metrics.expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0


def test_specificity_threshold() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.9])
    t, sens, spec = metrics.threshold_for_specificity(y, p, 0.75)
    assert (t, sens, spec) == (0.7, 1.0, 0.75)
    t, sens, spec = metrics.threshold_for_specificity(y, p, 1.0)
    assert t > 0.8 and spec == 1.0 and sens == 0.5


def test_scorer_serves_the_calibrated_probability_and_the_raw_score() -> None:
    logit = torch.tensor([[2.0]])
    model = lambda x: logit.expand(x.shape[0], 1)  # noqa: E731
    x = [torch.zeros(3, 16, 16)]
    plain = Scorer(model, PipelineConfig(image_size=16)).score(x)[0]
    hot = Scorer(model, PipelineConfig(image_size=16, temperature=2.0)).score(x)[0]
    assert plain.probability == plain.raw_score == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-12)
    assert hot.raw_score == plain.raw_score and hot.probability == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-12)
    for bad in (0, -1, float("inf"), "2"):
        with pytest.raises(ValueError, match="temperature"):
            PipelineConfig(temperature=bad)  # type: ignore[arg-type]


def test_response_names_calibration_and_operating_point() -> None:
    op = {"target": "sensitivity", "value": 0.95, "threshold": 0.17, "sensitivity": 0.96,
          "sensitivity_95ci": [0.9, 1.0], "specificity": 0.8, "specificity_95ci": [0.7, 0.9], "images": 96,
          "positives": 50, "bootstrap": "patient"}
    cal = {"method": "temperature", "temperature": 2.5}
    meta = ArchiveMetadata(calibration=cal, operating_point=op)
    cfg = PipelineConfig(threshold=0.17, temperature=2.5)
    check_contract(cfg, meta)
    r = result(Score(0.2, 0.4), cfg, meta)
    assert r["probability"] == 0.2 and r["raw_score"] == 0.4 and r["label"] == "malignant"
    assert r["calibration"] == {"method": "temperature", "temperature": 2.5}
    assert r["operating_point"] == {"threshold": 0.17, "chosen_for": "sensitivity >= 0.95 on the validation set",
                                    "validation_sensitivity": 0.96, "validation_specificity": 0.8}
    # model-config.yaml and metadata.json must agree: a hand-edited temperature or threshold is refused
    for bad in (PipelineConfig(threshold=0.17), PipelineConfig(threshold=0.5, temperature=2.5)):
        with pytest.raises(ArchiveError, match="rebuild"):
            check_contract(bad, meta)
    with pytest.raises(ArchiveError, match="calibration"):
        ArchiveMetadata(calibration={"method": "isotonic"})
    with pytest.raises(ArchiveError, match="operating_point"):
        ArchiveMetadata(operating_point={"target": "ppv", "threshold": 0.3})


def test_reliability_diagram_puts_each_bin_where_it_belongs(tmp_path) -> None:  # noqa: ANN001
    """An over-confident set (said 0.95, none true) has its point bottom right; a calibrated one (said 0.05,
    5 % true) bottom left, on the diagonal; both are drawn."""
    from client.figures import reliability_png, reliability_points

    said_95 = (np.zeros(100, dtype=int), np.full(100, 0.95))
    said_5 = ((np.arange(100) < 5).astype(int), np.full(100, 0.05))
    for (y, p), point in ((said_95, (0.95, 0.0)), (said_5, (0.05, 0.05))):
        predicted, observed = reliability_points(y, p)
        assert [*predicted, *observed] == pytest.approx(list(point))
        reliability_png(y, p, tmp_path / "r.png", "t")
        assert (tmp_path / "r.png").stat().st_size > 10_000


def _flip(y: np.ndarray, rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = y.copy()
    flipped = rng.random(len(y)) < rate
    out[flipped] = 1 - out[flipped]
    return out


@pytest.mark.slow
def test_trained_fixture_x3_head_with_label_noise(trained_archive, tmp_path) -> None:  # noqa: ANN001
    """The issue's acceptance on the trained fixture. It separates its synthetic task perfectly, so on clean
    labels a x3 head is sharper *and still right* (held-out ECE ~0.004) and there is nothing to correct. With
    30 % of the labels flipped (validation and held-out independently) every image's true frequency is 0.3 or
    0.7 and the x3 head is over-confident: the temperature fitted on 96 validation images is within 10 % of 3
    times the fixture's own, and it at least halves the held-out ECE on 384 images, for every flip seed.
    At 20 % it halved for half of 20 seeds (median ratio 0.51): the fixture's near-binary scores leave a
    residual ECE of ~0.1 that no single temperature removes (docs/CALIBRATION.md)."""
    from handler.archive import load_archive
    from train.synthetic import write_dataset

    archive = load_archive(trained_archive)  # its model.pt, as served (no second export)
    cfg, model = archive.cfg, archive.scorer.model
    sets = {}
    for name, n, seed in (("validation", 96, 2), ("heldout", 384, 3)):
        write_dataset(tmp_path / name, n, seed=seed)
        sets[name] = score_validation_set(model, cfg, tmp_path / name / "jpeg", tmp_path / name / "train.csv")
    v, h = sets["validation"], sets["heldout"]
    for rate, seeds, must_halve in ((0.3, range(5), True), (0.2, range(5), False)):
        for seed in seeds:
            vy, hy = _flip(v.y, rate, 100 + seed), _flip(h.y, rate, 200 + seed)
            base = fit_temperature(ValidationScores(v.names, vy, v.groups, v.logits, []))
            t3 = fit_temperature(ValidationScores(v.names, vy, v.groups, v.logits * 3, []))
            hot = ValidationScores(h.names, hy, h.groups, h.logits * 3, [])
            before = metrics.expected_calibration_error(hy, hot.probabilities())
            after = metrics.expected_calibration_error(hy, hot.probabilities(t3))
            print(f"noise {rate} seed {seed}: T x3 / T = {t3 / base:.3f}; held-out ECE {before:.4f} -> {after:.4f}")
            assert abs(t3 / base / 3 - 1) <= 0.1
            if must_halve:
                assert after <= 0.5 * before

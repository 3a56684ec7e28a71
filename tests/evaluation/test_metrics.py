"""Tests of per-round classification metrics, calibration and the Wilson interval."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, norm
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
)

from annotator.errors import InputError
from annotator.evaluation.metrics import (
    DEFAULT_NLL_CLIP,
    ReliabilityBin,
    RoundMetrics,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    wilson_interval,
)

CLASS_NAMES = ("cat", "dog", "fox", "owl", "yak")


def _random_predictions(
    n: int, n_classes: int, seed: int, concentration: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, concentration), size=n)
    # Keep every probability above the clip so that the NLL matches scikit-learn's exactly.
    probs = (probs + 1e-4) / (1 + n_classes * 1e-4)
    y_true = rng.integers(0, n_classes, size=n)
    return y_true, probs


def _sampled_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one label per row from the row's categorical distribution."""
    cumulative = probs.cumsum(axis=1)
    uniform = rng.uniform(size=(probs.shape[0], 1)) * cumulative[:, -1:]
    return (cumulative < uniform).sum(axis=1)


def _reference_ece(probs: np.ndarray, y_true: np.ndarray, n_bins: int) -> float:
    """Compute the ECE by an explicit loop over samples and equal-width bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    total = 0.0
    for k in range(n_bins):
        lower, upper = k / n_bins, (k + 1) / n_bins
        members = [
            i
            for i in range(len(confidence))
            if (lower < confidence[i] <= upper) or (k == 0 and confidence[i] == 0)
        ]
        if not members:
            continue
        accuracy = np.mean([correct[i] for i in members])
        mean_confidence = np.mean([confidence[i] for i in members])
        total += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return total


# Agreement with scikit-learn.


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed: int) -> None:
    y_true, probs = _random_predictions(400, len(CLASS_NAMES), seed)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(CLASS_NAMES)))

    metrics = classification_metrics(y_true, probs, CLASS_NAMES)

    assert metrics.n_samples == 400
    assert metrics.accuracy == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert metrics.balanced_accuracy == pytest.approx(
        balanced_accuracy_score(y_true, y_pred), abs=1e-12
    )
    assert metrics.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert metrics.nll == pytest.approx(log_loss(y_true, probs, labels=labels), rel=1e-10)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(), confusion_matrix(y_true, y_pred, labels=labels)
    )
    np.testing.assert_allclose(
        metrics.per_class_recall, recall_score(y_true, y_pred, average=None, labels=labels)
    )
    np.testing.assert_allclose(
        metrics.per_class_precision, precision_score(y_true, y_pred, average=None, labels=labels)
    )
    np.testing.assert_allclose(
        metrics.per_class_f1, f1_score(y_true, y_pred, average=None, labels=labels)
    )
    assert metrics.per_class_support == tuple(np.bincount(y_true, minlength=5).tolist())
    assert metrics.absent_classes == ()


def test_absent_class_is_nan_and_named(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(5), size=300)
    # Class 3 ("owl") has no evaluation labels but is predicted at times; class 4 ("yak")
    # is neither labelled nor predicted.
    probs[:, 4] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    y_true = rng.choice([0, 1, 2], size=300)
    y_pred = probs.argmax(axis=1)
    assert np.any(y_pred == 3)
    assert not np.any(y_pred == 4)

    with caplog.at_level(logging.WARNING, logger="annotator.evaluation.metrics"):
        metrics = classification_metrics(y_true, probs, CLASS_NAMES)

    assert metrics.absent_classes == ("owl", "yak")
    assert "owl, yak" in caplog.text
    assert math.isnan(metrics.per_class_recall[3])
    assert math.isnan(metrics.per_class_recall[4])
    assert metrics.per_class_precision[3] == 0.0
    assert math.isnan(metrics.per_class_precision[4])
    assert metrics.per_class_f1[3] == 0.0
    assert math.isnan(metrics.per_class_f1[4])
    with warnings.catch_warnings():
        # scikit-learn warns that y_pred contains a class missing from y_true.
        warnings.simplefilter("ignore", UserWarning)
        expected_balanced = balanced_accuracy_score(y_true, y_pred)
    assert metrics.balanced_accuracy == pytest.approx(expected_balanced, abs=1e-12)
    assert metrics.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert math.isfinite(metrics.ece)
    assert math.isfinite(metrics.nll)


def test_argmax_ties_go_to_lowest_index() -> None:
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4]])
    metrics = classification_metrics(np.array([0, 1]), probs, ["a", "b", "c"])
    assert metrics.accuracy == 1.0
    assert metrics.confusion_matrix()[0, 0] == 1
    assert metrics.confusion_matrix()[1, 1] == 1


def test_nll_clips_zero_true_class_probability() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    metrics = classification_metrics(np.array([1, 0]), probs, ["a", "b"])
    expected = (-math.log(DEFAULT_NLL_CLIP) - math.log(0.5)) / 2
    assert metrics.nll == pytest.approx(expected, rel=1e-12)
    assert metrics.nll_clip == DEFAULT_NLL_CLIP


def test_float32_softmax_accepted() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 1000)).astype(np.float32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    names = [f"class {k}" for k in range(1000)]
    metrics = classification_metrics(rng.integers(0, 1000, 50), probs, names)
    assert metrics.n_classes == 1000
    assert len(metrics.absent_classes) >= 950


# Calibration.


def test_ece_near_zero_for_calibrated_predictor() -> None:
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.full(4, 0.5), size=200_000)
    y_true = _sampled_labels(probs, rng)

    metrics = classification_metrics(y_true, probs, ["a", "b", "c", "d"])

    assert metrics.ece < 0.01


def test_ece_positive_for_overconfident_predictor() -> None:
    rng = np.random.default_rng(12)
    probs = rng.dirichlet(np.full(4, 0.5), size=200_000)
    y_true = _sampled_labels(probs, rng)
    # Temperature 0.3 sharpens every row, so confidence exceeds accuracy.
    sharpened = np.exp(np.log(probs + 1e-12) / 0.3)
    sharpened /= sharpened.sum(axis=1, keepdims=True)

    metrics = classification_metrics(y_true, sharpened, ["a", "b", "c", "d"])

    assert metrics.ece > 0.1
    occupied = [b for b in metrics.reliability if b.count > 1000]
    assert all(b.mean_confidence > b.accuracy for b in occupied)


@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
def test_ece_matches_reference_loop(n_bins: int) -> None:
    y_true, probs = _random_predictions(300, 3, seed=n_bins, concentration=0.4)

    metrics = classification_metrics(y_true, probs, ["a", "b", "c"], n_bins=n_bins)

    assert metrics.n_bins == n_bins
    assert metrics.ece == pytest.approx(_reference_ece(probs, y_true, n_bins), abs=1e-12)
    assert sum(b.count for b in metrics.reliability) == 300


def test_calibration_bin_edges_are_right_closed() -> None:
    confidence = np.array([0.0, 0.2, 0.2000001, 1.0])
    correct = np.array([1, 0, 1, 1])

    bins = calibration_bins(confidence, correct, n_bins=5)

    assert [b.count for b in bins] == [2, 1, 0, 0, 1]
    assert bins[0].lower == 0.0
    assert bins[0].upper == pytest.approx(0.2)
    assert bins[0].accuracy == 0.5
    assert bins[0].mean_confidence == pytest.approx(0.1)
    assert math.isnan(bins[2].accuracy)
    assert math.isnan(bins[2].mean_confidence)


def test_ece_of_empty_bins_is_nan() -> None:
    empty = ReliabilityBin(
        lower=0.0, upper=1.0, count=0, mean_confidence=math.nan, accuracy=math.nan
    )
    assert math.isnan(expected_calibration_error([empty]))


def test_calibration_bins_reject_invalid_input() -> None:
    with pytest.raises(InputError, match="confidence"):
        calibration_bins(np.array([0.5, 1.5]), np.array([1, 0]))
    with pytest.raises(InputError, match="correct"):
        calibration_bins(np.array([0.5, 0.5]), np.array([1, 2]))
    with pytest.raises(InputError, match="shape"):
        calibration_bins(np.array([0.5, 0.5]), np.array([1]))
    with pytest.raises(InputError, match="n_bins"):
        calibration_bins(np.array([0.5]), np.array([1]), n_bins=0)


# Wilson score interval.


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # Four-decimal Wilson intervals without continuity correction, which
        # scipy.stats.binomtest(k, n).proportion_ci(method="wilson") also gives.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_values(successes: int, n: int, low: float, high: float) -> None:
    interval = wilson_interval(successes, n)
    assert interval[0] == pytest.approx(low, abs=5e-5)
    assert interval[1] == pytest.approx(high, abs=5e-5)


def test_wilson_zero_successes_closed_form() -> None:
    z = norm.ppf(0.975)
    for n in [1, 7, 50, 1000]:
        low, high = wilson_interval(0, n)
        assert low == 0.0
        assert high == pytest.approx(z**2 / (n + z**2), rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=5000),
    fraction=st.floats(min_value=0, max_value=1),
    confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_wilson_matches_scipy_and_score_test(n: int, fraction: float, confidence: float) -> None:
    successes = round(fraction * n)
    low, high = wilson_interval(successes, n, confidence)

    reference = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert low == pytest.approx(reference.low, abs=1e-10)
    assert high == pytest.approx(reference.high, abs=1e-10)
    assert 0 <= low <= successes / n <= high <= 1
    # The endpoints are where the score statistic |p̂ - p| / sqrt(p (1 - p) / n) equals z.
    z = norm.ppf(0.5 + confidence / 2)
    p_hat = successes / n
    for endpoint in (low, high):
        if 0 < endpoint < 1:
            statistic = abs(p_hat - endpoint) / math.sqrt(endpoint * (1 - endpoint) / n)
            assert statistic == pytest.approx(z, rel=1e-8)


def test_wilson_rejects_invalid_counts() -> None:
    with pytest.raises(InputError, match="n must be at least 1"):
        wilson_interval(0, 0)
    with pytest.raises(InputError, match="between 0 and n=10"):
        wilson_interval(11, 10)
    with pytest.raises(InputError, match="confidence"):
        wilson_interval(3, 10, confidence=95)
    with pytest.raises(InputError, match="integer"):
        wilson_interval(2.5, 10)


def test_accuracy_interval_is_wilson() -> None:
    y_true, probs = _random_predictions(250, 5, seed=3)
    metrics = classification_metrics(y_true, probs, CLASS_NAMES, confidence=0.9)
    successes = int(round(metrics.accuracy * 250))
    assert (metrics.accuracy_low, metrics.accuracy_high) == wilson_interval(successes, 250, 0.9)
    assert metrics.interval_confidence == 0.9


# Storage round trip.


def test_round_trip_through_strict_json() -> None:
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.ones(5), size=60)
    y_true = rng.choice([0, 1, 2], size=60)  # owl and yak absent, so NaNs appear
    metrics = classification_metrics(y_true, probs, CLASS_NAMES, n_bins=10)

    text = json.dumps(metrics.to_dict(), allow_nan=False)
    restored = RoundMetrics.from_dict(json.loads(text))

    assert restored.to_dict() == metrics.to_dict()
    assert restored.class_names == CLASS_NAMES
    assert isinstance(restored.reliability[0], ReliabilityBin)
    assert math.isnan(restored.per_class_recall[3])
    np.testing.assert_array_equal(restored.confusion_matrix(), metrics.confusion_matrix())
    assert restored.ece == metrics.ece


def test_from_dict_rejects_bad_payloads() -> None:
    y_true, probs = _random_predictions(20, 5, seed=1)
    payload = classification_metrics(y_true, probs, CLASS_NAMES).to_dict()

    with pytest.raises(InputError, match="format version 99"):
        RoundMetrics.from_dict({**payload, "version": 99})
    incomplete = dict(payload)
    del incomplete["ece"]
    with pytest.raises(InputError, match="'ece'"):
        RoundMetrics.from_dict(incomplete)
    with pytest.raises(InputError, match="mapping"):
        RoundMetrics.from_dict([payload])  # type: ignore[arg-type]


# Frames for charts.


def test_frames_have_documented_columns() -> None:
    y_true, probs = _random_predictions(100, 3, seed=4)
    metrics = classification_metrics(y_true, probs, ["a", "b", "c"], n_bins=8)

    per_class = metrics.per_class_frame()
    assert list(per_class.columns) == ["class_name", "support", "recall", "precision", "f1"]
    assert per_class["support"].sum() == 100

    reliability = metrics.reliability_frame()
    assert list(reliability.columns) == ["lower", "upper", "count", "mean_confidence", "accuracy"]
    assert len(reliability) == 8

    confusion = metrics.confusion_frame()
    assert list(confusion.columns) == ["true_class", "predicted_class", "count", "row_fraction"]
    assert len(confusion) == 9
    assert confusion["count"].sum() == 100
    row_sums = confusion.groupby("true_class")["row_fraction"].sum()
    np.testing.assert_allclose(row_sums.to_numpy(), 1.0)
    cell = confusion[(confusion.true_class == "b") & (confusion.predicted_class == "c")]
    assert int(cell["count"].iloc[0]) == metrics.confusion_matrix()[1, 2]


# Input validation.


@pytest.mark.parametrize(
    ("y_true", "probs", "names", "message"),
    [
        (np.array([0, 1]), np.array([[0.6, 0.6], [0.5, 0.5]]), ["a", "b"], r"row 0 sums to 1\.2"),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]]), ["a", "b"], r"probs\[0, 0\]"),
        (np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]), ["a", "b"], "NaN"),
        (np.array([0, 1]), np.array([0.5, 0.5]), ["a", "b"], r"shape \(n, C\)"),
        (np.array([0, 1, 1]), np.full((2, 2), 0.5), ["a", "b"], r"shape \(2,\)"),
        (np.array([0.0, 1.0]), np.full((2, 2), 0.5), ["a", "b"], "integer class indices"),
        (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"], r"y_true\[1\] = 2"),
        (np.array([0, -1]), np.full((2, 2), 0.5), ["a", "b"], r"y_true\[1\] = -1"),
        (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "b", "c"], "3 class names"),
        (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "a"], "duplicates"),
        (np.array([0, 1]), np.full((2, 2), 0.5), ["a", ""], "non-empty"),
        (np.array([0, 1]), np.full((2, 2), 0.5), "ab", "sequence of strings"),
        (np.array([0]), np.ones((1, 1)), ["a"], "at least 2 classes"),
        (np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"], "evaluation split is empty"),
        (np.array([0, 1]), np.array([[1, 0], [0, 1]]), ["a", "b"], "floating-point"),
    ],
)
def test_invalid_predictions_raise(
    y_true: np.ndarray, probs: np.ndarray, names: list[str], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        classification_metrics(y_true, probs, names)


def test_invalid_options_raise() -> None:
    y_true, probs = _random_predictions(10, 2, seed=0)
    with pytest.raises(InputError, match="n_bins"):
        classification_metrics(y_true, probs, ["a", "b"], n_bins=0)
    with pytest.raises(InputError, match="confidence"):
        classification_metrics(y_true, probs, ["a", "b"], confidence=1.0)
    with pytest.raises(InputError, match="nll_clip"):
        classification_metrics(y_true, probs, ["a", "b"], nll_clip=0.0)
    with pytest.raises(InputError, match="tolerance"):
        classification_metrics(y_true, probs, ["a", "b"], tolerance=-1.0)

"""Tests of the learning-curve fit, its forecasts and the stopping hint."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import gammainc, gammaln

from annotator.errors import InputError
from annotator.evaluation._curve_posterior import CurveDraws, curve_values, labels_for_target
from annotator.evaluation.curve import (
    CurveStatus,
    ForecastStatus,
    LearningCurve,
    fit_learning_curve,
)

# A saturating curve with a zero-shot start: acc(n) = a - (a - y0) (1 + n / n0)^(-c).
TRUE_A, TRUE_Y0, TRUE_C, TRUE_N0 = 0.9, 0.5, 0.7, 20.0
TRUE_B = (TRUE_A - TRUE_Y0) * TRUE_N0**TRUE_C


def _true_accuracy(labels: np.ndarray) -> np.ndarray:
    return TRUE_A - (TRUE_A - TRUE_Y0) * (1 + labels / TRUE_N0) ** (-TRUE_C)


def _true_labels_for(target: float) -> float:
    return TRUE_N0 * (((TRUE_A - TRUE_Y0) / (TRUE_A - target)) ** (1 / TRUE_C) - 1)


def _binomial_rounds(
    labels: np.ndarray, n_evaluated: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = np.full(labels.size, n_evaluated)
    accuracy = np.random.default_rng(seed).binomial(m, _true_accuracy(labels)) / m
    return labels, accuracy, m


# Labels spent at each round: zero-shot, then batches of growing size.
WIDE_LABELS = np.concatenate([[0.0], np.geomspace(10, 3000, 14).round()])


# Parameter recovery and forecast coverage.


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_recovers_synthetic_power_law(seed: int) -> None:
    labels, accuracy, m = _binomial_rounds(WIDE_LABELS, 20_000, seed)

    curve = fit_learning_curve(labels, accuracy, m, seed=seed)

    assert curve.status_ is CurveStatus.FITTED
    params, low, high = curve.params_, curve.params_low_, curve.params_high_
    assert params.a == pytest.approx(TRUE_A, abs=0.01)
    assert params.accuracy_at_zero == pytest.approx(TRUE_Y0, abs=0.01)
    assert params.c == pytest.approx(TRUE_C, rel=0.15)
    assert params.offset == pytest.approx(TRUE_N0, rel=0.25)
    assert params.b == pytest.approx(TRUE_B, rel=0.4)
    for name, true_value in [("a", TRUE_A), ("b", TRUE_B), ("c", TRUE_C), ("offset", TRUE_N0)]:
        assert getattr(low, name) <= true_value <= getattr(high, name), name


def test_fixed_offset_recovers_remaining_parameters() -> None:
    labels, accuracy, m = _binomial_rounds(WIDE_LABELS, 20_000, seed=3)

    curve = fit_learning_curve(labels, accuracy, m, offset=TRUE_N0)

    assert curve.n_parameters == 3
    assert curve.params_.offset == TRUE_N0
    assert curve.params_.a == pytest.approx(TRUE_A, abs=0.01)
    assert curve.params_.c == pytest.approx(TRUE_C, rel=0.1)
    assert curve.params_.b == pytest.approx(TRUE_B, rel=0.15)


def test_fit_without_evaluation_sizes_recovers_curve() -> None:
    rng = np.random.default_rng(4)
    accuracy = _true_accuracy(WIDE_LABELS) + rng.normal(0, 0.003, WIDE_LABELS.size)

    curve = fit_learning_curve(WIDE_LABELS, accuracy)

    assert curve.is_fitted
    assert curve.params_.a == pytest.approx(TRUE_A, abs=0.015)
    assert curve.params_low_.a <= TRUE_A <= curve.params_high_.a
    assert curve.params_low_.c <= TRUE_C <= curve.params_high_.c


def test_forecast_interval_covers_true_labels() -> None:
    # Rounds stop at 400 labels; the target needs about 1,400, so this extrapolates.
    labels = np.array([0, 25, 50, 100, 150, 200, 300, 400], dtype=float)
    target = 0.88
    true_labels = _true_labels_for(target)
    covered = 0
    for seed in range(8):
        labels, accuracy, m = _binomial_rounds(labels, 5_000, seed)
        forecast = fit_learning_curve(labels, accuracy, m, seed=seed).forecast_labels_for(target)
        assert forecast.status in (ForecastStatus.REACHABLE, ForecastStatus.UNREACHABLE)
        if forecast.status is ForecastStatus.REACHABLE:
            assert forecast.low <= forecast.labels <= forecast.high
            covered += forecast.low <= true_labels <= forecast.high
        else:
            # An unreachable verdict still has to leave the truth plausible.
            covered += forecast.probability_reachable > 0.025
    assert covered >= 7


def test_forecast_within_observed_range_is_tight() -> None:
    labels, accuracy, m = _binomial_rounds(WIDE_LABELS, 20_000, seed=5)
    target = 0.85

    forecast = fit_learning_curve(labels, accuracy, m).forecast_labels_for(target)

    assert forecast.status is ForecastStatus.REACHABLE
    assert forecast.low <= _true_labels_for(target) <= forecast.high
    assert forecast.high / forecast.low < 1.6
    assert forecast.labels <= forecast.labels_spent
    assert "within the 3000 labels spent" in forecast.message
    assert forecast.probability_reachable == 1.0


# Posterior against a brute-force reference.


def test_posterior_matches_brute_force_grid() -> None:
    """Compare the sampler with the posterior evaluated on a dense (c, a, y0) grid.

    With the offset fixed and ``s`` integrated in closed form over ``s >= 1``
    (``∫ s^(-R-1) exp(-Q/s²) ds ∝ Q^(-R/2) P(R/2, Q)``), the posterior on the grid needs
    no sampling at all.
    """
    labels = np.array([0, 10, 20, 40, 80, 160], dtype=float)
    m = np.full(labels.size, 300)
    offset = 5.0
    accuracy = np.round((0.85 - 0.3 * (1 + labels / offset) ** -0.6) * m) / m
    smoothed = (accuracy * m + 2) / (m + 4)
    weights = m / (smoothed * (1 - smoothed))

    # 1. Reference: posterior on a grid, uniform in log c and on the triangle.
    c_values = np.exp(np.linspace(math.log(0.01), math.log(10), 70))
    a_values = np.linspace(0.55, 1.0, 150)
    y0_values = np.linspace(0.35, 0.75, 150)
    c, a, y0 = np.meshgrid(c_values, a_values, y0_values, indexing="ij")
    half_rss = np.zeros(c.shape)
    for label, observed, weight in zip(labels, accuracy, weights, strict=True):
        predicted = a - (a - y0) * (1 + label / offset) ** (-c)
        half_rss += 0.5 * weight * (observed - predicted) ** 2
    r_half = labels.size / 2
    log_density = gammaln(r_half) - r_half * np.log(half_rss) + np.log(gammainc(r_half, half_rss))
    log_density = np.where(y0 < a, log_density, -np.inf)
    density = np.exp(log_density - log_density.max())
    density /= density.sum()

    def grid_quantiles(values: np.ndarray, marginal: np.ndarray) -> np.ndarray:
        cumulative = np.cumsum(marginal)
        return values[np.searchsorted(cumulative, [0.05, 0.5, 0.95])]

    reference_a = grid_quantiles(a_values, density.sum(axis=(0, 2)))
    reference_c = grid_quantiles(c_values, density.sum(axis=(1, 2)))

    # 2. Sampler.
    curve = fit_learning_curve(labels, accuracy, m, offset=offset, n_draws=20_000, seed=1)
    sampled_a = np.quantile(curve.draws_.a, [0.05, 0.5, 0.95])
    sampled_c = np.quantile(curve.draws_.c, [0.05, 0.5, 0.95])

    # Tolerances: one grid step of a (0.003) plus Monte Carlo error; c steps are 10%.
    np.testing.assert_allclose(sampled_a, reference_a, atol=0.008)
    np.testing.assert_allclose(sampled_c, reference_c, rtol=0.12)


def test_labels_for_target_solves_curve() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0.6, 1.0, 200)
    draws = CurveDraws(
        a=a,
        y0=a * rng.uniform(0.1, 0.9, 200),
        c=np.exp(rng.uniform(-3, 1, 200)),
        n0=np.exp(rng.uniform(-2, 6, 200)),
        effective_sample_size=200.0,
    )
    target = 0.7

    needed = labels_for_target(draws, target)

    reachable = draws.a > target
    starts_above = draws.y0 >= target
    assert np.all(np.isinf(needed[~reachable]))
    assert np.all(needed[starts_above & reachable] == 0)
    solved = reachable & ~starts_above & (needed < 1e12)
    values = np.array(
        [curve_values(_row(draws, i), np.array([needed[i]]))[0, 0] for i in np.flatnonzero(solved)]
    )
    np.testing.assert_allclose(values, target, atol=1e-9)


def _row(draws: CurveDraws, index: int) -> CurveDraws:
    return CurveDraws(
        a=draws.a[index : index + 1],
        y0=draws.y0[index : index + 1],
        c=draws.c[index : index + 1],
        n0=draws.n0[index : index + 1],
        effective_sample_size=1.0,
    )


# Predictions, gains and the stopping hint.


def test_predict_interval_brackets_truth() -> None:
    labels, accuracy, m = _binomial_rounds(WIDE_LABELS, 20_000, seed=6)
    curve = fit_learning_curve(labels, accuracy, m)
    grid = np.array([0.0, 50.0, 500.0, 3000.0])

    median, low, high = curve.predict_interval(grid)

    assert np.all(low <= median)
    assert np.all(median <= high)
    assert np.all(np.diff(median) > 0)
    assert np.all((low <= _true_accuracy(grid)) & (_true_accuracy(grid) <= high))
    np.testing.assert_array_equal(curve.predict(grid), median)


def test_curve_frame_columns() -> None:
    labels, accuracy, m = _binomial_rounds(WIDE_LABELS, 20_000, seed=7)
    curve = fit_learning_curve(labels, accuracy, m)

    frame = curve.curve_frame(np.linspace(0, 5000, 11))

    assert list(frame.columns) == ["labels_spent", "accuracy", "low", "high"]
    assert len(frame) == 11
    empty = LearningCurve().curve_frame([0, 10])
    assert isinstance(empty, pd.DataFrame)
    assert empty.empty
    assert list(empty.columns) == ["labels_spent", "accuracy", "low", "high"]


def test_expected_gain_and_stop_hint() -> None:
    labels = np.array([0, 20, 40, 60, 80, 100, 120], dtype=float)
    labels, accuracy, m = _binomial_rounds(labels, 20_000, seed=8)
    curve = fit_learning_curve(labels, accuracy, m)

    gain = curve.expected_gain(20)

    true_gain = float(np.diff(_true_accuracy(np.array([120.0, 140.0])))[0])
    assert gain.status is CurveStatus.FITTED
    assert (gain.labels_from, gain.labels_to) == (120.0, 140.0)
    assert gain.low <= true_gain <= gain.high
    assert 0 < gain.low <= gain.gain <= gain.high
    assert "next 20 labels" in gain.message

    assert curve.last_batch_size_ == 20
    keep = curve.should_stop(gain.low / 2)
    assert keep.stop is False
    assert keep.gain.next_batch_size == 20
    assert keep.message.startswith("keep labelling")
    stop = curve.should_stop(gain.high * 2, next_batch_size=20)
    assert stop.stop is True
    assert stop.message.startswith("consider stopping")


def test_unreachable_target_returns_no_labels() -> None:
    labels, accuracy, m = _binomial_rounds(WIDE_LABELS, 20_000, seed=9)
    curve = fit_learning_curve(labels, accuracy, m)

    forecast = curve.forecast_labels_for(0.97)

    assert forecast.status is ForecastStatus.UNREACHABLE
    assert forecast.labels is None
    assert forecast.low is None
    assert forecast.high is None
    assert forecast.probability_reachable < 0.05
    assert forecast.asymptote == pytest.approx(TRUE_A, abs=0.01)
    assert "below the target 0.970" in forecast.message


def test_same_seed_gives_same_forecast() -> None:
    labels, accuracy, m = _binomial_rounds(WIDE_LABELS[:8], 2_000, seed=10)
    first = fit_learning_curve(labels, accuracy, m, seed=3).forecast_labels_for(0.8)
    second = fit_learning_curve(labels, accuracy, m, seed=3).forecast_labels_for(0.8)
    assert first == second


# Too few rounds.


def test_too_few_rounds_reports_rounds_needed() -> None:
    # Four rounds but only three distinct label counts.
    curve = fit_learning_curve([0, 10, 10, 20], [0.5, 0.6, 0.61, 0.65], [500] * 4)

    assert curve.status_ is CurveStatus.TOO_FEW_ROUNDS
    assert curve.rounds_needed_ == 2
    assert "label 2 more batches" in curve.message_

    forecast = curve.forecast_labels_for(0.8)
    assert forecast.status is ForecastStatus.TOO_FEW_ROUNDS
    assert forecast.rounds_needed == 2
    assert forecast.labels is None
    assert forecast.message == curve.message_

    gain = curve.expected_gain(10)
    assert gain.status is CurveStatus.TOO_FEW_ROUNDS
    assert gain.gain is None

    hint = curve.should_stop(0.01)
    assert hint.stop is False
    assert hint.gain is None
    assert "label 2 more batches" in hint.message

    with pytest.raises(InputError, match="not fitted"):
        curve.predict([10])


def test_fixed_offset_needs_one_round_fewer() -> None:
    labels = [0, 10, 20, 30]
    accuracy = [0.5, 0.6, 0.65, 0.68]
    assert fit_learning_curve(labels, accuracy, [500] * 4).rounds_needed_ == 1
    fixed = fit_learning_curve(labels, accuracy, [500] * 4, offset=10.0)
    assert fixed.is_fitted
    assert fixed.rounds_needed_ == 0


def test_unfitted_curve_explains_itself() -> None:
    curve = LearningCurve()
    assert curve.status_ is None
    assert curve.forecast_labels_for(0.9).status is ForecastStatus.TOO_FEW_ROUNDS
    assert "call fit()" in curve.forecast_labels_for(0.9).message


def test_flat_rounds_fit_and_advise_stopping() -> None:
    # Accuracy that does not improve gives a flat curve and a stop hint, not an error.
    # The asymptote stays uncertain: a curve that starts rising after many more labels
    # fits these rounds as well.
    curve = fit_learning_curve([0, 10, 20, 30, 40, 50], [0.7] * 6, [1000] * 6)

    assert curve.is_fitted
    assert curve.predict([50])[0] == pytest.approx(0.7, abs=0.01)
    assert curve.params_low_.a == pytest.approx(0.7, abs=0.01)
    assert curve.should_stop(0.005).stop is True


# Input validation.


@pytest.mark.parametrize(
    ("labels", "accuracy", "n_evaluated", "message"),
    [
        ([0, 10], [0.5], None, "one value per round"),
        ([0, -10], [0.5, 0.6], None, "non-negative"),
        ([0, np.nan], [0.5, 0.6], None, "finite"),
        ([0, 10], [0.5, 60.0], None, "write 90% as 0.9"),
        ([[0, 10]], [[0.5, 0.6]], None, r"shape \(R,\)"),
        ([0, 10], [0.5, 0.6], [100.0, 100.0], "positive integers"),
        ([0, 10], [0.5, 0.6], [100, 0], "positive integers"),
        ([0, 10], [0.5, 0.6], [100], "one value per round"),
        (["a", "b"], [0.5, 0.6], None, "numeric"),
    ],
)
def test_invalid_rounds_raise(
    labels: list, accuracy: list, n_evaluated: list | None, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        fit_learning_curve(labels, accuracy, n_evaluated)


def test_invalid_options_raise() -> None:
    with pytest.raises(InputError, match="offset"):
        LearningCurve(offset=0.0)
    with pytest.raises(InputError, match="confidence"):
        LearningCurve(confidence=95)
    with pytest.raises(InputError, match="n_draws"):
        LearningCurve(n_draws=10)
    curve = LearningCurve()
    with pytest.raises(InputError, match="write 90% as 0.9"):
        curve.forecast_labels_for(90)
    with pytest.raises(InputError, match="next_batch_size"):
        curve.expected_gain(0)
    with pytest.raises(InputError, match="threshold"):
        curve.should_stop(1.5)

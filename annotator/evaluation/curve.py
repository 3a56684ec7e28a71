"""Learning curve of accuracy against labels spent, with forecasts and a stopping hint.

The curve is the saturating inverse power law with an offset::

    acc(n) = a - b · (n + n0)^(-c)  =  a - (a - y0) · (1 + n / n0)^(-c)

with ``n`` the labels that trained the head (round 0, zero-shot, has ``n = 0``), ``a``
the asymptotic accuracy, ``y0 = acc(0)``, ``c > 0`` the decay exponent, ``n0 > 0`` an
offset in labels and ``b = (a - y0) · n0^c``. The offset matters for this project. A
zero-shot model starts well above chance, as if it had already seen ``n0`` labels, and
fixing ``n0`` at 1 (the plain power law) misfits such curves badly.

Fit and uncertainty. Each round's accuracy is treated as Gaussian around the curve,
with the binomial standard deviation of its evaluation-set size times a factor
``s >= 1`` that absorbs extra scatter, or with an unknown common standard deviation
when the sizes are not given. This is the likelihood behind weighted least squares.
With uniform priors on ``0 <= y0 < a <= 1`` and on ``log c`` and ``log n0``, the
posterior is sampled by grid importance sampling
(``annotator.evaluation._curve_posterior``), which is exact up to Monte Carlo error.
Point values are posterior medians and intervals are posterior quantiles.

Why not the covariance of a least-squares fit: with four parameters and ten-odd noisy
rounds the Gaussian approximation around the optimum is poor. In simulated projects
(``a = 0.92``, ``y0 = 0.6``, ``c = 0.5``, ``n0`` in {1, 10, 50}, 6 or 11 rounds,
binomial noise on 1,000 to 5,000 evaluation images, 40 projects per setting) its 95%
forecast intervals contained the true label count in 0–72% of projects. The posterior
intervals contained it in 95–100% of them, or 85–100% without the evaluation-set sizes.
A fixed ``n0 = 1`` fell as low as 0% when the true ``n0`` was 10 or 50. The script
``tests/evaluation/curve_coverage.py`` reproduces these numbers.

NOTE: every round is usually scored on the same evaluation split, so round-to-round
errors are positively correlated, not independent as the likelihood assumes. The
intervals may then be too narrow, most of all for the asymptote.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd

from annotator.errors import InputError
from annotator.evaluation._curve_posterior import (
    CurveDraws,
    curve_values,
    labels_for_target,
    sample_curve_posterior,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIDENCE = 0.95
DEFAULT_N_DRAWS = 2000
#: A forecast that needs more than this multiple of the labels spent so far is flagged
#: in its message as a long extrapolation.
LONG_EXTRAPOLATION_FACTOR = 10.0


class CurveStatus(StrEnum):
    """Outcome of fitting a learning curve."""

    FITTED = "fitted"
    """Posterior draws of the curve are available."""
    TOO_FEW_ROUNDS = "too_few_rounds"
    """Fewer rounds with distinct label counts than the parameters + 1."""
    FAILED = "failed"
    """No curve inside the prior explains the rounds, and ``message`` gives the reason."""


class ForecastStatus(StrEnum):
    """Outcome of a forecast of the labels needed for a target accuracy."""

    REACHABLE = "reachable"
    """The fitted asymptote exceeds the target, so ``labels``, ``low`` and ``high`` are set."""
    UNREACHABLE = "unreachable"
    """The fitted asymptote is at or below the target, so no label count is forecast."""
    TOO_FEW_ROUNDS = "too_few_rounds"
    """No curve yet, because ``rounds_needed`` more rounds are required."""
    FAILED = "failed"
    """The curve fit failed, and ``message`` gives the reason."""


@dataclass(frozen=True)
class PowerLawParameters:
    """Parameters of ``acc(n) = a - b · (n + offset)^(-c)``, with ``accuracy_at_zero = acc(0)``."""

    a: float
    b: float
    c: float
    offset: float
    accuracy_at_zero: float


@dataclass(frozen=True)
class Forecast:
    """Labels forecast to reach ``target_accuracy``, with an interval.

    ``labels``, ``low`` and ``high`` count all labels spent (not the labels still to
    buy), rounded up to whole labels. ``high`` is ``inf`` when more than
    ``(1 - confidence) / 2`` of the posterior never reaches the target. All three are
    ``None`` unless ``status`` is ``REACHABLE``. ``probability_reachable`` is the
    posterior probability that the asymptote exceeds the target.
    """

    status: ForecastStatus
    target_accuracy: float
    labels: float | None
    low: float | None
    high: float | None
    probability_reachable: float | None
    labels_spent: float | None
    asymptote: float | None
    asymptote_low: float | None
    asymptote_high: float | None
    confidence: float
    rounds_needed: int
    message: str


@dataclass(frozen=True)
class ExpectedGain:
    """Forecast accuracy gain from ``labels_from`` to ``labels_to`` labels, with an interval.

    ``gain``, ``low`` and ``high`` are fractions (0.01 is one accuracy point) and are
    ``None`` unless the curve is fitted.
    """

    status: CurveStatus
    next_batch_size: int
    labels_from: float | None
    labels_to: float | None
    gain: float | None
    low: float | None
    high: float | None
    confidence: float
    rounds_needed: int
    message: str


@dataclass(frozen=True)
class StopHint:
    """Advice on whether the next batch is worth labelling.

    ``stop`` is true when even the upper end of the gain interval is below
    ``threshold``. Without a fitted curve it is false, ``message`` gives the reason, and
    ``gain`` is ``None`` unless a batch size was passed.
    """

    stop: bool
    threshold: float
    gain: ExpectedGain | None
    message: str


class LearningCurve:
    """Saturating power-law learning curve ``acc(n) = a - b · (n + n0)^(-c)``.

    Parameters
    ----------
    offset
        Fixed ``n0`` in labels, or ``None`` (the default) to infer it with the other
        parameters. A fixed offset needs one round fewer but misfits when it is wrong.
    confidence
        Coverage of every interval this object returns, in ``(0, 1)``.
    n_draws
        Number of posterior draws behind the intervals.
    seed
        Seed of the posterior sampler, so that the same rounds give the same results.

    Attributes
    ----------
    status_ : CurveStatus or None
        Outcome of :meth:`fit`, or None before it.
    message_ : str
        Explanation of ``status_`` for people.
    rounds_needed_ : int
        Further rounds with new label counts needed before a fit, 0 once there are enough.
    params_ : PowerLawParameters or None
        Posterior median of each parameter.
    params_low_, params_high_ : PowerLawParameters or None
        Marginal posterior quantiles ``(1 ∓ confidence) / 2`` of each parameter.
    draws_ : CurveDraws or None
        Posterior draws, each array of shape ``(n_draws,)``.
    labels_spent_ : float or None
        Largest label count among the rounds.
    last_batch_size_ : int or None
        Difference between the two largest distinct label counts.
    """

    def __init__(
        self,
        *,
        offset: float | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
        n_draws: int = DEFAULT_N_DRAWS,
        seed: int = 0,
    ) -> None:
        if offset is not None and not (
            isinstance(offset, (int, float)) and math.isfinite(offset) and offset > 0
        ):
            raise InputError(f"offset must be a positive number of labels or None, got {offset!r}")
        if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
            raise InputError(f"confidence must be a number in (0, 1), got {confidence!r}")
        if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 100:
            raise InputError(f"n_draws must be an integer of at least 100, got {n_draws!r}")
        self.offset = None if offset is None else float(offset)
        self.confidence = float(confidence)
        self.n_draws = n_draws
        self.seed = seed
        self._reset()

    @property
    def n_parameters(self) -> int:
        """Number of curve parameters ``P``: 4, or 3 with a fixed offset."""
        return 4 if self.offset is None else 3

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` produced posterior draws."""
        return self.status_ is CurveStatus.FITTED

    def fit(
        self,
        labels: Sequence[float] | np.ndarray,
        accuracy: Sequence[float] | np.ndarray,
        n_evaluated: Sequence[int] | np.ndarray | None = None,
    ) -> LearningCurve:
        """Fit the curve to the rounds so far.

        Too few rounds do not raise: they set ``status_``, ``message_`` and
        ``rounds_needed_``, and every later forecast reports them.

        Parameters
        ----------
        labels
            Labels spent at each round, shape ``(R,)``, non-negative, with 0 for round 0.
        accuracy
            Accuracy on the evaluation split at each round, shape ``(R,)``, in ``[0, 1]``.
        n_evaluated
            Evaluation images scored at each round, shape ``(R,)``. Without it the noise
            level is inferred from the scatter of the rounds alone, which gives wider
            intervals with few rounds and overconfident ones when the curve fits by chance.

        Returns
        -------
        LearningCurve
            ``self``.

        Raises
        ------
        InputError
            If the arrays have different lengths or invalid values.
        """
        n, y, m = _validate_rounds(labels, accuracy, n_evaluated)
        self._reset()
        distinct = np.unique(n)
        if n.size:
            self.labels_spent_ = float(n.max())
        if distinct.size >= 2:
            self.last_batch_size_ = int(math.ceil(distinct[-1] - distinct[-2]))

        # 1. Enough rounds? Repeated label counts add no information about the shape.
        needed = self.n_parameters + 1
        if distinct.size < needed:
            self.status_ = CurveStatus.TOO_FEW_ROUNDS
            self.rounds_needed_ = needed - distinct.size
            plural = "es" if self.rounds_needed_ > 1 else ""
            rounds = "round" if distinct.size == 1 else "rounds"
            self.message_ = (
                f"{distinct.size} {rounds} with distinct label counts so far, but the "
                f"{self.n_parameters}-parameter learning curve needs {needed}; label "
                f"{self.rounds_needed_} more batch{plural} for a forecast"
            )
            logger.info("learning curve not fitted: %s", self.message_)
            return self
        self.rounds_needed_ = 0

        # 2. Posterior draws of (a, y0, c, n0).
        rng = np.random.default_rng(self.seed)
        draws = sample_curve_posterior(n, y, m, self.offset, self.n_draws, rng)
        if draws is None:
            self.status_ = CurveStatus.FAILED
            self.message_ = (
                "no learning curve with accuracy between 0 and 1 explains these rounds; "
                "check the labels and accuracies passed"
            )
            logger.warning("learning curve not fitted: %s", self.message_)
            return self

        # 3. Summaries.
        self.status_ = CurveStatus.FITTED
        self.draws_ = draws
        alpha = 1 - self.confidence
        self.params_ = _parameter_quantile(draws, 0.5)
        self.params_low_ = _parameter_quantile(draws, alpha / 2)
        self.params_high_ = _parameter_quantile(draws, 1 - alpha / 2)
        self.message_ = (
            f"fitted on {n.size} rounds: asymptote {self.params_.a:.3f} "
            f"({self.confidence:.0%} interval {self.params_low_.a:.3f} to {self.params_high_.a:.3f})"
        )
        logger.info(
            "learning curve fitted: rounds=%d labels_spent=%.0f a=%.4f c=%.4g offset=%.4g "
            "effective_sample_size=%.0f",
            n.size,
            self.labels_spent_,
            self.params_.a,
            self.params_.c,
            self.params_.offset,
            draws.effective_sample_size,
        )
        return self

    def predict(self, labels: Sequence[float] | np.ndarray | float) -> np.ndarray:
        """Evaluate the posterior median of ``acc(n)`` at ``labels``, shape ``(L,)``.

        The median is taken pointwise over the posterior curves, so it is not in general
        the curve at the median parameters ``params_``.
        """
        return self.predict_interval(labels)[0]

    def predict_interval(
        self, labels: Sequence[float] | np.ndarray | float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Evaluate the curve with a pointwise interval at ``labels``.

        Returns
        -------
        tuple of numpy.ndarray
            ``(accuracy, low, high)``, each of shape ``(L,)``: the pointwise posterior
            median and the ``(1 ∓ confidence) / 2`` quantiles.

        Raises
        ------
        InputError
            If the curve is not fitted or ``labels`` are not finite and non-negative.
        """
        self._require_fitted()
        n = _validate_label_grid(labels)
        curves = curve_values(self.draws_, n)  # (S, L)
        alpha = 1 - self.confidence
        low, median, high = np.quantile(curves, [alpha / 2, 0.5, 1 - alpha / 2], axis=0)
        return median, low, high

    def curve_frame(self, labels: Sequence[float] | np.ndarray) -> pd.DataFrame:
        """Tabulate the forecast curve for a chart.

        Returns
        -------
        pandas.DataFrame
            Columns ``labels_spent``, ``accuracy``, ``low`` and ``high``, one row per
            label count. It is empty when the curve is not fitted.
        """
        if not self.is_fitted:
            return pd.DataFrame(
                {"labels_spent": [], "accuracy": [], "low": [], "high": []}, dtype=np.float64
            )
        n = _validate_label_grid(labels)
        accuracy, low, high = self.predict_interval(n)
        return pd.DataFrame({"labels_spent": n, "accuracy": accuracy, "low": low, "high": high})

    def forecast_labels_for(self, target_accuracy: float) -> Forecast:
        """Forecast the labels at which the curve reaches ``target_accuracy``.

        For each posterior draw, ``acc(n) = T`` gives
        ``n = n0 · (((a - y0) / (a - T))^(1/c) - 1)``, floored at 0, and no solution when
        ``a <= T``. The forecast is the median over draws with its quantile interval.
        When the median asymptote is at or below the target the status is
        ``UNREACHABLE`` and no label count is returned.

        Parameters
        ----------
        target_accuracy
            Target accuracy ``T`` in ``(0, 1)``.

        Raises
        ------
        InputError
            If ``target_accuracy`` is not a fraction in ``(0, 1)``.
        """
        if not (
            isinstance(target_accuracy, (int, float))
            and math.isfinite(target_accuracy)
            and 0 < target_accuracy < 1
        ):
            raise InputError(
                f"target_accuracy must be a fraction in (0, 1), got {target_accuracy!r}; "
                "write 90% as 0.9"
            )
        target = float(target_accuracy)
        if not self.is_fitted:
            return Forecast(
                status=(
                    ForecastStatus.FAILED
                    if self.status_ is CurveStatus.FAILED
                    else ForecastStatus.TOO_FEW_ROUNDS
                ),
                target_accuracy=target,
                labels=None,
                low=None,
                high=None,
                probability_reachable=None,
                labels_spent=self.labels_spent_,
                asymptote=None,
                asymptote_low=None,
                asymptote_high=None,
                confidence=self.confidence,
                rounds_needed=self.rounds_needed_,
                message=self.message_,
            )

        # 1. Labels needed under each draw, inf where the asymptote is below the target.
        needed = labels_for_target(self.draws_, target)
        probability = float(np.mean(np.isfinite(needed)))
        alpha = 1 - self.confidence
        # inverted_cdf picks sample values, so draws that never reach the target give an
        # infinite quantile instead of NaN from interpolating with inf.
        low, median, high = np.quantile(
            needed, [alpha / 2, 0.5, 1 - alpha / 2], method="inverted_cdf"
        )
        asymptote_text = (
            f"fitted asymptote {self.params_.a:.3f} ({self.confidence:.0%} interval "
            f"{self.params_low_.a:.3f} to {self.params_high_.a:.3f})"
        )
        common = {
            "target_accuracy": target,
            "probability_reachable": probability,
            "labels_spent": self.labels_spent_,
            "asymptote": self.params_.a,
            "asymptote_low": self.params_low_.a,
            "asymptote_high": self.params_high_.a,
            "confidence": self.confidence,
            "rounds_needed": 0,
        }

        # 2. Unreachable: the median draw never gets there.
        if not math.isfinite(median):
            return Forecast(
                status=ForecastStatus.UNREACHABLE,
                labels=None,
                low=None,
                high=None,
                message=(
                    f"the {asymptote_text} is below the target {target:.3f}; only "
                    f"{probability:.0%} of plausible curves ever reach it, so no label "
                    "count is forecast"
                ),
                **common,
            )

        # 3. Reachable: whole labels, with the upper end possibly unbounded.
        labels, low, high = (_ceil_labels(value) for value in (median, low, high))
        spent = self.labels_spent_
        high_text = "no upper bound" if math.isinf(high) else f"{high:.0f}"
        if labels <= spent:
            message = (
                f"the curve reaches {target:.3f} at about {labels:.0f} labels "
                f"({self.confidence:.0%} interval {low:.0f} to {high_text}), within the "
                f"{spent:.0f} labels spent"
            )
        else:
            message = (
                f"about {labels:.0f} labels in total ({self.confidence:.0%} interval "
                f"{low:.0f} to {high_text}) to reach {target:.3f}, {labels - spent:.0f} more "
                f"than the {spent:.0f} spent"
            )
            if spent > 0 and labels > LONG_EXTRAPOLATION_FACTOR * spent:
                message += (
                    f". This extrapolates {labels / spent:.0f} times beyond the labels "
                    "spent, so treat it as a rough estimate"
                )
        return Forecast(
            status=ForecastStatus.REACHABLE,
            labels=labels,
            low=low,
            high=high,
            message=message,
            **common,
        )

    def expected_gain(self, next_batch_size: int) -> ExpectedGain:
        """Forecast the accuracy gain of labelling ``next_batch_size`` more images.

        The gain is ``acc(N + k) - acc(N)`` with ``N`` the labels spent and
        ``k = next_batch_size``, as the posterior median over draws with its quantile
        interval.

        Raises
        ------
        InputError
            If ``next_batch_size`` is not a positive integer.
        """
        if (
            isinstance(next_batch_size, bool)
            or not isinstance(next_batch_size, (int, np.integer))
            or next_batch_size < 1
        ):
            raise InputError(
                f"next_batch_size must be a positive whole number of labels, got {next_batch_size!r}"
            )
        size = int(next_batch_size)
        if not self.is_fitted:
            return ExpectedGain(
                status=self.status_ or CurveStatus.TOO_FEW_ROUNDS,
                next_batch_size=size,
                labels_from=self.labels_spent_,
                labels_to=None if self.labels_spent_ is None else self.labels_spent_ + size,
                gain=None,
                low=None,
                high=None,
                confidence=self.confidence,
                rounds_needed=self.rounds_needed_,
                message=self.message_,
            )

        spent = self.labels_spent_
        curves = curve_values(self.draws_, np.array([spent, spent + size]))  # (S, 2)
        gains = curves[:, 1] - curves[:, 0]
        alpha = 1 - self.confidence
        low, gain, high = (float(v) for v in np.quantile(gains, [alpha / 2, 0.5, 1 - alpha / 2]))
        return ExpectedGain(
            status=CurveStatus.FITTED,
            next_batch_size=size,
            labels_from=spent,
            labels_to=spent + size,
            gain=gain,
            low=low,
            high=high,
            confidence=self.confidence,
            rounds_needed=0,
            message=(
                f"the next {size} labels are forecast to add {gain * 100:.2f} accuracy points "
                f"({self.confidence:.0%} interval {low * 100:.2f} to {high * 100:.2f})"
            ),
        )

    def should_stop(self, threshold: float, next_batch_size: int | None = None) -> StopHint:
        """Advise stopping when the next batch is unlikely to add ``threshold`` accuracy.

        The advice is to stop only when the upper end of the gain interval is below
        ``threshold``, so an uncertain curve keeps the project labelling.

        Parameters
        ----------
        threshold
            Smallest accuracy gain, as a fraction, that makes the next batch worth
            labelling (0.005 is half a point).
        next_batch_size
            Size of the next batch. The default is the last step between label counts.

        Raises
        ------
        InputError
            If ``threshold`` is not a fraction in ``(0, 1)``.
        """
        if not (
            isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 < threshold < 1
        ):
            raise InputError(
                f"threshold must be an accuracy gain in (0, 1), got {threshold!r}; "
                "write half a point as 0.005"
            )
        threshold = float(threshold)
        if not self.is_fitted:
            gain = None if next_batch_size is None else self.expected_gain(next_batch_size)
            return StopHint(
                stop=False,
                threshold=threshold,
                gain=gain,
                message=f"keep labelling: {self.message_}",
            )
        if next_batch_size is None:
            # A fitted curve has at least four distinct label counts, so a last step exists.
            next_batch_size = self.last_batch_size_

        gain = self.expected_gain(next_batch_size)
        stop = gain.high < threshold
        if stop:
            message = (
                f"consider stopping: even the upper end of the forecast gain of the next "
                f"{gain.next_batch_size} labels, {gain.high * 100:.2f} points, is below the "
                f"threshold of {threshold * 100:.2f} points"
            )
        else:
            message = (
                f"keep labelling: the next {gain.next_batch_size} labels may add up to "
                f"{gain.high * 100:.2f} points (forecast {gain.gain * 100:.2f}), and the "
                f"threshold is {threshold * 100:.2f} points"
            )
        return StopHint(stop=stop, threshold=threshold, gain=gain, message=message)

    def _reset(self) -> None:
        self.status_: CurveStatus | None = None
        self.message_ = "the learning curve has not been fitted; call fit() with the rounds"
        self.rounds_needed_ = self.n_parameters + 1
        self.params_: PowerLawParameters | None = None
        self.params_low_: PowerLawParameters | None = None
        self.params_high_: PowerLawParameters | None = None
        self.draws_: CurveDraws | None = None
        self.labels_spent_: float | None = None
        self.last_batch_size_: int | None = None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise InputError(f"the learning curve is not fitted: {self.message_}")


def fit_learning_curve(
    labels: Sequence[float] | np.ndarray,
    accuracy: Sequence[float] | np.ndarray,
    n_evaluated: Sequence[int] | np.ndarray | None = None,
    *,
    offset: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    n_draws: int = DEFAULT_N_DRAWS,
    seed: int = 0,
) -> LearningCurve:
    """Build a :class:`LearningCurve` and fit it to the rounds, as the class describes."""
    curve = LearningCurve(offset=offset, confidence=confidence, n_draws=n_draws, seed=seed)
    return curve.fit(labels, accuracy, n_evaluated)


def _parameter_quantile(draws: CurveDraws, q: float) -> PowerLawParameters:
    return PowerLawParameters(
        a=float(np.quantile(draws.a, q)),
        b=float(np.quantile(draws.b, q)),
        c=float(np.quantile(draws.c, q)),
        offset=float(np.quantile(draws.n0, q)),
        accuracy_at_zero=float(np.quantile(draws.y0, q)),
    )


def _ceil_labels(value: float) -> float:
    return float(math.ceil(value)) if math.isfinite(value) else math.inf


def _validate_rounds(
    labels: Sequence[float] | np.ndarray,
    accuracy: Sequence[float] | np.ndarray,
    n_evaluated: Sequence[int] | np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        n = np.asarray(labels, dtype=np.float64)
        y = np.asarray(accuracy, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"labels and accuracy must be numeric arrays: {error}") from error
    if n.ndim != 1:
        raise InputError(f"labels must have shape (R,), got shape {n.shape}")
    if y.shape != n.shape:
        raise InputError(
            f"accuracy must have one value per round like labels {n.shape}, got shape {y.shape}"
        )
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise InputError(f"labels must be finite and non-negative, got {n.tolist()}")
    if not np.all(np.isfinite(y)) or np.any((y < 0) | (y > 1)):
        raise InputError(
            f"accuracy must be fractions in [0, 1], got {y.tolist()}; write 90% as 0.9"
        )
    if n_evaluated is None:
        return n, y, None

    m = np.asarray(n_evaluated)
    if m.shape != n.shape:
        raise InputError(
            f"n_evaluated must have one value per round like labels {n.shape}, got shape {m.shape}"
        )
    if not np.issubdtype(m.dtype, np.integer) or np.any(m < 1):
        raise InputError(
            f"n_evaluated must be positive integers (evaluation images per round), got {m.tolist()}"
        )
    return n, y, m.astype(np.float64)


def _validate_label_grid(labels: Sequence[float] | np.ndarray | float) -> np.ndarray:
    n = np.atleast_1d(np.asarray(labels, dtype=np.float64))
    if n.ndim != 1 or not np.all(np.isfinite(n)) or np.any(n < 0):
        raise InputError(f"labels must be finite, non-negative label counts, got {n.tolist()}")
    return n

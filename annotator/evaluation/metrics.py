"""Per-round classification metrics and calibration on the evaluation split.

Every round stores one :class:`RoundMetrics`: accuracy with a Wilson score interval,
balanced accuracy, macro F1, negative log-likelihood, expected calibration error with the
reliability-diagram data, per-class precision, recall and F1, and the confusion matrix.
The inputs are NumPy arrays: integer labels ``y_true`` of shape ``(n,)`` and predicted
class probabilities ``probs`` of shape ``(n, C)``.

A class without evaluation labels has no recall, so its per-class recall is NaN and
balanced accuracy averages over the classes that have labels (as scikit-learn's
``balanced_accuracy_score`` does). ``RoundMetrics.absent_classes`` names those classes.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from annotator.errors import InputError

logger = logging.getLogger(__name__)

#: Version of the dictionary layout written by :meth:`RoundMetrics.to_dict`.
METRICS_FORMAT_VERSION = 1

DEFAULT_N_BINS = 15
DEFAULT_CONFIDENCE = 0.95
#: Lower bound applied to the true-class probability before the logarithm. It keeps a
#: float32 probability that underflowed to 0 from giving an infinite loss, and it caps
#: each term of the negative log-likelihood at ``-log(1e-7) ≈ 16.1`` nats.
DEFAULT_NLL_CLIP = 1e-7
#: Allowed deviation of a probability row's sum from 1, and of a probability below 0
#: or above 1. It admits float32 softmax rounding over many classes.
DEFAULT_PROBABILITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin of a reliability diagram.

    A bin covers confidences in ``(lower, upper]``, and the first bin also takes ``0``.
    ``mean_confidence`` and ``accuracy`` are NaN when ``count`` is 0.
    """

    lower: float
    upper: float
    count: int
    mean_confidence: float
    accuracy: float


@dataclass(frozen=True)
class RoundMetrics:
    """Classification metrics of one round on the evaluation split.

    Per-class tuples follow the order of ``class_names``. Per-class recall is the
    per-class accuracy. NaN marks a value that the evaluation set does not define:
    recall of a class without labels, precision of a class that is never predicted,
    and F1 of a class that is neither labelled nor predicted.
    """

    class_names: tuple[str, ...]
    n_samples: int
    #: Fraction of argmax predictions that equal the label.
    accuracy: float
    #: Wilson score interval of ``accuracy`` at ``interval_confidence``.
    accuracy_low: float
    accuracy_high: float
    interval_confidence: float
    #: Mean recall over the classes that have at least one evaluation label.
    balanced_accuracy: float
    #: Mean F1 over the classes that are labelled or predicted at least once.
    macro_f1: float
    #: Mean of ``-log(max(p_true, nll_clip))`` in nats.
    nll: float
    nll_clip: float
    #: Expected calibration error over ``reliability``,
    #: ``Σ_b (count_b / n) · |accuracy_b - mean_confidence_b|``.
    ece: float
    reliability: tuple[ReliabilityBin, ...]
    per_class_support: tuple[int, ...]
    per_class_recall: tuple[float, ...]
    per_class_precision: tuple[float, ...]
    per_class_f1: tuple[float, ...]
    #: Counts with rows indexed by the true class and columns by the predicted class.
    #: NOTE: the matrix is dense, so its stored size grows as C²; a project with
    #: thousands of classes stores millions of counts per round.
    confusion: tuple[tuple[int, ...], ...]
    #: Classes without evaluation labels, whose recall is NaN.
    absent_classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.class_names)

    @property
    def n_bins(self) -> int:
        """Number of confidence bins in ``reliability``."""
        return len(self.reliability)

    def to_dict(self) -> dict[str, Any]:
        """Convert to a dictionary that ``json.dumps(..., allow_nan=False)`` accepts.

        NaN becomes ``None`` because strict JSON (and PostgreSQL's ``jsonb``) has no NaN;
        :meth:`from_dict` turns it back into NaN.
        """
        return {
            "version": METRICS_FORMAT_VERSION,
            "class_names": list(self.class_names),
            "n_samples": self.n_samples,
            "accuracy": _nan_to_none(self.accuracy),
            "accuracy_low": _nan_to_none(self.accuracy_low),
            "accuracy_high": _nan_to_none(self.accuracy_high),
            "interval_confidence": self.interval_confidence,
            "balanced_accuracy": _nan_to_none(self.balanced_accuracy),
            "macro_f1": _nan_to_none(self.macro_f1),
            "nll": _nan_to_none(self.nll),
            "nll_clip": self.nll_clip,
            "ece": _nan_to_none(self.ece),
            "reliability": [
                {
                    "lower": b.lower,
                    "upper": b.upper,
                    "count": b.count,
                    "mean_confidence": _nan_to_none(b.mean_confidence),
                    "accuracy": _nan_to_none(b.accuracy),
                }
                for b in self.reliability
            ],
            "per_class_support": list(self.per_class_support),
            "per_class_recall": [_nan_to_none(v) for v in self.per_class_recall],
            "per_class_precision": [_nan_to_none(v) for v in self.per_class_precision],
            "per_class_f1": [_nan_to_none(v) for v in self.per_class_f1],
            "confusion": [list(row) for row in self.confusion],
            "absent_classes": list(self.absent_classes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundMetrics:
        """Rebuild metrics from the output of :meth:`to_dict`.

        Raises
        ------
        InputError
            If ``data`` has another format version or lacks a field.
        """
        if not isinstance(data, Mapping):
            raise InputError(
                "round metrics must be a mapping from RoundMetrics.to_dict(), "
                f"got {type(data).__name__}"
            )
        version = data.get("version")
        if version != METRICS_FORMAT_VERSION:
            raise InputError(
                f"round metrics have format version {version!r}, but this annotator reads "
                f"version {METRICS_FORMAT_VERSION}; recompute the metrics for this round"
            )
        missing = sorted(name for name in cls.__dataclass_fields__ if name not in data)
        if missing:
            raise InputError(
                f"round metrics are missing the fields {missing}; "
                "recompute the metrics for this round"
            )

        return cls(
            class_names=tuple(str(name) for name in data["class_names"]),
            n_samples=int(data["n_samples"]),
            accuracy=_none_to_nan(data["accuracy"]),
            accuracy_low=_none_to_nan(data["accuracy_low"]),
            accuracy_high=_none_to_nan(data["accuracy_high"]),
            interval_confidence=float(data["interval_confidence"]),
            balanced_accuracy=_none_to_nan(data["balanced_accuracy"]),
            macro_f1=_none_to_nan(data["macro_f1"]),
            nll=_none_to_nan(data["nll"]),
            nll_clip=float(data["nll_clip"]),
            ece=_none_to_nan(data["ece"]),
            reliability=tuple(
                ReliabilityBin(
                    lower=float(b["lower"]),
                    upper=float(b["upper"]),
                    count=int(b["count"]),
                    mean_confidence=_none_to_nan(b["mean_confidence"]),
                    accuracy=_none_to_nan(b["accuracy"]),
                )
                for b in data["reliability"]
            ),
            per_class_support=tuple(int(v) for v in data["per_class_support"]),
            per_class_recall=tuple(_none_to_nan(v) for v in data["per_class_recall"]),
            per_class_precision=tuple(_none_to_nan(v) for v in data["per_class_precision"]),
            per_class_f1=tuple(_none_to_nan(v) for v in data["per_class_f1"]),
            confusion=tuple(tuple(int(v) for v in row) for row in data["confusion"]),
            absent_classes=tuple(str(name) for name in data["absent_classes"]),
        )

    def confusion_matrix(self) -> np.ndarray:
        """Return the confusion matrix as an ``int64`` array of shape ``(C, C)``."""
        return np.asarray(self.confusion, dtype=np.int64).reshape(self.n_classes, self.n_classes)

    def per_class_frame(self) -> pd.DataFrame:
        """Return one row per class.

        Columns: ``class_name``, ``support``, ``recall``, ``precision``, ``f1``.
        """
        return pd.DataFrame(
            {
                "class_name": list(self.class_names),
                "support": np.asarray(self.per_class_support, dtype=np.int64),
                "recall": np.asarray(self.per_class_recall, dtype=np.float64),
                "precision": np.asarray(self.per_class_precision, dtype=np.float64),
                "f1": np.asarray(self.per_class_f1, dtype=np.float64),
            }
        )

    def reliability_frame(self) -> pd.DataFrame:
        """Return one row per confidence bin.

        Columns: ``lower``, ``upper``, ``count``, ``mean_confidence``, ``accuracy``.
        """
        return pd.DataFrame(
            {
                "lower": [b.lower for b in self.reliability],
                "upper": [b.upper for b in self.reliability],
                "count": np.asarray([b.count for b in self.reliability], dtype=np.int64),
                "mean_confidence": [b.mean_confidence for b in self.reliability],
                "accuracy": [b.accuracy for b in self.reliability],
            }
        )

    def confusion_frame(self) -> pd.DataFrame:
        """Return the confusion matrix in long form, one row per (true, predicted) pair.

        Columns: ``true_class``, ``predicted_class``, ``count``, and ``row_fraction``
        (``count`` divided by the true class's support, NaN for a class without labels).
        """
        matrix = self.confusion_matrix()
        support = matrix.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            row_fraction = np.where(support > 0, matrix / np.maximum(support, 1), np.nan)

        true_index, predicted_index = np.meshgrid(
            np.arange(self.n_classes), np.arange(self.n_classes), indexing="ij"
        )
        names = np.asarray(self.class_names, dtype=object)
        return pd.DataFrame(
            {
                "true_class": names[true_index.ravel()],
                "predicted_class": names[predicted_index.ravel()],
                "count": matrix.ravel(),
                "row_fraction": row_fraction.ravel(),
            }
        )


def wilson_interval(
    successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Compute the Wilson score interval of a binomial proportion.

    With ``p = successes / n`` and ``z`` the standard normal quantile at
    ``(1 + confidence) / 2``::

        center = (p + z² / (2 n)) / (1 + z² / n)
        half   = z / (1 + z² / n) · sqrt(p (1 - p) / n + z² / (4 n²))

    and the interval is ``[center - half, center + half]``. Its endpoints are the
    proportions that a two-sided score test at level ``1 - confidence`` does not
    reject. Unlike the normal (Wald) interval it stays inside ``[0, 1]`` and has
    non-zero width at ``p = 0`` and ``p = 1``.

    Parameters
    ----------
    successes
        Number of successes, ``0 <= successes <= n``.
    n
        Number of trials, at least 1.
    confidence
        Coverage of the interval, in ``(0, 1)``.

    Returns
    -------
    tuple of float
        ``(low, high)``.
    """
    if isinstance(successes, bool) or not isinstance(successes, (int, np.integer)):
        raise InputError(f"successes must be an integer, got {successes!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InputError(f"n must be an integer, got {n!r}")
    if n < 1:
        raise InputError(f"n must be at least 1 to bound a proportion, got {n}")
    if not 0 <= successes <= n:
        raise InputError(f"successes must be between 0 and n={n}, got {successes}")
    _validate_confidence(confidence)
    return _wilson_interval(int(successes), int(n), float(confidence))


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_N_BINS
) -> tuple[ReliabilityBin, ...]:
    """Group predictions into equal-width confidence bins for a reliability diagram.

    Bin ``k`` (0-based) covers confidences in ``(k / n_bins, (k + 1) / n_bins]``, and
    bin 0 also takes confidence 0.

    Parameters
    ----------
    confidence
        Confidence of each prediction, shape ``(n,)``, values in ``[0, 1]``, usually the
        maximum predicted probability.
    correct
        Whether each prediction is correct, shape ``(n,)``, boolean or 0/1.
    n_bins
        Number of bins, at least 1.

    Returns
    -------
    tuple of ReliabilityBin
        ``n_bins`` bins in increasing order of confidence.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct)
    if confidence.ndim != 1:
        raise InputError(f"confidence must have shape (n,), got shape {confidence.shape}")
    if correct.shape != confidence.shape:
        raise InputError(
            f"correct must have the shape of confidence {confidence.shape}, got {correct.shape}"
        )
    if not np.all(np.isfinite(confidence)) or np.any((confidence < 0) | (confidence > 1)):
        raise InputError("confidence must contain finite values in [0, 1]")
    if not np.all((correct == 0) | (correct == 1)):
        raise InputError("correct must contain only booleans or the integers 0 and 1")
    _validate_n_bins(n_bins)
    return _calibration_bins(confidence, correct.astype(np.float64), n_bins)


def expected_calibration_error(bins: Sequence[ReliabilityBin]) -> float:
    """Compute ``ECE = Σ_b (count_b / n) · |accuracy_b - mean_confidence_b|`` over ``bins``.

    Empty bins contribute nothing. Returns NaN when every bin is empty.
    """
    n = sum(b.count for b in bins)
    if n == 0:
        return math.nan
    return float(
        sum(b.count / n * abs(b.accuracy - b.mean_confidence) for b in bins if b.count > 0)
    )


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    n_bins: int = DEFAULT_N_BINS,
    confidence: float = DEFAULT_CONFIDENCE,
    nll_clip: float = DEFAULT_NLL_CLIP,
    tolerance: float = DEFAULT_PROBABILITY_TOLERANCE,
) -> RoundMetrics:
    """Compute one round's metrics from labels and predicted probabilities.

    The predicted class is ``argmax(probs, axis=1)``, and ties go to the lowest class index.

    Parameters
    ----------
    y_true
        True class indices, integer array of shape ``(n,)`` with values in ``[0, C)``.
    probs
        Predicted class probabilities, shape ``(n, C)``. Entries must be finite and in
        ``[0, 1]``, and each row must sum to 1, all within ``tolerance``.
    class_names
        ``C`` distinct names, in the column order of ``probs``.
    n_bins
        Number of equal-width confidence bins for the calibration error.
    confidence
        Coverage of the accuracy interval.
    nll_clip
        Lower bound on the true-class probability in the negative log-likelihood,
        ``nll = mean(-log(max(probs[i, y_true[i]], nll_clip)))``.
    tolerance
        Allowed deviation of a probability from ``[0, 1]`` and of a row sum from 1.

    Returns
    -------
    RoundMetrics

    Raises
    ------
    InputError
        If a shape, a label, a probability or an option is invalid.
    """
    y_true, probs, names = _validate_predictions(y_true, probs, class_names, tolerance)
    _validate_n_bins(n_bins)
    _validate_confidence(confidence)
    if not (isinstance(nll_clip, (int, float)) and 0 < nll_clip < 1):
        raise InputError(f"nll_clip must be a number in (0, 1), got {nll_clip!r}")

    n, n_classes = probs.shape
    y_pred = np.argmax(probs, axis=1)
    correct = y_pred == y_true

    # 1. Accuracy and its interval.
    successes = int(correct.sum())
    accuracy = successes / n
    accuracy_low, accuracy_high = _wilson_interval(successes, n, confidence)

    # 2. Confusion matrix (rows true, columns predicted) and per-class scores.
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_positives = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, true_positives / support, np.nan)
        precision = np.where(predicted_count > 0, true_positives / predicted_count, np.nan)
        # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted_count); it is 0 for a
        # class that is labelled or predicted but never both, as in scikit-learn.
        denominator = support + predicted_count
        f1 = np.where(denominator > 0, 2 * true_positives / denominator, np.nan)

    absent = tuple(names[k] for k in np.flatnonzero(support == 0))
    if absent:
        logger.warning(
            "classes without evaluation labels have no recall and are left out of "
            "balanced accuracy: %s",
            ", ".join(absent),
        )
    balanced_accuracy = float(np.nanmean(recall))
    macro_f1 = float(np.nanmean(f1))

    # 3. Negative log-likelihood with the true-class probability clipped from below.
    true_class_probs = probs[np.arange(n), y_true]
    nll = float(np.mean(-np.log(np.maximum(true_class_probs, nll_clip))))

    # 4. Calibration over equal-width bins of the top-class probability.
    top_confidence = np.clip(probs[np.arange(n), y_pred], 0.0, 1.0)
    bins = _calibration_bins(top_confidence, correct.astype(np.float64), n_bins)
    ece = expected_calibration_error(bins)

    return RoundMetrics(
        class_names=names,
        n_samples=n,
        accuracy=accuracy,
        accuracy_low=accuracy_low,
        accuracy_high=accuracy_high,
        interval_confidence=float(confidence),
        balanced_accuracy=balanced_accuracy,
        macro_f1=macro_f1,
        nll=nll,
        nll_clip=float(nll_clip),
        ece=ece,
        reliability=bins,
        per_class_support=tuple(int(v) for v in support),
        per_class_recall=tuple(float(v) for v in recall),
        per_class_precision=tuple(float(v) for v in precision),
        per_class_f1=tuple(float(v) for v in f1),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        absent_classes=absent,
    )


def _wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 (p = 1) the lower (upper) end is exactly 0 (1); rounding would leave ±1e-17.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[ReliabilityBin, ...]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted with side="left" puts c in bin k when edges[k] < c <= edges[k + 1],
    # and the clip sends c = 0 to bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)

    bins = []
    for k in range(n_bins):
        if count[k] > 0:
            mean_confidence = float(confidence_sum[k] / count[k])
            accuracy = float(correct_sum[k] / count[k])
        else:
            mean_confidence = accuracy = math.nan
        bins.append(
            ReliabilityBin(
                lower=float(edges[k]),
                upper=float(edges[k + 1]),
                count=int(count[k]),
                mean_confidence=mean_confidence,
                accuracy=accuracy,
            )
        )
    return tuple(bins)


def _validate_predictions(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], tolerance: float
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise InputError(
            f"class_names must be a sequence of strings, got {type(class_names).__name__}"
        )
    names = tuple(class_names)
    bad_names = [name for name in names if not isinstance(name, str) or not name]
    if bad_names:
        raise InputError(f"class names must be non-empty strings, got {bad_names[:5]!r}")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InputError(f"class names must be distinct, got duplicates {duplicates}")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise InputError(f"tolerance must be a number in [0, 1), got {tolerance!r}")

    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise InputError(f"probs must have shape (n, C), got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise InputError(f"probs must be a floating-point array, got dtype {probs.dtype}")
    n, n_classes = probs.shape
    if n == 0:
        raise InputError(
            "probs has no rows: the evaluation split is empty; label evaluation images first"
        )
    if n_classes != len(names):
        raise InputError(
            f"probs has {n_classes} columns but there are {len(names)} class names; "
            "pass one name per column"
        )
    if n_classes < 2:
        raise InputError(f"classification needs at least 2 classes, got {n_classes}")
    probs = probs.astype(np.float64)
    if not np.all(np.isfinite(probs)):
        rows = np.flatnonzero(~np.all(np.isfinite(probs), axis=1))
        raise InputError(f"probs contains NaN or infinity in rows {rows[:5].tolist()}")
    out_of_range = (probs < -tolerance) | (probs > 1 + tolerance)
    if np.any(out_of_range):
        row, column = np.argwhere(out_of_range)[0]
        raise InputError(
            f"probs[{row}, {column}] = {float(probs[row, column])!r} is not a probability; "
            "pass softmax outputs, not logits"
        )
    row_sums = probs.sum(axis=1)
    bad_rows = np.flatnonzero(np.abs(row_sums - 1) > tolerance)
    if bad_rows.size:
        first = int(bad_rows[0])
        raise InputError(
            f"probability rows must sum to 1 within {tolerance}, but row {first} sums to "
            f"{float(row_sums[first])!r} ({bad_rows.size} rows fail); pass softmax outputs, not logits"
        )

    y_true = np.asarray(y_true)
    if y_true.shape != (n,):
        raise InputError(f"y_true must have shape ({n},) to match probs, got shape {y_true.shape}")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise InputError(
            f"y_true must contain integer class indices, got dtype {y_true.dtype}; "
            "convert with y_true.astype(int)"
        )
    bad_labels = np.flatnonzero((y_true < 0) | (y_true >= n_classes))
    if bad_labels.size:
        first = int(bad_labels[0])
        raise InputError(
            f"y_true[{first}] = {int(y_true[first])} is not a class index in [0, {n_classes})"
        )
    return y_true.astype(np.int64), probs, names


def _validate_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer, got {n_bins!r}")


def _validate_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise InputError(f"confidence must be a number in (0, 1), got {confidence!r}")


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _none_to_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)

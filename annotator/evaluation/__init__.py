"""Per-round metrics, the learning-curve forecast and charts of labelling progress.

Pure NumPy, pandas and Altair: no database, no Streamlit and no torch. Services convert
tensors to arrays before calling in.
"""

from __future__ import annotations

from annotator.evaluation.curve import (
    CurveStatus,
    ExpectedGain,
    Forecast,
    ForecastStatus,
    LearningCurve,
    PowerLawParameters,
    StopHint,
    fit_learning_curve,
)
from annotator.evaluation.metrics import (
    ReliabilityBin,
    RoundMetrics,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    wilson_interval,
)

__all__ = [
    "CurveStatus",
    "ExpectedGain",
    "Forecast",
    "ForecastStatus",
    "LearningCurve",
    "PowerLawParameters",
    "ReliabilityBin",
    "RoundMetrics",
    "StopHint",
    "calibration_bins",
    "classification_metrics",
    "expected_calibration_error",
    "fit_learning_curve",
    "wilson_interval",
]

"""Per-round metrics, the learning-curve forecast and charts of labelling progress.

Pure NumPy, pandas and Altair: no database, no Streamlit and no torch. Services convert
tensors to arrays before calling in.
"""

from __future__ import annotations

from annotator.evaluation.charts import (
    accuracy_chart,
    budget_chart,
    chart_to_html,
    chart_to_png_bytes,
    class_counts_chart,
    confusion_chart,
    frame_to_csv_bytes,
    labelling_rate_frame,
    labels_per_hour_chart,
    per_class_accuracy_chart,
    per_class_accuracy_frame,
    reliability_chart,
    save_chart,
    simulation_chart,
    summarize_simulation,
)
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
    "accuracy_chart",
    "budget_chart",
    "calibration_bins",
    "chart_to_html",
    "chart_to_png_bytes",
    "class_counts_chart",
    "classification_metrics",
    "confusion_chart",
    "expected_calibration_error",
    "fit_learning_curve",
    "frame_to_csv_bytes",
    "labelling_rate_frame",
    "labels_per_hour_chart",
    "per_class_accuracy_chart",
    "per_class_accuracy_frame",
    "reliability_chart",
    "save_chart",
    "simulation_chart",
    "summarize_simulation",
    "wilson_interval",
]

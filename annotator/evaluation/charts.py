"""Altair chart builders for the Progress dashboard and the strategy simulation.

Each builder takes a pandas DataFrame with the columns its docstring lists and returns an
``altair`` chart. Builders for dashboard panels return a chart with a short message when
the frame has no rows, because an empty project is a normal state. The data is embedded
in the chart as inline values, so Altair's 5,000-row limit does not apply, and NaN is
written as ``null``, which Vega-Lite leaves out of marks.

:func:`save_chart` writes PNG or self-contained HTML without network access (PNG through
``vl-convert``, HTML with the Vega JavaScript inlined), and :func:`chart_to_png_bytes`
and :func:`frame_to_csv_bytes` produce the bytes for download buttons.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import altair as alt
import numpy as np
import pandas as pd
import vl_convert

from annotator.errors import AnnotatorError, InputError
from annotator.evaluation.metrics import wilson_interval

logger = logging.getLogger(__name__)

DEFAULT_WIDTH = 600
DEFAULT_HEIGHT = 320
#: Above this many classes the confusion heatmap drops the count printed in each cell.
CONFUSION_TEXT_MAX_CLASSES = 20
#: Candidate bucket widths of the labelling-rate chart, narrowest first.
RATE_BUCKETS = ("1h", "2h", "3h", "6h", "12h", "1D", "7D")
#: The rate chart uses the narrowest bucket that gives at most this many buckets.
RATE_MAX_BUCKETS = 500
ALL_ANNOTATORS = "all annotators"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SimulationBand = Literal["sem", "minmax"]

# Tags that would make a browser fetch code from the network.
_REMOTE_RESOURCE_PATTERNS = (
    re.compile(r"<script[^>]*\ssrc\s*=\s*[\"']?\s*(?:https?:)?//", re.IGNORECASE),
    re.compile(r"<link[^>]*\shref\s*=\s*[\"']?\s*(?:https?:)?//", re.IGNORECASE),
    re.compile(r"\bimport\b[^;\n]*\bfrom\s*[\"'](?:https?:)?//", re.IGNORECASE),
    re.compile(r"\bimport\s*\(\s*[\"'](?:https?:)?//", re.IGNORECASE),
)


# Accuracy and forecast.


def accuracy_chart(
    rounds: pd.DataFrame,
    *,
    forecast: pd.DataFrame | None = None,
    target: float | None = None,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
) -> alt.Chart | alt.LayerChart:
    """Plot accuracy against labels spent with its 95% band, one series per predictive.

    Parameters
    ----------
    rounds
        One row per round and predictive, with columns ``labels_spent`` (round 0,
        zero-shot, has 0), ``accuracy``, ``accuracy_low``, ``accuracy_high`` (its
        interval) and ``predictive`` (series name, such as ``"Bayesian"`` or ``"MAP"``).
        An optional ``round`` column is shown in tooltips.
    forecast
        Optional learning-curve forecast with columns ``labels_spent``, ``accuracy``,
        ``low`` and ``high``, as from ``LearningCurve.curve_frame``, drawn dashed with
        its band.
    target
        Optional target accuracy, drawn as a horizontal rule.
    """
    _require_columns(
        rounds,
        "rounds",
        ["labels_spent", "accuracy", "accuracy_low", "accuracy_high", "predictive"],
    )
    if target is not None and not (isinstance(target, (int, float)) and 0 < target < 1):
        raise InputError(f"target must be an accuracy in (0, 1), got {target!r}")
    if rounds.empty:
        return _empty_chart("no evaluated rounds yet", width, height)

    frame = rounds.copy()
    frame["predictive"] = frame["predictive"].astype(str)
    tooltip = [
        alt.Tooltip("predictive:N", title="predictive"),
        alt.Tooltip("labels_spent:Q", title="labels spent"),
        alt.Tooltip("accuracy:Q", title="accuracy", format=".3f"),
        alt.Tooltip("accuracy_low:Q", title="95% low", format=".3f"),
        alt.Tooltip("accuracy_high:Q", title="95% high", format=".3f"),
    ]
    if "round" in frame.columns:
        tooltip.insert(0, alt.Tooltip("round:Q", title="round"))
    columns = ["labels_spent", "accuracy", "accuracy_low", "accuracy_high", "predictive"]
    columns += ["round"] if "round" in frame.columns else []

    base = alt.Chart(_inline_data(frame[columns]))
    x = alt.X("labels_spent:Q", title="labels spent", axis=alt.Axis(format="d", tickMinStep=1))
    color = alt.Color("predictive:N", title="predictive")
    band = base.mark_area(opacity=0.2).encode(
        x=x,
        y=alt.Y("accuracy_low:Q", title="accuracy", scale=alt.Scale(zero=False)),
        y2="accuracy_high:Q",
        color=color,
    )
    line = base.mark_line(point=True).encode(x=x, y="accuracy:Q", color=color, tooltip=tooltip)
    layers: list[alt.Chart] = [band, line]
    zero_shot = frame.loc[frame["labels_spent"] == 0, "accuracy"]
    if not zero_shot.empty:
        # One label for round 0 at the mean of the series, which start close together.
        zero_shot_frame = pd.DataFrame(
            {"labels_spent": [0.0], "accuracy": [float(zero_shot.mean())]}
        )
        layers.append(
            alt.Chart(_inline_data(zero_shot_frame))
            .mark_text(align="left", dx=8, dy=-10, fontSize=11)
            .encode(x="labels_spent:Q", y="accuracy:Q", text=alt.value("zero-shot"))
        )

    if forecast is not None and not forecast.empty:
        _require_columns(forecast, "forecast", ["labels_spent", "accuracy", "low", "high"])
        forecast_base = alt.Chart(
            _inline_data(forecast[["labels_spent", "accuracy", "low", "high"]])
        )
        layers.insert(
            0,
            forecast_base.mark_area(opacity=0.12, color="gray").encode(
                x="labels_spent:Q", y="low:Q", y2="high:Q"
            ),
        )
        layers.insert(
            1,
            forecast_base.mark_line(strokeDash=[6, 4], color="gray").encode(
                x="labels_spent:Q",
                y="accuracy:Q",
                tooltip=[
                    alt.Tooltip("labels_spent:Q", title="labels spent"),
                    alt.Tooltip("accuracy:Q", title="forecast", format=".3f"),
                    alt.Tooltip("low:Q", title="low", format=".3f"),
                    alt.Tooltip("high:Q", title="high", format=".3f"),
                ],
            ),
        )
    if target is not None:
        target_frame = pd.DataFrame({"target": [float(target)], "text": [f"target {target:.3f}"]})
        target_base = alt.Chart(_inline_data(target_frame))
        layers.append(
            target_base.mark_rule(color="firebrick", strokeDash=[2, 2]).encode(y="target:Q")
        )
        layers.append(
            target_base.mark_text(align="left", baseline="bottom", dx=4, color="firebrick").encode(
                y="target:Q", x=alt.value(0), text="text:N"
            )
        )
    return alt.layer(*layers).properties(
        width=width, height=height, title="Accuracy on the evaluation split"
    )


# Labelling activity and budget.


def labels_per_hour_chart(
    labels: pd.DataFrame,
    *,
    bucket: str | None = None,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
) -> alt.Chart | alt.LayerChart:
    """Plot the labelling rate over time, overall and per annotator.

    Labels are counted in fixed time buckets and the count is divided by the bucket's
    length in hours, so the y axis reads in labels per hour whatever the bucket width.

    Parameters
    ----------
    labels
        One row per label with columns ``created_at`` (time stamps; time-zone-aware
        values are converted to UTC) and ``annotator`` (name).
    bucket
        Bucket width as a pandas offset alias (``"1h"``, ``"1D"``). By default the
        narrowest of ``RATE_BUCKETS`` that yields at most ``RATE_MAX_BUCKETS`` buckets.
    """
    rate = labelling_rate_frame(labels, bucket=bucket)
    if rate.empty:
        return _empty_chart("no labels yet", width, height)

    bucket_width = rate.attrs["bucket"]
    time_title = (
        "time (bucket start, UTC)" if rate.attrs["time_zone"] == "UTC" else "time (bucket start)"
    )
    rate = rate.assign(is_total=rate["annotator"] == ALL_ANNOTATORS)
    base = alt.Chart(_inline_data(rate))
    return (
        base.mark_line(point=True, interpolate="step-after")
        .encode(
            x=alt.X("bucket_start:T", title=time_title),
            y=alt.Y("labels_per_hour:Q", title="labels per hour"),
            color=alt.Color("annotator:N", title="annotator"),
            strokeWidth=alt.condition(alt.datum.is_total, alt.value(3), alt.value(1.5)),
            tooltip=[
                alt.Tooltip("annotator:N"),
                alt.Tooltip("bucket_start:T", title="from", format="%Y-%m-%d %H:%M"),
                alt.Tooltip("labels:Q", title="labels"),
                alt.Tooltip("labels_per_hour:Q", title="labels per hour", format=".1f"),
            ],
        )
        .properties(width=width, height=height, title=f"Labels per hour ({bucket_width} buckets)")
    )


def labelling_rate_frame(labels: pd.DataFrame, *, bucket: str | None = None) -> pd.DataFrame:
    """Count labels per time bucket, overall and per annotator.

    Returns
    -------
    pandas.DataFrame
        Columns ``bucket_start``, ``annotator`` (with ``ALL_ANNOTATORS`` for the total),
        ``labels`` and ``labels_per_hour``. Buckets without labels between the first and
        the last label appear with 0. ``frame.attrs["bucket"]`` is the bucket width and
        ``frame.attrs["time_zone"]`` is ``"UTC"`` when the input was time-zone-aware.
    """
    _require_columns(labels, "labels", ["created_at", "annotator"])
    if labels.empty:
        frame = pd.DataFrame(
            {
                "bucket_start": pd.Series([], dtype="datetime64[ns]"),
                "annotator": [],
                "labels": [],
                "labels_per_hour": [],
            }
        )
        frame.attrs["bucket"] = bucket or RATE_BUCKETS[0]
        frame.attrs["time_zone"] = None
        return frame

    try:
        times = pd.to_datetime(labels["created_at"])
    except (TypeError, ValueError) as error:
        raise InputError(f"labels.created_at must contain time stamps: {error}") from error
    if times.isna().any():
        raise InputError(
            f"labels.created_at has {int(times.isna().sum())} missing time stamps; drop or fill them"
        )
    if times.dt.tz is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
        time_zone = "UTC"
    else:
        time_zone = None
    annotators = labels["annotator"].astype(str).to_numpy()
    if np.any(annotators == ALL_ANNOTATORS):
        raise InputError(
            f"annotator name {ALL_ANNOTATORS!r} is reserved for the total; rename that annotator"
        )

    width = _rate_bucket(times, bucket)
    hours = pd.Timedelta(width).total_seconds() / 3600
    starts = times.dt.floor(width)
    full_range = pd.date_range(starts.min(), starts.max(), freq=width)

    pieces = []
    counts = pd.DataFrame({"bucket_start": starts.to_numpy(), "annotator": annotators})
    for name, group in [(ALL_ANNOTATORS, counts), *counts.groupby("annotator", sort=True)]:
        per_bucket = group.groupby("bucket_start").size().reindex(full_range, fill_value=0)
        pieces.append(
            pd.DataFrame(
                {
                    "bucket_start": full_range,
                    "annotator": name,
                    "labels": per_bucket.to_numpy().astype(np.int64),
                }
            )
        )
    frame = pd.concat(pieces, ignore_index=True)
    frame["labels_per_hour"] = frame["labels"] / hours
    frame.attrs["bucket"] = width
    frame.attrs["time_zone"] = time_zone
    return frame


def class_counts_chart(
    counts: pd.DataFrame, *, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT
) -> alt.Chart:
    """Plot label counts per class as horizontal bars, largest class first.

    Parameters
    ----------
    counts
        Columns ``class_name`` and ``count``, and optionally ``split`` (such as
        ``"pool"`` and ``"evaluation"``), which stacks the bars by colour.
    """
    _require_columns(counts, "counts", ["class_name", "count"])
    if counts.empty:
        return _empty_chart("no labels yet", width, height)
    frame = counts.copy()
    frame["class_name"] = frame["class_name"].astype(str)
    order = frame.groupby("class_name")["count"].sum().sort_values(ascending=False).index.tolist()
    encoding = {
        "x": alt.X("count:Q", title="labels"),
        "y": alt.Y("class_name:N", title=None, sort=order),
        "tooltip": [
            alt.Tooltip("class_name:N", title="class"),
            alt.Tooltip("count:Q", title="labels"),
        ],
    }
    columns = ["class_name", "count"]
    if "split" in frame.columns:
        frame["split"] = frame["split"].astype(str)
        encoding["color"] = alt.Color("split:N", title="split")
        encoding["tooltip"].append(alt.Tooltip("split:N"))
        columns.append("split")
    bar_height = max(height, 18 * len(order))
    return (
        alt.Chart(_inline_data(frame[columns]))
        .mark_bar()
        .encode(**encoding)
        .properties(width=width, height=bar_height, title="Labels per class")
    )


def budget_chart(
    used: int, planned: int, *, width: int = DEFAULT_WIDTH, height: int = 60
) -> alt.LayerChart:
    """Plot labels spent against the planned budget as a bullet bar.

    The grey bar is the planned budget and the coloured bar the labels spent, red when
    they exceed the plan.
    """
    for name, value in (("used", used), ("planned", planned)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{name} must be a non-negative whole number of labels, got {value!r}")
    if planned == 0:
        raise InputError("planned must be at least 1 label; set the project's label budget")
    fraction = used / planned
    frame = pd.DataFrame(
        {
            "row": ["budget"],
            "planned": [int(planned)],
            "used": [int(used)],
            "text": [f"{used} of {planned} labels ({fraction:.0%})"],
            "over": [used > planned],
        }
    )
    base = alt.Chart(_inline_data(frame))
    y = alt.Y("row:N", title=None, axis=None)
    planned_bar = base.mark_bar(color="lightgray", size=30).encode(
        x=alt.X("planned:Q", title="labels", scale=alt.Scale(domain=[0, max(used, planned)])), y=y
    )
    used_bar = base.mark_bar(size=14).encode(
        x="used:Q",
        y=y,
        color=alt.condition(alt.datum.over, alt.value("firebrick"), alt.value("steelblue")),
        tooltip=[alt.Tooltip("used:Q", title="used"), alt.Tooltip("planned:Q", title="planned")],
    )
    text = base.mark_text(align="left", dx=6, baseline="middle").encode(
        x=alt.value(0), y=y, text="text:N"
    )
    return alt.layer(planned_bar, used_bar, text).properties(
        width=width, height=height, title="Budget used"
    )


# Calibration and per-class quality.


def reliability_chart(
    bins: pd.DataFrame,
    *,
    ece: float | None = None,
    width: int = 360,
    height: int = 360,
) -> alt.Chart | alt.LayerChart:
    """Plot a reliability diagram: accuracy per confidence bin against the diagonal.

    Parameters
    ----------
    bins
        One row per bin with columns ``lower``, ``upper``, ``count``,
        ``mean_confidence`` and ``accuracy``, as from ``RoundMetrics.reliability_frame``.
        Empty bins (``count == 0``) are not drawn.
    ece
        Optional expected calibration error to show in the title.
    """
    _require_columns(bins, "bins", ["lower", "upper", "count", "mean_confidence", "accuracy"])
    occupied = bins[bins["count"] > 0]
    if occupied.empty:
        return _empty_chart("no evaluated predictions", width, height)

    base = alt.Chart(
        _inline_data(occupied[["lower", "upper", "count", "mean_confidence", "accuracy"]])
    )
    # Circles would otherwise pad the scale beyond [0, 1].
    unit = alt.Scale(domain=[0, 1], nice=False, padding=0)
    bars = base.mark_bar(opacity=0.6, stroke="white").encode(
        x=alt.X("lower:Q", title="confidence", scale=unit),
        x2="upper:Q",
        y=alt.Y("accuracy:Q", title="accuracy", scale=unit),
        y2=alt.datum(0),
        tooltip=[
            alt.Tooltip("lower:Q", title="from", format=".2f"),
            alt.Tooltip("upper:Q", title="to", format=".2f"),
            alt.Tooltip("count:Q", title="predictions"),
            alt.Tooltip("mean_confidence:Q", title="mean confidence", format=".3f"),
            alt.Tooltip("accuracy:Q", title="accuracy", format=".3f"),
        ],
    )
    points = base.mark_circle(color="black").encode(
        x="mean_confidence:Q", y="accuracy:Q", size=alt.Size("count:Q", title="predictions")
    )
    diagonal = (
        alt.Chart(_inline_data(pd.DataFrame({"x": [0.0, 1.0], "y": [0.0, 1.0]})))
        .mark_line(color="gray", strokeDash=[4, 4])
        .encode(x="x:Q", y="y:Q")
    )
    title = "Reliability diagram" if ece is None else f"Reliability diagram (ECE {ece:.3f})"
    return alt.layer(diagonal, bars, points).properties(width=width, height=height, title=title)


def confusion_chart(
    confusion: pd.DataFrame,
    *,
    normalize: bool = True,
    class_order: Sequence[str] | None = None,
    width: int = 420,
    height: int = 420,
) -> alt.Chart | alt.LayerChart:
    """Plot the confusion matrix as a heatmap, true classes on rows.

    Parameters
    ----------
    confusion
        Long form with columns ``true_class``, ``predicted_class``, ``count`` and
        ``row_fraction``, as from ``RoundMetrics.confusion_frame``.
    normalize
        Colour by the fraction of each true class (recall on the diagonal) rather than
        by raw counts.
    class_order
        Order of the axes; by default the order of first appearance in ``confusion``.
    """
    _require_columns(
        confusion, "confusion", ["true_class", "predicted_class", "count", "row_fraction"]
    )
    if confusion.empty:
        return _empty_chart("no evaluated predictions", width, height)
    frame = confusion[["true_class", "predicted_class", "count", "row_fraction"]].copy()
    frame["true_class"] = frame["true_class"].astype(str)
    frame["predicted_class"] = frame["predicted_class"].astype(str)
    order = (
        list(class_order)
        if class_order is not None
        else list(dict.fromkeys([*frame["true_class"], *frame["predicted_class"]]))
    )

    value = "row_fraction:Q" if normalize else "count:Q"
    legend_title = "fraction of true class" if normalize else "count"
    base = alt.Chart(_inline_data(frame))
    cells = base.mark_rect().encode(
        x=alt.X("predicted_class:N", title="predicted class", sort=order),
        y=alt.Y("true_class:N", title="true class", sort=order),
        color=alt.Color(value, title=legend_title, scale=alt.Scale(scheme="blues")),
        tooltip=[
            alt.Tooltip("true_class:N", title="true"),
            alt.Tooltip("predicted_class:N", title="predicted"),
            alt.Tooltip("count:Q", title="count"),
            alt.Tooltip("row_fraction:Q", title="fraction of true class", format=".2f"),
        ],
    )
    chart: alt.Chart | alt.LayerChart = cells
    if len(order) <= CONFUSION_TEXT_MAX_CLASSES:
        text = base.mark_text(fontSize=10).encode(
            x=alt.X("predicted_class:N", sort=order),
            y=alt.Y("true_class:N", sort=order),
            text="count:Q",
            color=alt.condition(
                alt.datum.row_fraction > 0.5, alt.value("white"), alt.value("black")
            ),
        )
        chart = alt.layer(cells, text)
    return chart.properties(width=width, height=height, title="Confusion matrix")


def per_class_accuracy_chart(
    per_class: pd.DataFrame,
    *,
    confidence: float = 0.95,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
) -> alt.Chart | alt.LayerChart:
    """Plot per-class accuracy (recall) with Wilson intervals.

    Classes without evaluation labels get no bar and the text "no labels".

    Parameters
    ----------
    per_class
        Columns ``class_name``, ``support`` and ``recall``, as from
        ``RoundMetrics.per_class_frame``.
    confidence
        Coverage of the error bars.
    """
    frame = per_class_accuracy_frame(per_class, confidence=confidence)
    if frame.empty:
        return _empty_chart("no classes", width, height)

    base = alt.Chart(_inline_data(frame))
    y = alt.Y("class_name:N", title=None, sort=frame["class_name"].tolist())
    unit = alt.Scale(domain=[0, 1])
    bars = base.mark_bar().encode(
        x=alt.X("recall:Q", title="accuracy (recall)", scale=unit, axis=alt.Axis(format="%")),
        y=y,
        tooltip=[
            alt.Tooltip("class_name:N", title="class"),
            alt.Tooltip("support:Q", title="evaluation labels"),
            alt.Tooltip("recall:Q", title="recall", format=".3f"),
            alt.Tooltip("recall_low:Q", title=f"{confidence:.0%} low", format=".3f"),
            alt.Tooltip("recall_high:Q", title=f"{confidence:.0%} high", format=".3f"),
        ],
    )
    error_bars = base.mark_rule(color="black").encode(x="recall_low:Q", x2="recall_high:Q", y=y)
    missing = (
        base.transform_filter(alt.datum.support == 0)
        .mark_text(align="left", dx=4, color="gray")
        .encode(x=alt.value(0), y=y, text=alt.value("no labels"))
    )
    bar_height = max(height, 18 * len(frame))
    return alt.layer(bars, error_bars, missing).properties(
        width=width, height=bar_height, title="Accuracy per class"
    )


def per_class_accuracy_frame(per_class: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """Add Wilson interval columns ``recall_low`` and ``recall_high`` to per-class recall.

    The number of correct predictions of a class is ``round(recall · support)``; classes
    with ``support == 0`` get NaN bounds.
    """
    _require_columns(per_class, "per_class", ["class_name", "support", "recall"])
    frame = per_class[["class_name", "support", "recall"]].copy()
    frame["class_name"] = frame["class_name"].astype(str)
    lows, highs = [], []
    for support, recall in zip(frame["support"], frame["recall"], strict=True):
        if support > 0 and math.isfinite(recall):
            low, high = wilson_interval(int(round(recall * support)), int(support), confidence)
        else:
            low = high = math.nan
        lows.append(low)
        highs.append(high)
    frame["recall_low"] = lows
    frame["recall_high"] = highs
    return frame


# Strategy simulation.


def summarize_simulation(results: pd.DataFrame, *, band: SimulationBand = "sem") -> pd.DataFrame:
    """Summarise simulated runs across seeds, per strategy and label count.

    Parameters
    ----------
    results
        One row per (strategy, seed, round) with columns ``strategy``, ``seed``,
        ``labels_spent`` and ``accuracy``; other columns are ignored.
    band
        ``"sem"``: mean ± one standard error of the mean across seeds,
        ``std(ddof=1) / sqrt(n_seeds)``, undefined (NaN) with a single seed.
        ``"minmax"``: the lowest and highest accuracy across seeds.

    Returns
    -------
    pandas.DataFrame
        Columns ``strategy``, ``labels_spent``, ``mean``, ``low``, ``high`` and ``n_seeds``.
    """
    _require_columns(results, "results", ["strategy", "seed", "labels_spent", "accuracy"])
    if band not in ("sem", "minmax"):
        raise InputError(f"band must be 'sem' or 'minmax', got {band!r}")
    grouped = results.groupby(["strategy", "labels_spent"], sort=True)["accuracy"]
    summary = grouped.agg(mean="mean", std="std", minimum="min", maximum="max", n_seeds="count")
    summary = summary.reset_index()
    if band == "sem":
        half = summary["std"] / np.sqrt(summary["n_seeds"])
        summary["low"] = summary["mean"] - half
        summary["high"] = summary["mean"] + half
    else:
        summary["low"] = summary["minimum"]
        summary["high"] = summary["maximum"]
    return summary[["strategy", "labels_spent", "mean", "low", "high", "n_seeds"]]


def simulation_chart(
    results: pd.DataFrame,
    *,
    band: SimulationBand = "sem",
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
) -> alt.Chart | alt.LayerChart:
    """Plot accuracy against labels spent per acquisition strategy, mean across seeds with a band.

    See :func:`summarize_simulation` for the input columns and the two kinds of band.
    """
    summary = summarize_simulation(results, band=band)
    if summary.empty:
        return _empty_chart("no simulation results", width, height)
    summary["strategy"] = summary["strategy"].astype(str)
    band_title = "mean ± standard error" if band == "sem" else "min to max"

    base = alt.Chart(_inline_data(summary))
    color = alt.Color("strategy:N", title="strategy")
    x = alt.X("labels_spent:Q", title="labels spent")
    area = base.mark_area(opacity=0.2).encode(
        x=x,
        y=alt.Y("low:Q", title="accuracy", scale=alt.Scale(zero=False)),
        y2="high:Q",
        color=color,
    )
    line = base.mark_line(point=True).encode(
        x=x,
        y="mean:Q",
        color=color,
        tooltip=[
            alt.Tooltip("strategy:N"),
            alt.Tooltip("labels_spent:Q", title="labels spent"),
            alt.Tooltip("mean:Q", title="mean accuracy", format=".3f"),
            alt.Tooltip("low:Q", title="band low", format=".3f"),
            alt.Tooltip("high:Q", title="band high", format=".3f"),
            alt.Tooltip("n_seeds:Q", title="seeds"),
        ],
    )
    return alt.layer(area, line).properties(
        width=width, height=height, title=f"Accuracy per strategy ({band_title} across seeds)"
    )


# Output.


def chart_to_png_bytes(chart: alt.TopLevelMixin, *, scale: float = 2.0) -> bytes:
    """Render ``chart`` to PNG bytes with ``vl-convert``, offline.

    ``scale`` multiplies the pixel size, so 2 gives sharp images on high-density screens.
    """
    if not (isinstance(scale, (int, float)) and 0 < scale <= 10):
        raise InputError(f"scale must be a number in (0, 10], got {scale!r}")
    png = vl_convert.vegalite_to_png(chart.to_json(), scale=float(scale))
    if not png.startswith(PNG_SIGNATURE):
        raise AnnotatorError("vl-convert returned data that is not a PNG image")
    return png


def chart_to_html(chart: alt.TopLevelMixin) -> str:
    """Render ``chart`` to a self-contained HTML page with the Vega libraries inlined.

    Raises
    ------
    AnnotatorError
        If the page would still load a script or stylesheet from the network.
    """
    html = chart.to_html(inline=True)
    for pattern in _REMOTE_RESOURCE_PATTERNS:
        match = pattern.search(html)
        if match:
            raise AnnotatorError(
                f"the chart's HTML still loads a remote resource ({match.group(0)[:80]!r}), so it "
                "would not display offline; check the altair and vl-convert-python versions"
            )
    return html


def save_chart(chart: alt.TopLevelMixin, path: str | Path, *, scale: float = 2.0) -> Path:
    """Write ``chart`` to ``path`` as PNG or self-contained HTML, chosen by the suffix.

    Parameters
    ----------
    chart
        Any Altair chart.
    path
        Output file ending in ``.png`` or ``.html``; its folder must exist.
    scale
        Pixel scale of a PNG.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html"):
        raise InputError(f"chart path {str(path)!r} must end in .png or .html")
    if not path.parent.is_dir():
        raise InputError(
            f"folder {str(path.parent)!r} for the chart does not exist; create it first"
        )
    if suffix == ".png":
        path.write_bytes(chart_to_png_bytes(chart, scale=scale))
    else:
        path.write_text(chart_to_html(chart), encoding="utf-8")
    logger.info("chart saved: path=%s bytes=%d", path, path.stat().st_size)
    return path


def frame_to_csv_bytes(frame: pd.DataFrame) -> bytes:
    """Encode ``frame`` as UTF-8 CSV without the index, for a download button."""
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    return frame.to_csv(index=False).encode("utf-8")


# Helpers.


def _require_columns(frame: pd.DataFrame, name: str, columns: Sequence[str]) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(f"{name} is missing the columns {missing}; it has {list(frame.columns)}")


def _rate_bucket(times: pd.Series, bucket: str | None) -> str:
    if bucket is not None:
        try:
            width = pd.Timedelta(pd.tseries.frequencies.to_offset(bucket))
        except (TypeError, ValueError) as error:
            raise InputError(
                f"bucket {bucket!r} is not a fixed pandas offset alias such as '1h' or '1D'"
            ) from error
        if width <= pd.Timedelta(0):
            raise InputError(f"bucket must be a positive duration, got {bucket!r}")
        return bucket
    span = times.max() - times.min()
    for candidate in RATE_BUCKETS:
        if span / pd.Timedelta(candidate) < RATE_MAX_BUCKETS:
            return candidate
    return RATE_BUCKETS[-1]


def _inline_data(frame: pd.DataFrame) -> alt.InlineData:
    """Embed ``frame`` as JSON-safe inline values: NaN becomes null, times become ISO strings."""
    records = []
    for row in frame.to_dict(orient="records"):
        records.append({key: _json_value(value) for key, value in row.items()})
    return alt.InlineData(values=records)


def _json_value(value: object) -> object:
    if isinstance(value, pd.Timestamp):
        return None if pd.isna(value) else value.isoformat()
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    return value


def _empty_chart(message: str, width: int, height: int) -> alt.Chart:
    return (
        alt.Chart(_inline_data(pd.DataFrame({"text": [message]})))
        .mark_text(fontSize=14, color="gray")
        .encode(text="text:N")
        .properties(width=width, height=height)
    )

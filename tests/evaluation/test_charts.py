"""Tests of the Altair chart builders and chart output."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import pytest

from annotator.errors import AnnotatorError, InputError
from annotator.evaluation.charts import (
    ALL_ANNOTATORS,
    PNG_SIGNATURE,
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
from annotator.evaluation.curve import fit_learning_curve
from annotator.evaluation.metrics import classification_metrics, wilson_interval

CLASS_NAMES = ["cat", "dog", "fox", "owl"]
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=", re.IGNORECASE)
REMOTE_LINK = re.compile(r"<link[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE)


@pytest.fixture(scope="module")
def rounds() -> pd.DataFrame:
    """Accuracy of two predictives over eight rounds, with Wilson intervals."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 20, 40, 60, 80, 100, 150, 200], dtype=float)
    true_accuracy = 0.92 - 0.32 * (1 + labels / 10) ** -0.5
    rows = []
    for predictive, shift in (("Bayesian", 0.0), ("MAP", -0.01)):
        for index, (label, accuracy) in enumerate(zip(labels, true_accuracy, strict=True)):
            correct = int(rng.binomial(1000, accuracy + shift))
            low, high = wilson_interval(correct, 1000)
            rows.append(
                {
                    "round": index,
                    "labels_spent": label,
                    "accuracy": correct / 1000,
                    "accuracy_low": low,
                    "accuracy_high": high,
                    "predictive": predictive,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def metrics():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(4, 0.5), size=500)
    y_true = rng.integers(0, 3, size=500)  # "owl" has no evaluation labels
    return classification_metrics(y_true, probs, CLASS_NAMES)


@pytest.fixture(scope="module")
def label_events() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    start = pd.Timestamp("2026-01-05 09:00", tz="Europe/Berlin")
    offsets = pd.to_timedelta(np.sort(rng.uniform(0, 30, 400)), unit="h")
    return pd.DataFrame(
        {"created_at": start + offsets, "annotator": rng.choice(["ana", "ben", "chen"], 400)}
    )


@pytest.fixture(scope="module")
def simulation_results() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for strategy, offset in (("random", 0.0), ("bald", 0.02)):
        for seed in range(4):
            for labels in (0, 50, 100, 150):
                accuracy = 0.6 + 0.3 * (1 - math.exp(-labels / 80)) + offset + rng.normal(0, 0.01)
                rows.append(
                    {
                        "strategy": strategy,
                        "seed": seed,
                        "labels_spent": labels,
                        "accuracy": accuracy,
                    }
                )
    return pd.DataFrame(rows)


def _spec(chart: alt.TopLevelMixin) -> dict:
    """Return the Vega-Lite spec; to_dict validates it against the schema."""
    return chart.to_dict()


def _inline_values(spec: dict) -> list[list[dict]]:
    return list(spec.get("datasets", {}).values())


# Builders produce valid specs.


def test_accuracy_chart_layers(rounds: pd.DataFrame) -> None:
    ok = rounds[rounds.predictive == "Bayesian"]
    curve = fit_learning_curve(ok.labels_spent, ok.accuracy, [1000] * len(ok))
    forecast = curve.curve_frame(np.linspace(0, 600, 31))

    spec = _spec(accuracy_chart(rounds, forecast=forecast, target=0.88))

    marks = [
        layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]
        for layer in spec["layer"]
    ]
    assert marks.count("area") == 2  # forecast band and accuracy bands
    assert marks.count("line") == 2  # forecast line and accuracy lines
    assert "rule" in marks
    datasets = _inline_values(spec)
    assert any(len(values) == 31 for values in datasets)
    zero_shot = rounds.accuracy[rounds.labels_spent == 0].mean()
    expected = [{"labels_spent": 0.0, "accuracy": pytest.approx(zero_shot)}]
    assert any(values == expected for values in datasets)
    predictive = {row["predictive"] for values in datasets for row in values if "predictive" in row}
    assert predictive == {"Bayesian", "MAP"}


def test_accuracy_chart_without_forecast(rounds: pd.DataFrame) -> None:
    spec = _spec(accuracy_chart(rounds.drop(columns="round")))
    assert len(spec["layer"]) == 3


def test_labels_per_hour_chart(label_events: pd.DataFrame) -> None:
    spec = _spec(labels_per_hour_chart(label_events))
    assert spec["encoding"]["x"]["title"] == "time (bucket start, UTC)"
    values = _inline_values(spec)[0]
    assert {row["annotator"] for row in values} == {ALL_ANNOTATORS, "ana", "ben", "chen"}
    assert all(isinstance(row["bucket_start"], str) for row in values)


def test_class_counts_chart_sorted_by_total() -> None:
    counts = pd.DataFrame(
        {
            "class_name": ["cat", "dog", "fox", "dog"],
            "count": [5, 20, 9, 3],
            "split": ["pool", "pool", "pool", "evaluation"],
        }
    )
    spec = _spec(class_counts_chart(counts))
    assert spec["encoding"]["y"]["sort"] == ["dog", "fox", "cat"]
    assert spec["encoding"]["color"]["field"] == "split"


def test_budget_chart_marks_overspend() -> None:
    under = _inline_values(_spec(budget_chart(340, 500)))[0][0]
    over = _inline_values(_spec(budget_chart(540, 500)))[0][0]
    assert under["text"] == "340 of 500 labels (68%)"
    assert under["over"] is False
    assert over["over"] is True


def test_reliability_chart_skips_empty_bins(metrics) -> None:
    bins = metrics.reliability_frame()
    spec = _spec(reliability_chart(bins, ece=metrics.ece))
    assert spec["title"] == f"Reliability diagram (ECE {metrics.ece:.3f})"
    bar_values = max(_inline_values(spec), key=len)
    assert len(bar_values) == int((bins["count"] > 0).sum())
    assert all(row["count"] > 0 for row in bar_values)


def test_confusion_chart_keeps_class_order(metrics) -> None:
    spec = _spec(confusion_chart(metrics.confusion_frame()))
    cells = spec["layer"][0]["encoding"]
    assert cells["x"]["sort"] == CLASS_NAMES
    assert cells["y"]["sort"] == CLASS_NAMES
    assert cells["color"]["field"] == "row_fraction"
    values = _inline_values(spec)[0]
    assert len(values) == 16
    owl_rows = [row for row in values if row["true_class"] == "owl"]
    assert all(row["row_fraction"] is None for row in owl_rows)


def test_confusion_chart_beyond_row_limit() -> None:
    # 80 classes give 6,400 cells, above Altair's default limit of 5,000 rows.
    rng = np.random.default_rng(4)
    names = [f"class {k}" for k in range(80)]
    probs = rng.dirichlet(np.ones(80), size=400)
    frame = classification_metrics(rng.integers(0, 80, 400), probs, names).confusion_frame()

    chart = confusion_chart(frame, normalize=False)

    spec = _spec(chart)
    assert "layer" not in spec  # no per-cell text above 20 classes
    assert len(_inline_values(spec)[0]) == 6400


def test_per_class_accuracy_chart_and_frame(metrics) -> None:
    per_class = metrics.per_class_frame()
    frame = per_class_accuracy_frame(per_class, confidence=0.9)

    for row in frame.itertuples():
        if row.support == 0:
            assert math.isnan(row.recall_low)
            assert math.isnan(row.recall_high)
        else:
            expected = wilson_interval(round(row.recall * row.support), row.support, 0.9)
            assert (row.recall_low, row.recall_high) == pytest.approx(expected)
    spec = _spec(per_class_accuracy_chart(per_class))
    assert len(spec["layer"]) == 3


def test_simulation_chart_builds(simulation_results: pd.DataFrame) -> None:
    spec = _spec(simulation_chart(simulation_results, band="minmax"))
    assert "min to max" in spec["title"]
    values = _inline_values(spec)[0]
    assert {row["strategy"] for row in values} == {"random", "bald"}
    assert all(row["n_seeds"] == 4 for row in values)


# Aggregations behind the charts.


def test_summarize_simulation_bands(simulation_results: pd.DataFrame) -> None:
    sem = summarize_simulation(simulation_results, band="sem")
    minmax = summarize_simulation(simulation_results, band="minmax")

    group = simulation_results[
        (simulation_results.strategy == "bald") & (simulation_results.labels_spent == 50)
    ]
    accuracy = group["accuracy"].to_numpy()
    row = sem[(sem.strategy == "bald") & (sem.labels_spent == 50)].iloc[0]
    standard_error = accuracy.std(ddof=1) / math.sqrt(accuracy.size)
    assert row["mean"] == pytest.approx(accuracy.mean())
    assert row["low"] == pytest.approx(accuracy.mean() - standard_error)
    assert row["high"] == pytest.approx(accuracy.mean() + standard_error)
    assert row["n_seeds"] == 4
    row = minmax[(minmax.strategy == "bald") & (minmax.labels_spent == 50)].iloc[0]
    assert row["low"] == pytest.approx(accuracy.min())
    assert row["high"] == pytest.approx(accuracy.max())
    assert len(sem) == 8


def test_summarize_single_seed_has_no_sem_band(simulation_results: pd.DataFrame) -> None:
    single = simulation_results[simulation_results.seed == 0]
    summary = summarize_simulation(single, band="sem")
    assert summary["low"].isna().all()
    assert summary["high"].isna().all()
    spec = _spec(simulation_chart(single))
    assert all(row["low"] is None for row in _inline_values(spec)[0])


def test_labelling_rate_counts_and_fills_gaps() -> None:
    events = pd.DataFrame(
        {
            "created_at": pd.to_datetime(
                ["2026-02-01 10:05", "2026-02-01 10:40", "2026-02-01 12:15", "2026-02-01 12:20"]
            ),
            "annotator": ["ana", "ben", "ana", "ana"],
        }
    )

    frame = labelling_rate_frame(events, bucket="30min")

    total = frame[frame.annotator == ALL_ANNOTATORS]
    assert total["labels"].tolist() == [1, 1, 0, 0, 2]
    assert total["labels_per_hour"].tolist() == [2.0, 2.0, 0.0, 0.0, 4.0]
    ana = frame[frame.annotator == "ana"]
    assert ana["labels"].tolist() == [1, 0, 0, 0, 2]
    per_annotator = frame[frame.annotator != ALL_ANNOTATORS].groupby("bucket_start")["labels"].sum()
    assert per_annotator.tolist() == total["labels"].tolist()
    assert frame.attrs["bucket"] == "30min"
    assert frame.attrs["time_zone"] is None


def test_labelling_rate_widens_bucket_for_long_spans() -> None:
    times = pd.date_range("2026-01-01", periods=200, freq="7h", tz="UTC")
    events = pd.DataFrame({"created_at": times, "annotator": "ana"})

    frame = labelling_rate_frame(events)

    # 1,393 hours: 1-hour and 2-hour buckets exceed 500 buckets, 3-hour ones do not.
    assert frame.attrs["bucket"] == "3h"
    assert frame.attrs["time_zone"] == "UTC"
    total = frame[frame.annotator == ALL_ANNOTATORS]
    assert total["labels"].sum() == 200
    assert total["labels_per_hour"].max() == pytest.approx(1 / 3)


# Empty and invalid input.


def test_empty_frames_give_message_charts(rounds: pd.DataFrame, metrics) -> None:
    empty_cases = [
        (accuracy_chart(rounds.iloc[:0]), "no evaluated rounds yet"),
        (labels_per_hour_chart(pd.DataFrame({"created_at": [], "annotator": []})), "no labels yet"),
        (class_counts_chart(pd.DataFrame({"class_name": [], "count": []})), "no labels yet"),
        (reliability_chart(metrics.reliability_frame().iloc[:0]), "no evaluated predictions"),
        (confusion_chart(metrics.confusion_frame().iloc[:0]), "no evaluated predictions"),
        (
            simulation_chart(
                pd.DataFrame({"strategy": [], "seed": [], "labels_spent": [], "accuracy": []})
            ),
            "no simulation results",
        ),
    ]
    for chart, message in empty_cases:
        spec = _spec(chart)
        assert spec["mark"]["type"] == "text"
        assert _inline_values(spec)[0] == [{"text": message}]


def test_missing_columns_raise(rounds: pd.DataFrame) -> None:
    with pytest.raises(InputError, match=r"rounds is missing the columns \['predictive'\]"):
        accuracy_chart(rounds.drop(columns="predictive"))
    with pytest.raises(InputError, match="forecast is missing"):
        accuracy_chart(rounds, forecast=pd.DataFrame({"labels": [1.0]}))
    with pytest.raises(InputError, match="labels is missing"):
        labels_per_hour_chart(pd.DataFrame({"created_at": []}))
    with pytest.raises(InputError, match="must be a pandas DataFrame"):
        class_counts_chart({"class_name": ["a"], "count": [1]})  # type: ignore[arg-type]


def test_invalid_options_raise(rounds: pd.DataFrame, simulation_results: pd.DataFrame) -> None:
    with pytest.raises(InputError, match="target"):
        accuracy_chart(rounds, target=88)
    with pytest.raises(InputError, match="band"):
        summarize_simulation(simulation_results, band="std")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="planned must be at least 1"):
        budget_chart(3, 0)
    with pytest.raises(InputError, match="used must be"):
        budget_chart(-1, 10)
    events = pd.DataFrame({"created_at": ["2026-01-01 10:00"], "annotator": ["ana"]})
    with pytest.raises(InputError, match="fixed pandas offset"):
        labelling_rate_frame(events, bucket="1ME")
    with pytest.raises(InputError, match="reserved for the total"):
        labelling_rate_frame(
            pd.DataFrame({"created_at": ["2026-01-01"], "annotator": [ALL_ANNOTATORS]})
        )
    with pytest.raises(InputError, match="missing time stamps"):
        labelling_rate_frame(
            pd.DataFrame({"created_at": [None, "2026-01-01"], "annotator": ["a", "b"]})
        )


# Output files and bytes.


def test_save_chart_png_and_html(tmp_path: Path, rounds: pd.DataFrame) -> None:
    chart = accuracy_chart(rounds, target=0.88)

    png_path = save_chart(chart, tmp_path / "accuracy.png")
    html_path = save_chart(chart, tmp_path / "accuracy.HTML")

    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
    assert png_path.stat().st_size > 10_000
    html = html_path.read_text(encoding="utf-8")
    assert REMOTE_SCRIPT.search(html) is None
    assert REMOTE_LINK.search(html) is None
    assert "cdn.jsdelivr.net" not in html
    assert "vegaEmbed" in html
    assert '"predictive":"MAP"' in html.replace(" ", "")


def test_chart_to_png_bytes_scales(metrics) -> None:
    chart = confusion_chart(metrics.confusion_frame())
    small = chart_to_png_bytes(chart, scale=1)
    large = chart_to_png_bytes(chart, scale=2)
    assert small.startswith(PNG_SIGNATURE)
    assert large.startswith(PNG_SIGNATURE)
    width_small = int.from_bytes(small[16:20], "big")
    width_large = int.from_bytes(large[16:20], "big")
    assert width_large == pytest.approx(2 * width_small, abs=2)


def test_chart_to_html_rejects_remote_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    chart = budget_chart(1, 2)
    page = '<html><script src="https://cdn.jsdelivr.net/npm/vega@6"></script></html>'
    monkeypatch.setattr(type(chart), "to_html", lambda self, **kwargs: page)
    with pytest.raises(AnnotatorError, match="remote resource"):
        chart_to_html(chart)


def test_save_chart_rejects_bad_paths(tmp_path: Path) -> None:
    chart = budget_chart(1, 2)
    with pytest.raises(InputError, match=r"must end in \.png or \.html"):
        save_chart(chart, tmp_path / "chart.svg")
    with pytest.raises(InputError, match="does not exist"):
        save_chart(chart, tmp_path / "missing" / "chart.png")
    with pytest.raises(InputError, match="scale"):
        chart_to_png_bytes(chart, scale=0)


def test_frame_to_csv_bytes_round_trip(metrics) -> None:
    frame = metrics.per_class_frame()
    data = frame_to_csv_bytes(frame)
    assert data.startswith(b"class_name,support,recall")
    restored = pd.read_csv(io.BytesIO(data))
    pd.testing.assert_frame_equal(restored, frame, check_dtype=False)
    with pytest.raises(InputError, match="DataFrame"):
        frame_to_csv_bytes([1, 2])  # type: ignore[arg-type]


def test_spec_is_strict_json(metrics) -> None:
    # NaN in a frame must reach the spec as null, or browsers reject the JSON.
    text = per_class_accuracy_chart(metrics.per_class_frame()).to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"spec contains {name}"))

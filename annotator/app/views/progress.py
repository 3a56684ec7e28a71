"""Progress page: accuracy against labels spent, forecast, calibration, pace and budget."""

from __future__ import annotations

from collections.abc import Callable

import altair as alt
import pandas as pd
import streamlit as st

from annotator.app.context import current_project, sidebar
from annotator.evaluation import charts
from annotator.evaluation.curve import ForecastStatus
from annotator.services.progress import PREDICTIVES, Progress, project_progress


@st.cache_data(show_spinner="Fitting the learning curve…", max_entries=16)
def _progress(directory: str, signature: tuple) -> Progress:
    # ``signature`` changes whenever rounds or labels change, which invalidates the cache.
    return project_progress(current_project())


def _signature(project) -> tuple:
    summary = project.store.summary(project.project_id)
    latest = project.store.latest_round(project.project_id)
    metrics_key = None if latest is None else (latest.id, str(sorted(latest.metrics.items())))
    return (summary.labels, summary.rounds, metrics_key)


def _chart(name: str, chart: alt.TopLevelMixin, frame: pd.DataFrame) -> None:
    """Draw a chart (it carries its own title) with PNG and CSV downloads.

    The PNG renders only when its button is clicked, because rendering costs about a second.
    """
    st.altair_chart(chart)
    png: Callable[[], bytes] = lambda: charts.chart_to_png_bytes(chart)  # noqa: E731
    left, right = st.columns(2)
    left.download_button("PNG", png, file_name=f"{name}.png", mime="image/png", key=f"{name}-png")
    right.download_button(
        "CSV",
        charts.frame_to_csv_bytes(frame),
        file_name=f"{name}.csv",
        mime="text/csv",
        key=f"{name}-csv",
    )


def _headline(progress: Progress) -> None:
    bayes = progress.accuracy[progress.accuracy["predictive"] == PREDICTIVES["bayes"]]
    columns = st.columns(4)
    if len(bayes):
        last = bayes.iloc[-1]
        columns[0].metric(
            "Accuracy (BayesVLM)",
            f"{100 * last['accuracy']:.1f}%",
            help=f"95% interval {100 * last['accuracy_low']:.1f}–{100 * last['accuracy_high']:.1f}% "
            f"on {last['evaluation_images']} evaluation images",
        )
        first = bayes.iloc[0]
        columns[1].metric("Zero-shot accuracy", f"{100 * first['accuracy']:.1f}%")
    else:
        columns[0].metric("Accuracy", "n/a")
    columns[2].metric(
        "Labels spent",
        progress.labels_spent,
        help=f"Acquisition labels the head is trained on, as on the chart's x-axis. With the "
        f"evaluation labels, {progress.budget_used} labels of the budget are used.",
    )
    if progress.forecast is not None:
        forecast = progress.forecast
        value = f"{forecast.labels:.0f}" if forecast.status == ForecastStatus.REACHABLE else "—"
        columns[3].metric(
            f"Labels for {100 * forecast.target_accuracy:.0f}%", value, help=forecast.message
        )


def main() -> None:
    project = current_project()
    sidebar(project)
    st.title("Progress")
    progress = _progress(str(project.directory), _signature(project))

    sources = progress.evaluation_sources
    if sources.get("oracle"):
        st.info(
            f"{sources['oracle']} evaluation images are labelled from the ground-truth file, "
            "not by annotators: this is a demo or a simulation."
        )
    if progress.accuracy.empty:
        st.warning(
            "No accuracy yet: label some evaluation images (they are mixed into batches) "
            "or import a labelled set. Accuracy is never measured on actively chosen images."
        )
    _headline(progress)

    st.write(progress.stop_hint.message)
    # Without a fitted curve the stopping hint already repeats the forecast's reason.
    if (
        progress.forecast is not None
        and progress.forecast.message not in progress.stop_hint.message
    ):
        st.caption(progress.forecast.message)

    target = project.config.budget.target_accuracy
    _chart(
        "accuracy",
        charts.accuracy_chart(progress.accuracy, forecast=progress.curve, target=target),
        progress.accuracy,
    )

    left, right = st.columns(2)
    with left:
        _chart(
            "labels-per-hour",
            charts.labels_per_hour_chart(progress.labels),
            charts.labelling_rate_frame(progress.labels)
            if len(progress.labels)
            else progress.labels,
        )
    with right:
        _chart(
            "class-counts",
            charts.class_counts_chart(progress.class_counts),
            progress.class_counts,
        )

    if progress.budget_planned:
        budget = pd.DataFrame(
            {"used": [progress.budget_used], "planned": [progress.budget_planned]}
        )
        _chart(
            "budget",
            charts.budget_chart(progress.budget_used, progress.budget_planned),
            budget,
        )

    metrics = progress.latest.get("bayes")
    if metrics is not None:
        st.subheader(f"Round {progress.latest_round}: calibration and errors")
        left, right = st.columns(2)
        with left:
            bins = metrics.reliability_frame()
            _chart(
                "reliability",
                charts.reliability_chart(bins, ece=metrics.ece),
                bins,
            )
            deterministic = progress.latest.get("map")
            if deterministic is not None:
                st.caption(f"ECE: BayesVLM {metrics.ece:.3f}, MAP {deterministic.ece:.3f}.")
        with right:
            confusion = metrics.confusion_frame()
            _chart(
                "confusion",
                charts.confusion_chart(confusion, class_order=list(metrics.class_names)),
                confusion,
            )
        per_class = metrics.per_class_frame()
        _chart("per-class", charts.per_class_accuracy_chart(per_class), per_class)


main()

"""Data behind the Progress dashboard: accuracy against labels, forecast, pace and budget.

Accuracy is always measured on the evaluation split, never on actively chosen images,
because those are chosen where the model is wrong and would understate it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from annotator.evaluation.curve import Forecast, LearningCurve, StopHint
from annotator.evaluation.metrics import RoundMetrics
from annotator.services.project import Project

PREDICTIVES = {"bayes": "BayesVLM", "map": "MAP"}
"""Stored metric keys and the names the charts show for them."""


@dataclass(frozen=True)
class Progress:
    """Everything the Progress page draws, computed from the store."""

    accuracy: pd.DataFrame
    """Per round and predictive: round, labels_spent, accuracy, accuracy_low, accuracy_high,
    predictive, evaluation_images."""
    curve: pd.DataFrame
    """Forecast curve of the BayesVLM accuracy: labels_spent, accuracy, low, high (may be empty)."""
    forecast: Forecast | None
    """Labels needed for the target accuracy; None without a target."""
    stop_hint: StopHint
    labels: pd.DataFrame
    """Labels given by people: created_at, annotator."""
    class_counts: pd.DataFrame
    """Labelled images per class and split: class_name, split, count."""
    labels_spent: int
    """Acquisition labels of the latest round, which the head is trained on."""
    budget_used: int
    """Labels given in this project, relabels included, imported ones not."""
    budget_planned: int | None
    latest_round: int | None
    latest: dict[str, RoundMetrics]
    """The latest round's metrics per predictive key ("bayes", "map")."""
    evaluation_sources: dict[str, int]
    """Label sources of the labelled evaluation images, e.g. {"oracle": 300}."""


def accuracy_frame(rounds: pd.DataFrame) -> pd.DataFrame:
    """Flatten the stored per-round metrics into one row per round and predictive."""
    rows = []
    for round_row in rounds.itertuples(index=False):
        metrics = round_row.metrics or {}
        for key, name in PREDICTIVES.items():
            values = metrics.get(key)
            if not values or values.get("accuracy") is None:
                continue
            rows.append(
                {
                    "round": int(round_row.index),
                    "labels_spent": int(round_row.labels_spent),
                    "accuracy": values["accuracy"],
                    "accuracy_low": values["accuracy_low"],
                    "accuracy_high": values["accuracy_high"],
                    "ece": values.get("ece"),
                    "predictive": name,
                    "evaluation_images": int(
                        metrics.get("evaluation_images", values.get("n_samples", 0))
                    ),
                }
            )
    columns = [
        "round", "labels_spent", "accuracy", "accuracy_low", "accuracy_high", "ece",
        "predictive", "evaluation_images",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def fit_curve(accuracy: pd.DataFrame) -> LearningCurve:
    """Fit the learning curve to the BayesVLM accuracy of every evaluated round."""
    bayes = accuracy[accuracy["predictive"] == PREDICTIVES["bayes"]]
    return LearningCurve().fit(
        bayes["labels_spent"].to_numpy(dtype=np.float64),
        bayes["accuracy"].to_numpy(dtype=np.float64),
        n_evaluated=bayes["evaluation_images"].to_numpy(dtype=np.int64),
    )


def project_progress(project: Project) -> Progress:
    store = project.store
    settings = project.config
    rounds = store.rounds_frame(project.project_id)
    accuracy = accuracy_frame(rounds)

    curve = fit_curve(accuracy)
    spent = int(accuracy["labels_spent"].max()) if len(accuracy) else 0
    planned = settings.budget.planned_labels
    horizon = max(planned or 0, 2 * spent, spent + 5 * settings.acquisition.batch_size)
    curve_frame = (
        curve.curve_frame(np.linspace(0, horizon, 60)) if curve.is_fitted else curve.curve_frame([])
    )
    target = settings.budget.target_accuracy
    forecast = curve.forecast_labels_for(target) if target is not None else None
    stop_hint = curve.should_stop(settings.budget.stop_threshold, settings.acquisition.batch_size)

    labels = store.labels_frame(project.project_id)
    latest_labels = store.labels_frame(project.project_id, latest_only=True)
    human = labels[labels["source"] == "human"][["created_at", "annotator"]]
    counts = (
        latest_labels.groupby(["class_name", "split"]).size().rename("count").reset_index()
        if len(latest_labels)
        else pd.DataFrame(columns=["class_name", "split", "count"])
    )
    evaluation = latest_labels[latest_labels["split"] == "evaluation"]
    latest = store.latest_round(project.project_id)
    metrics = {}
    if latest is not None:
        for key in PREDICTIVES:
            if latest.metrics.get(key):
                metrics[key] = RoundMetrics.from_dict(latest.metrics[key])
    return Progress(
        accuracy=accuracy,
        curve=curve_frame,
        forecast=forecast,
        stop_hint=stop_hint,
        labels=human.reset_index(drop=True),
        class_counts=counts,
        labels_spent=int(rounds["labels_spent"].max()) if len(rounds) else 0,
        # Imported labels were not bought in this project, so they do not count.
        budget_used=int((labels["source"] != "import").sum()),
        budget_planned=planned,
        latest_round=None if latest is None else latest.index,
        latest=metrics,
        evaluation_sources=evaluation["source"].value_counts().to_dict(),
    )

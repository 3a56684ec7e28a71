"""Read-only views of a project for the CLI and the web app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from annotator.services.project import Project
from annotator.services.ranking import latest_ranking


@dataclass(frozen=True)
class ProjectSummary:
    """Counts and the latest accuracy of a project."""

    name: str
    model: str
    factor_source: str
    images: int
    usable: int
    skipped: int
    pool: int
    evaluation: int
    labelled_pool: int
    labelled_evaluation: int
    open_batches: int
    rounds: int
    latest_accuracy: float | None
    latest_interval: tuple[float, float] | None
    strategy: str

    def as_rows(self) -> list[tuple[str, Any]]:
        accuracy = "n/a (no labelled evaluation images)"
        if self.latest_accuracy is not None and self.latest_interval is not None:
            low, high = self.latest_interval
            accuracy = f"{self.latest_accuracy:.3f} (95% interval {low:.3f}–{high:.3f})"
        return [
            ("project", self.name),
            ("model", self.model),
            ("posterior factors", describe_factor_source(self.factor_source)),
            ("images found", self.images),
            ("usable / skipped", f"{self.usable} / {self.skipped}"),
            ("pool / evaluation split", f"{self.pool} / {self.evaluation}"),
            ("labelled pool images", self.labelled_pool),
            ("labelled evaluation images", self.labelled_evaluation),
            ("open batches", self.open_batches),
            ("rounds (incl. zero-shot)", self.rounds),
            ("acquisition strategy", self.strategy),
            ("latest accuracy", accuracy),
        ]


def describe_factor_source(source: str) -> str:
    """Turn the stored factor source (``loaded:DIR``, ``estimated:pool:DIR``) into a phrase."""
    kind, _, rest = source.partition(":")
    if kind == "loaded" and rest:
        return f"loaded from {rest}"
    if kind == "estimated" and rest:
        origin, _, directory = rest.partition(":")
        return f"estimated from the {origin}, saved in {directory}" if directory else source
    if source == "pending":
        return "pending (set at the first ingest)"
    return source


def project_summary(project: Project) -> ProjectSummary:
    store = project.store
    images = store.images_frame(project.project_id)
    usable = images[images["status"] == "ok"]
    labels = store.labels_frame(project.project_id, latest_only=True)
    labelled = usable[usable["id"].isin(labels["image_id"])]
    rounds = store.rounds_frame(project.project_id)
    record = store.get_project(project.config.name)
    latest = store.latest_round(project.project_id)
    bayes = (latest.metrics or {}).get("bayes") if latest is not None else None
    return ProjectSummary(
        name=project.config.name,
        model=project.config.model.spec,
        factor_source=record.factor_source if record is not None else "unknown",
        images=len(images),
        usable=len(usable),
        skipped=int((images["status"] == "skipped").sum()),
        pool=int((usable["split"] == "pool").sum()),
        evaluation=int((usable["split"] == "evaluation").sum()),
        labelled_pool=int((labelled["split"] == "pool").sum()),
        labelled_evaluation=int((labelled["split"] == "evaluation").sum()),
        open_batches=len(store.open_batches(project.project_id)),
        rounds=len(rounds),
        latest_accuracy=bayes["accuracy"] if bayes else None,
        latest_interval=(bayes["accuracy_low"], bayes["accuracy_high"]) if bayes else None,
        strategy=project.config.acquisition.strategy,
    )


def top_of_ranking(project: Project, count: int) -> pd.DataFrame:
    """The ``count`` highest-scoring selectable images of the latest ranking."""
    ranking = latest_ranking(project)
    columns = ["rank", "image_id", "path", "score", "epistemic", "prediction", "probability"]
    if ranking is None:
        return pd.DataFrame(columns=columns)
    names = project.config.class_names
    finite = np.isfinite(ranking.scores)
    order = np.flatnonzero(finite)
    order = order[np.lexsort((order, -ranking.scores[order]))][:count]
    paths = project.store.images_frame(project.project_id).set_index("id")["path"]
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "image_id": ranking.image_ids[order],
            "path": [paths[i] for i in ranking.image_ids[order]],
            "score": ranking.scores[order],
            "epistemic": ranking.epistemic[order],
            "prediction": [names[c] for c in ranking.top_classes[order, 0]],
            "probability": ranking.top_probs[order, 0],
        }
    )


def skipped_images(project: Project) -> pd.DataFrame:
    """Files that could not be used, with the reason for each."""
    images = project.store.images_frame(project.project_id, status="skipped")
    return images[["path", "reason"]].sort_values("path").reset_index(drop=True)

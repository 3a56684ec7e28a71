"""Rounds: refit the head on the acquisition labels, evaluate it, re-rank the pool, record it.

Round 0 is zero-shot and is recorded when the pool is first ingested. Every submitted
batch that contains acquisition labels starts the next round. Labels on the evaluation
split never train the head; they only measure it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from annotator.bayes import HeadPosterior, LogitPosterior, ProjectionFactors
from annotator.bayes.predictive import probit_probabilities
from annotator.data.features import FeatureCache
from annotator.errors import ConfigError
from annotator.evaluation.metrics import classification_metrics
from annotator.logs import log_event
from annotator.services.inference import (
    LabelledSet,
    ModelSnapshot,
    load_project_factors,
    load_snapshot,
    open_feature_cache,
    read_features,
    refit_posterior,
)
from annotator.services.project import Project
from annotator.services.ranking import Ranking, compute_device, rank_pool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """Outcome of one round."""

    index: int
    labels_spent: int
    evaluation_labels: int
    metrics: dict[str, Any]
    refit_seconds: float
    ranking: Ranking


def labelled_split(project: Project, split: str) -> LabelledSet:
    """Return the latest label of every labelled usable image of ``split`` (``pool`` or ``evaluation``)."""
    images = project.store.images_frame(project.project_id, status="ok", split=split)
    labels = project.store.labels_frame(project.project_id, latest_only=True, split=split)
    merged = labels.merge(images[["id", "feature_row"]], left_on="image_id", right_on="id")
    merged = merged.sort_values("image_id")
    return LabelledSet(
        image_ids=merged["image_id"].to_numpy(dtype=np.int64),
        feature_rows=merged["feature_row"].to_numpy(dtype=np.int64),
        labels=merged["class_index"].to_numpy(dtype=np.int64),
    )


def evaluate_posterior(
    project: Project,
    snapshot: ModelSnapshot,
    posterior: LogitPosterior,
    cache: FeatureCache,
    evaluation: LabelledSet,
) -> dict[str, Any]:
    """Compute metrics on the labelled evaluation split for the BayesVLM and the MAP predictive."""
    if len(evaluation) == 0:
        return {}
    device = compute_device(project)
    features, offsets = read_features(cache, evaluation.feature_rows)
    features = features.to(device)
    offsets = offsets.to(device) if offsets is not None else None
    mean, variance = posterior.logit_moments(features, offsets)
    bayes_probs = probit_probabilities(mean, variance).double().cpu().numpy()
    map_probs = (
        torch.softmax(posterior.map_logits(features, offsets), dim=-1).double().cpu().numpy()
    )
    names = project.config.class_names
    return {
        "evaluation_images": len(evaluation),
        "bayes": classification_metrics(evaluation.labels, bayes_probs, names).to_dict(),
        "map": classification_metrics(evaluation.labels, map_probs, names).to_dict(),
    }


@dataclass
class PosteriorState:
    """The posterior for the current labels, with what it was built from."""

    snapshot: ModelSnapshot
    factors: ProjectionFactors
    cache: FeatureCache
    training: LabelledSet
    evaluation: LabelledSet
    posterior: LogitPosterior
    refit_seconds: float


def current_posterior(project: Project) -> PosteriorState:
    """Refit the head on the current acquisition labels (zero-shot when there are none)."""
    snapshot = load_snapshot(project)
    factors = load_project_factors(project, snapshot)
    cache = open_feature_cache(project)
    training = labelled_split(project, "pool")
    evaluation = labelled_split(project, "evaluation")
    started = time.perf_counter()
    posterior = refit_posterior(
        project,
        snapshot,
        factors,
        cache,
        training,
        device=compute_device(project),
    )
    return PosteriorState(
        snapshot=snapshot,
        factors=factors,
        cache=cache,
        training=training,
        evaluation=evaluation,
        posterior=posterior,
        refit_seconds=time.perf_counter() - started,
    )


def rank_state(
    project: Project, state: PosteriorState, round_index: int, strategy: str | None = None
) -> Ranking:
    """Score the pool under ``state``'s posterior; labelled and evaluation images are not selectable."""
    images = project.store.images_frame(project.project_id, status="ok").sort_values("feature_row")
    labelled = set(state.training.image_ids.tolist())
    selectable = (images["split"].to_numpy() == "pool") & ~images["id"].isin(labelled).to_numpy()
    return rank_pool(
        project,
        state.posterior,
        state.cache,
        round_index=round_index,
        image_ids=images["id"].to_numpy(dtype=np.int64),
        feature_rows=images["feature_row"].to_numpy(dtype=np.int64),
        selectable=selectable,
        strategy=strategy,
    )


def run_round(project: Project, *, note: str | None = None) -> RoundResult:
    """Refit on all acquisition labels, evaluate, re-rank the pool and record a new round."""
    state = current_posterior(project)
    metrics = evaluate_posterior(
        project, state.snapshot, state.posterior, state.cache, state.evaluation
    )
    metrics.update(_head_summary(state.posterior))
    latest = project.store.latest_round(project.project_id)
    index = 0 if latest is None else latest.index + 1
    ranking = rank_state(project, state, index)

    project.store.add_round(
        project.project_id,
        index=index,
        labels_spent=len(state.training),
        strategy=ranking.strategy,
        metrics=metrics,
        refit_seconds=state.refit_seconds,
        prior_precision=state.factors.image.prior_precision,
        note=note,
    )
    finite = ranking.scores[np.isfinite(ranking.scores)]
    bayes = metrics.get("bayes", {})
    log_event(
        logger,
        "round",
        round=index,
        labels_spent=len(state.training),
        evaluation_labels=len(state.evaluation),
        strategy=ranking.strategy,
        score_mean=float(finite.mean()) if finite.size else float("nan"),
        score_std=float(finite.std()) if finite.size else float("nan"),
        score_median=float(np.median(finite)) if finite.size else float("nan"),
        accuracy=bayes.get("accuracy", float("nan")),
        ece=bayes.get("ece", float("nan")),
        refit_seconds=round(state.refit_seconds, 4),
    )
    return RoundResult(
        index=index,
        labels_spent=len(state.training),
        evaluation_labels=len(state.evaluation),
        metrics=metrics,
        refit_seconds=state.refit_seconds,
        ranking=ranking,
    )


def _head_summary(posterior: LogitPosterior) -> dict[str, Any]:
    """Return the refit head's prior scale and evidence, to store with the round's metrics."""
    if not isinstance(posterior, HeadPosterior):
        return {}
    return {
        "head": {
            "prior_scale": posterior.prior_scale,
            "log_evidence": posterior.log_evidence,
            "covariance": posterior.covariance.value,
        }
    }


def rerank(project: Project, *, strategy: str) -> Ranking:
    """Re-score the latest round's pool with another strategy, replacing its saved ranking.

    The project's configured strategy is unchanged: the next round ranks with it again.
    """
    latest = project.store.latest_round(project.project_id)
    if latest is None:
        raise ConfigError(
            f"project {project.config.name!r} has no rounds; run `annotator ingest` first"
        )
    return rank_state(project, current_posterior(project), latest.index, strategy)


def refresh_latest_metrics(project: Project) -> tuple[int, int, dict[str, Any]] | None:
    """Re-evaluate the latest round on the evaluation labels available now and store the result.

    The head is refit on the same acquisition labels as the round, so only the evaluation
    set changes. Returns (round index, labels spent, metrics), or None before round 0.
    """
    latest = project.store.latest_round(project.project_id)
    if latest is None:
        return None
    state = current_posterior(project)
    metrics = evaluate_posterior(
        project, state.snapshot, state.posterior, state.cache, state.evaluation
    )
    metrics.update(_head_summary(state.posterior))
    project.store.update_round_metrics(latest.id, metrics)
    return latest.index, len(state.training), metrics


def evaluate_latest(project: Project) -> tuple[int, int, dict[str, Any]]:
    """Return the latest round's metrics, re-evaluated on the current evaluation labels."""
    result = refresh_latest_metrics(project)
    if result is None:
        raise ConfigError(
            f"project {project.config.name!r} has no rounds; run `annotator ingest` first"
        )
    return result

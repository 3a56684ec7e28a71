"""Rank the pool: score every image under the current posterior and save the result per round.

A ranking file ``rankings/round-NNNN.npz`` holds, for every usable image in feature-row
order: the acquisition score (NaN where acquisition may not choose the image), the
BayesVLM predictive's top classes and probabilities, and the epistemic uncertainty (BALD).
Annotator batches are drawn from the latest file, so opening a batch never re-scores the pool.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from annotator.bayes import LogitPosterior, LogitSampling, Strategy, score_pool
from annotator.bayes.predictive import probit_probabilities
from annotator.data.features import FeatureCache
from annotator.files import write_atomic
from annotator.logs import log_event
from annotator.services.project import Project

logger = logging.getLogger(__name__)

TOP_K = 5
"""Classes kept per image for display."""

CHUNK_ROWS = 32_768
"""Pool rows scored at once: bounds memory independently of the pool size."""

BALD_STRATEGIES = {Strategy.BALD, Strategy.POWER_BALD}

CORRELATED_SAMPLING_MAX_CLASSES = 64
"""Above this many classes, ``sampling: auto`` draws each logit independently."""


@dataclass(frozen=True)
class Ranking:
    """Scores and predictions for the usable images of a project after one round.

    Attributes
    ----------
    round_index : the round whose posterior produced the ranking.
    strategy : acquisition strategy of ``scores``.
    image_ids : (N,) image ids.
    scores : (N,) acquisition scores, higher is more informative; NaN where not selectable.
    top_classes : (N, k) class indices, most probable first.
    top_probs : (N, k) predictive probabilities of ``top_classes``.
    epistemic : (N,) BALD, the mutual information between label and weights, in nats.
    """

    round_index: int
    strategy: str
    image_ids: np.ndarray
    scores: np.ndarray
    top_classes: np.ndarray
    top_probs: np.ndarray
    epistemic: np.ndarray

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "round_index": np.int64(self.round_index),
            "strategy": np.str_(self.strategy),
            "image_ids": self.image_ids,
            "scores": self.scores,
            "top_classes": self.top_classes,
            "top_probs": self.top_probs,
            "epistemic": self.epistemic,
        }
        write_atomic(path, lambda file: np.savez(file, **arrays))

    @classmethod
    def load(cls, path: Path) -> Ranking:
        with np.load(path) as data:
            return cls(
                round_index=int(data["round_index"]),
                strategy=str(data["strategy"]),
                image_ids=data["image_ids"],
                scores=data["scores"],
                top_classes=data["top_classes"],
                top_probs=data["top_probs"],
                epistemic=data["epistemic"],
            )


def ranking_path(project: Project, round_index: int) -> Path:
    return project.rankings_dir / f"round-{round_index:04d}.npz"


def latest_ranking(project: Project) -> Ranking | None:
    """Load the newest saved ranking, or None before the first one."""
    if not project.rankings_dir.is_dir():
        return None
    files = sorted(project.rankings_dir.glob("round-[0-9][0-9][0-9][0-9].npz"))
    return Ranking.load(files[-1]) if files else None


def compute_device(project: Project) -> torch.device:
    setting = project.config.model.device
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def rank_pool(
    project: Project,
    posterior: LogitPosterior,
    cache: FeatureCache,
    *,
    round_index: int,
    image_ids: np.ndarray,
    feature_rows: np.ndarray,
    selectable: np.ndarray,
    strategy: str | None = None,
) -> Ranking:
    """Score every usable image and save the ranking for ``round_index``.

    Parameters
    ----------
    image_ids, feature_rows : (N,) ids of usable images and their rows in the feature cache.
    selectable : (N,) bool, True where acquisition may choose the image (unlabelled pool images).
    strategy : acquisition strategy; the project's configured one when None.
    """
    started = time.perf_counter()
    strategy = Strategy(strategy or project.config.acquisition.strategy)
    settings = project.config.acquisition
    device = compute_device(project)
    seed = project.config.seed + round_index

    target_features = target_offsets = None
    if strategy is Strategy.EPIG:
        target_features, target_offsets = _epig_targets(
            project, cache, feature_rows, selectable, settings.epig_targets, round_index, device
        )

    sampling = _sampling_for(posterior, settings.sampling)
    count = len(image_ids)
    k = min(TOP_K, posterior.num_classes)
    scores = np.full(count, np.nan, dtype=np.float32)
    epistemic = np.zeros(count, dtype=np.float32)
    top_classes = np.zeros((count, k), dtype=np.int32)
    top_probs = np.zeros((count, k), dtype=np.float32)

    for start in range(0, count, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, count)
        # The same seed for every chunk draws the same weights for each, which EPIG's shared
        # draws need, and makes a score independent of the chunk it falls in.
        generator = torch.Generator(device=device).manual_seed(seed)
        rows = feature_rows[start:stop]
        features = torch.from_numpy(np.asarray(cache.features[rows], dtype=np.float32)).to(device)
        offsets = None
        if cache.offsets is not None:
            offsets = torch.from_numpy(np.asarray(cache.offsets[rows], dtype=np.float32)).to(device)

        mean, variance = posterior.logit_moments(features, offsets)
        probs = probit_probabilities(mean, variance)
        best = torch.topk(probs, k, dim=-1)
        top_classes[start:stop] = best.indices.cpu().numpy()
        top_probs[start:stop] = best.values.float().cpu().numpy()

        bald = score_pool(
            posterior,
            features,
            Strategy.BALD,
            offsets=offsets,
            num_samples=settings.num_samples,
            generator=generator,
            sampling=sampling,
        )
        epistemic[start:stop] = bald.float().cpu().numpy()
        if strategy in BALD_STRATEGIES:
            chunk_scores = bald
        else:
            chunk_scores = score_pool(
                posterior,
                features,
                strategy,
                offsets=offsets,
                target_features=target_features,
                target_offsets=target_offsets,
                num_samples=settings.num_samples,
                generator=generator,
                sampling=sampling,
            )
        scores[start:stop] = chunk_scores.float().cpu().numpy()

    scores[~selectable] = np.nan
    ranking = Ranking(
        round_index=round_index,
        strategy=strategy.value,
        image_ids=np.asarray(image_ids, dtype=np.int64),
        scores=scores,
        top_classes=top_classes,
        top_probs=top_probs,
        epistemic=epistemic,
    )
    ranking.save(ranking_path(project, round_index))
    finite = scores[np.isfinite(scores)]
    log_event(
        logger,
        "rank",
        round=round_index,
        strategy=strategy.value,
        images=count,
        selectable=int(selectable.sum()),
        score_mean=float(finite.mean()) if finite.size else float("nan"),
        score_max=float(finite.max()) if finite.size else float("nan"),
        seconds=round(time.perf_counter() - started, 3),
    )
    return ranking


def _sampling_for(posterior: LogitPosterior, setting: str) -> LogitSampling:
    """Return the logit sampling for ``setting``, resolving ``auto`` by the posterior's kind
    and class count, and replacing embedding draws by weight draws for the refit head."""
    has_embeddings = hasattr(posterior, "sampled_embedding_logits")
    if setting == "auto":
        if posterior.num_classes > CORRELATED_SAMPLING_MAX_CLASSES:
            return LogitSampling.INDEPENDENT
        return LogitSampling.EMBEDDING if has_embeddings else LogitSampling.WEIGHTS
    sampling = LogitSampling(setting)
    if sampling is LogitSampling.EMBEDDING and not has_embeddings:
        return LogitSampling.WEIGHTS
    return sampling


def _epig_targets(
    project: Project,
    cache: FeatureCache,
    feature_rows: np.ndarray,
    selectable: np.ndarray,
    count: int,
    round_index: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample EPIG's target set from the unlabelled pool: the inputs whose predictions matter."""
    candidates = feature_rows[selectable]
    if candidates.size == 0:
        candidates = feature_rows
    rng = np.random.default_rng(project.config.seed + 7919 * (round_index + 1))
    chosen = np.sort(rng.choice(candidates, size=min(count, candidates.size), replace=False))
    features = torch.from_numpy(np.asarray(cache.features[chosen], dtype=np.float32)).to(device)
    offsets = None
    if cache.offsets is not None:
        offsets = torch.from_numpy(np.asarray(cache.offsets[chosen], dtype=np.float32)).to(device)
    return features, offsets

"""Annotator batches: hand out the most informative images, take their labels back.

A batch mixes acquisition items, chosen from the latest ranking, with evaluation items
drawn at random from the unlabelled evaluation split (until it is fully labelled). An image
in an open batch is never handed to a second annotator; batches left open longer than the
configured timeout are expired and their images return to the pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from filelock import FileLock

from annotator.bayes import Strategy, select_batch
from annotator.db.records import BatchInfo, NewBatchItem
from annotator.errors import AnnotatorError, InputError
from annotator.services.project import Project
from annotator.services.ranking import Ranking, latest_ranking
from annotator.services.rounds import RoundResult, refresh_latest_metrics, run_round

logger = logging.getLogger(__name__)

POWER_STRATEGIES = {Strategy.POWER_BALD}


@dataclass(frozen=True)
class BatchTask:
    """One image to label, with what the model currently predicts for it."""

    image_id: int
    path: str
    purpose: str
    """``acquisition`` or ``evaluation``."""
    score: float | None
    top_classes: list[str]
    top_probs: list[float]
    epistemic: float


@dataclass(frozen=True)
class BatchView:
    batch_id: int
    annotator: str
    round_index: int
    tasks: list[BatchTask]


def project_lock(project: Project) -> FileLock:
    """A lock that serialises batch hand-out and refits across processes of one project."""
    project.directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(project.directory / ".annotator.lock"), timeout=600)


def next_batch(project: Project, annotator: str, *, size: int | None = None) -> BatchView | None:
    """Return the annotator's open batch, or open a new one; None when nothing is left to label."""
    annotator = annotator.strip()
    if not annotator:
        raise InputError("annotator name is empty; enter a name so labels can be attributed")
    size = size or project.config.acquisition.batch_size
    with project_lock(project):
        timeout = timedelta(minutes=project.config.acquisition.batch_timeout_minutes)
        project.store.expire_batches(timeout, project=project.project_id)
        for batch in project.store.open_batches(project.project_id, annotator=annotator):
            return _view(project, batch)

        ranking = latest_ranking(project)
        if ranking is None:
            raise InputError(
                f"project {project.config.name!r} has no ranking yet; "
                f"run `annotator ingest {project.directory}` first"
            )
        items = _choose_items(project, ranking, size)
        if not items:
            return None
        batch = project.store.open_batch(
            project.project_id,
            annotator,
            items,
            kind=_batch_kind(items),
            strategy=ranking.strategy,
            round_index=ranking.round_index,
        )
        return _view(project, batch)


def _choose_items(project: Project, ranking: Ranking, size: int) -> list[NewBatchItem]:
    """Pick the items of a new batch, in display order."""
    settings = project.config
    busy = {
        item.image_id
        for batch in project.store.open_batches(project.project_id)
        for item in batch.items
    }
    labels = project.store.labels_frame(project.project_id, latest_only=True)
    labelled = set(labels["image_id"].tolist())
    images = project.store.images_frame(project.project_id, status="ok", split="evaluation")
    rng = np.random.default_rng([settings.seed, ranking.round_index, len(labelled), len(busy)])

    open_evaluation = np.array(sorted(set(images["id"].tolist()) - labelled - busy), dtype=np.int64)
    evaluation_count = min(settings.evaluation.per_batch, open_evaluation.size, size)
    evaluation_pick = (
        rng.choice(open_evaluation, size=evaluation_count, replace=False)
        if evaluation_count
        else np.empty(0, dtype=np.int64)
    )

    exclude = ~np.isfinite(ranking.scores)
    exclude |= np.isin(ranking.image_ids, list(labelled | busy))
    method = "power" if Strategy(ranking.strategy) in POWER_STRATEGIES else "top-k"
    scores = torch.from_numpy(ranking.scores.astype(np.float64))
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    chosen = select_batch(
        scores,
        size - evaluation_count,
        method=method,
        beta=settings.acquisition.beta,
        exclude=torch.from_numpy(exclude),
        generator=generator,
    ).numpy()

    items = [
        NewBatchItem(int(ranking.image_ids[i]), float(ranking.scores[i]), "acquisition")
        for i in chosen
    ]
    items += [NewBatchItem(int(image_id), None, "evaluation") for image_id in evaluation_pick]
    # Evaluation items are shuffled in, so their position does not give them away.
    order = rng.permutation(len(items)) if evaluation_count else np.arange(len(items))
    return [items[i] for i in order]


def _batch_kind(items: list[NewBatchItem]) -> str:
    purposes = {str(item.purpose) for item in items}
    return purposes.pop() if len(purposes) == 1 else "mixed"


def _view(project: Project, batch: BatchInfo) -> BatchView:
    ranking = latest_ranking(project)
    names = project.config.class_names
    row_of = {}
    if ranking is not None:
        row_of = {int(image_id): i for i, image_id in enumerate(ranking.image_ids)}
    tasks = []
    for item in sorted(batch.items, key=lambda item: item.position):
        row = row_of.get(item.image_id)
        if ranking is not None and row is not None:
            top_classes = [names[c] for c in ranking.top_classes[row]]
            top_probs = [float(p) for p in ranking.top_probs[row]]
            epistemic = float(ranking.epistemic[row])
        else:
            top_classes, top_probs, epistemic = [], [], float("nan")
        tasks.append(
            BatchTask(
                image_id=item.image_id,
                path=item.path,
                purpose=item.purpose,
                score=item.score,
                top_classes=top_classes,
                top_probs=top_probs,
                epistemic=epistemic,
            )
        )
    return BatchView(
        batch_id=batch.id,
        annotator=batch.annotator,
        round_index=batch.round_index,
        tasks=tasks,
    )


@dataclass(frozen=True)
class SubmitResult:
    labels_written: int
    round: RoundResult | None
    """The round started by the batch's acquisition labels; None when none ran."""
    refit_error: str | None = None
    """Why the refit after saving failed; the labels are saved either way."""


def submit_batch(project: Project, batch_id: int, labels: dict[int, str]) -> SubmitResult:
    """Write a batch's labels in one transaction, then refit and re-rank.

    ``labels`` maps image id to class name and must cover every image of the batch. The
    labels are committed before the refit starts. A refit that fails leaves them saved and
    is reported in ``refit_error``; the next submitted batch refits on all labels.
    """
    names = project.config.class_names
    unknown = sorted({name for name in labels.values() if name not in names})
    if unknown:
        raise InputError(
            f"unknown class {', '.join(map(repr, unknown))}; valid classes: {', '.join(names)}"
        )
    classes = {c.name: c.id for c in project.store.classes(project.project_id)}
    with project_lock(project):
        batch = project.store.get_batch(batch_id)
        expected = {item.image_id for item in batch.items}
        missing = sorted(expected - set(labels))
        extra = sorted(set(labels) - expected)
        if missing or extra:
            raise InputError(
                f"batch {batch_id} needs exactly one label per image; "
                f"missing image ids {missing}, unexpected image ids {extra}"
            )
        project.store.submit_batch(
            batch_id, {image_id: classes[name] for image_id, name in labels.items()}
        )
        acquisition = [item for item in batch.items if item.purpose == "acquisition"]
        logger.info(
            "batch %d submitted by %s: %d labels (%d acquisition)",
            batch_id,
            batch.annotator,
            len(labels),
            len(acquisition),
        )
        try:
            if acquisition:
                return SubmitResult(labels_written=len(labels), round=run_round(project))
            refresh_latest_metrics(project)
        except (AnnotatorError, RuntimeError) as error:
            logger.exception("refit after batch %d failed; its labels are saved", batch_id)
            return SubmitResult(labels_written=len(labels), round=None, refit_error=str(error))
        return SubmitResult(labels_written=len(labels), round=None)

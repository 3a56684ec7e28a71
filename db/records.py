"""Plain records that the store accepts and returns.

The store never hands out ORM objects: these frozen dataclasses and pandas DataFrames stay
valid after their transaction has ended, and across threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from annotator.db.models import ItemPurpose

Prompt = str | list[str] | None
"""A class's text prompt, a list of prompt templates, or None for the project's templates."""


class ImageRecordLike(Protocol):
    """Attributes of an image record that ``Store.add_images`` reads.

    ``annotator.data.images.ImageRecord`` has these attributes.
    """

    @property
    def path(self) -> str | Path: ...

    @property
    def sha256(self) -> str | None: ...

    @property
    def width(self) -> int | None: ...

    @property
    def height(self) -> int | None: ...

    @property
    def status(self) -> str: ...

    @property
    def reason(self) -> str | None: ...


@dataclass(frozen=True)
class ProjectInfo:
    """A project row."""

    id: int
    name: str
    created_at: datetime
    config: dict[str, Any]
    model_spec: str
    factor_source: str


@dataclass(frozen=True)
class ClassInfo:
    """A class of a project, with its position ``index`` in the classifier's output."""

    id: int
    index: int
    name: str
    prompt: Prompt


@dataclass(frozen=True)
class IngestResult:
    """Counts of what ``Store.add_images`` did with each record."""

    inserted: int
    """New paths, added as new images."""
    updated: int
    """Known paths whose hash, size, status or reason changed."""
    unchanged: int
    """Known paths with identical values, whose rows were not touched."""
    invalidated_image_ids: tuple[int, ...]
    """Updated images whose feature row was cleared because their content changed or they are
    now skipped. Features must be extracted again for those still ``ok``."""


@dataclass(frozen=True)
class NewBatchItem:
    """An image to put into a new batch."""

    image_id: int
    score: float | None = None
    """Acquisition score that ranked the image, None for evaluation items and random picks."""
    purpose: ItemPurpose | str = ItemPurpose.ACQUISITION


@dataclass(frozen=True)
class BatchItemInfo:
    """One image of a batch, at its display position."""

    image_id: int
    path: str
    position: int
    score: float | None
    purpose: str


@dataclass(frozen=True)
class BatchInfo:
    """A batch with its items in display order."""

    id: int
    project_id: int
    annotator: str
    kind: str
    strategy: str
    status: str
    created_at: datetime
    submitted_at: datetime | None
    round_index: int
    items: tuple[BatchItemInfo, ...]

    @property
    def image_ids(self) -> list[int]:
        """Image ids of the items, in display order."""
        return [item.image_id for item in self.items]


@dataclass(frozen=True)
class RoundInfo:
    """A refit of the head and its evaluation metrics."""

    id: int
    index: int
    labels_spent: int
    strategy: str
    created_at: datetime
    refit_seconds: float | None
    prior_precision: float | None
    metrics: dict[str, Any]
    note: str | None


@dataclass(frozen=True)
class ProjectSummary:
    """Image and label counts of a project."""

    images_ok: int
    images_skipped: int
    pool: int
    """Decoded images in the pool split."""
    evaluation: int
    """Decoded images in the evaluation split."""
    labelled_pool: int
    """Pool images with at least one label."""
    labelled_evaluation: int
    """Evaluation images with at least one label."""
    labels: int
    """Label rows, relabels included."""
    open_batches: int
    rounds: int

"""SQLAlchemy models of the project database.

Every table except ``projects`` carries the owning project, directly or through its batch, and
every foreign key from a project's rows is ``ON DELETE CASCADE``, so deleting a project deletes
its data. Status-like columns are short strings restricted by named CHECK constraints to the
values of the ``StrEnum`` classes below.

``migrations/versions/0001_initial.py`` creates exactly this schema. A test compares the two
with Alembic's ``compare_metadata``, so a change here needs a new migration.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Explicit constraint names, so that the models, the migrations and both backends agree on them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LENGTH = 200
"""Maximum length of project names, class names, annotator names and strategies."""

STATUS_LENGTH = 16
"""Length of the status-like columns, enough for every enum value below."""


class ImageStatus(enum.StrEnum):
    """Outcome of decoding an image at ingestion."""

    OK = "ok"
    """Decoded fully, so the image gets features and may be ranked and labelled."""
    SKIPPED = "skipped"
    """Could not be decoded, for the reason in ``Image.reason``. It never enters the pool."""


class Split(enum.StrEnum):
    """Role of an image in the active-learning loop."""

    POOL = "pool"
    """Acquisition may choose the image and its label trains the head."""
    EVALUATION = "evaluation"
    """Reserved for measuring accuracy: never chosen by acquisition, never used for training."""


class LabelSource(enum.StrEnum):
    """Origin of a label."""

    HUMAN = "human"
    """Given by an annotator in the app or the CLI."""
    ORACLE = "oracle"
    """Revealed from ground truth by a simulated annotator."""
    IMPORT = "import"
    """Read from an existing labelled dataset."""


class BatchKind(enum.StrEnum):
    """Purpose of the images in a batch as a whole."""

    ACQUISITION = "acquisition"
    """Every item was chosen by an acquisition strategy from the pool."""
    EVALUATION = "evaluation"
    """Every item comes from the evaluation split."""
    MIXED = "mixed"
    """Acquisition and evaluation items interleaved, so annotators cannot tell them apart."""


class BatchStatus(enum.StrEnum):
    """Life cycle of a batch."""

    OPEN = "open"
    """Handed to an annotator and not yet submitted."""
    SUBMITTED = "submitted"
    """Its labels are stored, and it cannot be submitted again."""
    EXPIRED = "expired"
    """Abandoned. Its images may be handed out again, and it can no longer be submitted."""


class ItemPurpose(enum.StrEnum):
    """Purpose of one image in a batch."""

    ACQUISITION = "acquisition"
    """Chosen from the pool by the acquisition strategy."""
    EVALUATION = "evaluation"
    """Drawn from the evaluation split to measure accuracy."""


def _check_in(column: str, values: type[enum.StrEnum]) -> str:
    """Return the SQL condition ``column IN ('a', 'b')`` for the values of an enum."""
    allowed = ", ".join(f"'{member.value}'" for member in values)
    return f"{column} IN ({allowed})"


def utc_now() -> datetime:
    """Return the current time as an aware UTC ``datetime``."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned as an aware UTC ``datetime``.

    SQLite has no time zones and returns naive values, PostgreSQL returns the session's zone.
    This type gives both backends the same behaviour. Naive values are rejected on the way in
    because their zone is unknown.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} has no time zone. Pass an aware one.")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with the project's constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Project(Base):
    """One labelling project: an image pool, its classes, model and posterior factors."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    # The project configuration as a plain dict, validated by annotator.config.
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_spec: Mapped[str] = mapped_column(Text)
    # How the posterior factors were obtained, e.g. "published:/path", "estimated:pool", "demo".
    factor_source: Mapped[str] = mapped_column(Text)


class ImageClass(Base):
    """A class of the project, with its position ``index`` in the classifier's output."""

    __tablename__ = "classes"
    __table_args__ = (
        UniqueConstraint("project_id", "index"),
        UniqueConstraint("project_id", "name"),
        # Target of the composite foreign key from labels, which ties a label's class to its project.
        UniqueConstraint("project_id", "id"),
        CheckConstraint('"index" >= 0', name="index_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    # A text prompt (str) or a list of prompt templates (list[str]). Null stands for the
    # project's default templates filled with the class name.
    prompt: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)


class Image(Base):
    """An image file found at ingestion, decoded or skipped."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("project_id", "path"),
        UniqueConstraint("project_id", "id"),
        # Two images never share a row of the feature cache. NULLs are distinct in both backends.
        UniqueConstraint("project_id", "feature_row"),
        Index("ix_images_project_id_status_split", "project_id", "status", "split"),
        CheckConstraint(_check_in("status", ImageStatus), name="status"),
        CheckConstraint(_check_in("split", Split), name="split"),
        CheckConstraint(
            "(status = 'ok' AND reason IS NULL) OR (status = 'skipped' AND reason IS NOT NULL)",
            name="reason_iff_skipped",
        ),
        CheckConstraint(
            "feature_row IS NULL OR (status = 'ok' AND feature_row >= 0)",
            name="feature_row_only_ok",
        ),
        CheckConstraint("width IS NULL OR width > 0", name="width_positive"),
        CheckConstraint("height IS NULL OR height > 0", name="height_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    # Hex SHA-256 of the file's bytes, null when the file could not be read at all.
    sha256: Mapped[str | None] = mapped_column(String(64))
    # Size in pixels after the EXIF orientation is applied, null for skipped images.
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(STATUS_LENGTH))
    reason: Mapped[str | None] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(STATUS_LENGTH), default=Split.POOL.value)
    # Row of the image in the on-disk feature cache, null until features are extracted.
    feature_row: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Batch(Base):
    """Images handed to one annotator at once, open until submitted or expired."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_project_id_status", "project_id", "status"),
        CheckConstraint(_check_in("kind", BatchKind), name="kind"),
        CheckConstraint(_check_in("status", BatchStatus), name="status"),
        CheckConstraint(
            "(status = 'submitted') = (submitted_at IS NOT NULL)", name="submitted_at_iff_submitted"
        ),
        CheckConstraint("round_index >= 0", name="round_index_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    annotator: Mapped[str] = mapped_column(String(NAME_LENGTH))
    kind: Mapped[str] = mapped_column(String(STATUS_LENGTH))
    strategy: Mapped[str] = mapped_column(String(NAME_LENGTH))
    status: Mapped[str] = mapped_column(String(STATUS_LENGTH), default=BatchStatus.OPEN.value)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    submitted_at: Mapped[datetime | None] = mapped_column()
    # Index of the ranking round whose scores chose the items.
    round_index: Mapped[int] = mapped_column(Integer)


class BatchItem(Base):
    """One image of a batch, at its display position."""

    __tablename__ = "batch_items"
    __table_args__ = (
        UniqueConstraint("batch_id", "position"),
        CheckConstraint(_check_in("purpose", ItemPurpose), name="purpose"),
        CheckConstraint("position >= 0", name="position_non_negative"),
    )

    batch_id: Mapped[int] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    # Acquisition score that ranked the image, null for evaluation items and random picks.
    score: Mapped[float | None] = mapped_column(Float)
    purpose: Mapped[str] = mapped_column(String(STATUS_LENGTH))


class Label(Base):
    """A class given to an image. Relabelling adds a row, and the row with the largest id counts."""

    __tablename__ = "labels"
    __table_args__ = (
        # Composite keys make the database itself reject a label whose image or class belongs
        # to another project.
        ForeignKeyConstraint(
            ["project_id", "image_id"],
            ["images.project_id", "images.id"],
            ondelete="CASCADE",
            name="fk_labels_project_id_image_id_images",
        ),
        ForeignKeyConstraint(
            ["project_id", "class_id"],
            ["classes.project_id", "classes.id"],
            ondelete="CASCADE",
            name="fk_labels_project_id_class_id_classes",
        ),
        Index("ix_labels_project_id_image_id", "project_id", "image_id"),
        CheckConstraint(_check_in("source", LabelSource), name="source"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(Integer)
    class_id: Mapped[int] = mapped_column(Integer)
    annotator: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    source: Mapped[str] = mapped_column(String(STATUS_LENGTH))
    batch_id: Mapped[int | None] = mapped_column(
        ForeignKey("batches.id", ondelete="SET NULL"), index=True
    )


class Round(Base):
    """One refit of the head and its evaluation. Round 0 is the zero-shot model."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("project_id", "index"),
        CheckConstraint('"index" >= 0', name="index_non_negative"),
        CheckConstraint("labels_spent >= 0", name="labels_spent_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    # Labels from the pool that trained this round's head.
    labels_spent: Mapped[int] = mapped_column(Integer)
    strategy: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    # Wall-clock seconds of the refit, null for round 0, which has no refit.
    refit_seconds: Mapped[float | None] = mapped_column(Float)
    # Prior precision λ of the head's Laplace posterior.
    prior_precision: Mapped[float | None] = mapped_column(Float)
    # Everything the evaluation computed, for both the Bayesian and the MAP predictive.
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    note: Mapped[str | None] = mapped_column(Text)

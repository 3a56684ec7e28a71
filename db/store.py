"""``Store``: every read and write of the project database.

Each public method runs in its own transaction, so a method either applies all its writes or
none. Methods return frozen dataclasses from ``annotator.db.records`` or pandas DataFrames,
never ORM objects.

Errors
------
``InputError``
    An argument is invalid on its own (an unknown status, a blank name, a NaN metric).
``StoreError``
    The database state rejects the request (an unknown project, a class of another project,
    a batch submitted twice) or the database failed. SQLAlchemy's error is chained as the cause.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from os import fspath
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import pandas as pd
from sqlalchemy import (
    URL,
    Engine,
    Select,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from annotator.db.engine import (
    SQLITE_BEGIN_OPTION,
    check_schema,
    display_url,
    make_engine,
    sqlite_url,
    upgrade,
)
from annotator.db.models import (
    Base,
    Batch,
    BatchItem,
    BatchKind,
    BatchStatus,
    Image,
    ImageClass,
    ImageStatus,
    ItemPurpose,
    Label,
    LabelSource,
    Project,
    Round,
    Split,
    utc_now,
)
from annotator.db.records import (
    BatchInfo,
    BatchItemInfo,
    ClassInfo,
    ImageRecordLike,
    IngestResult,
    NewBatchItem,
    ProjectInfo,
    ProjectSummary,
    Prompt,
    RoundInfo,
)
from annotator.db.validation import (
    batch_items,
    check_age,
    check_id_map,
    check_ids,
    check_int,
    check_name,
    check_optional_float,
    check_text,
    chunked,
    class_specs,
    enum_value,
    format_values,
    image_rows,
    json_value,
)
from annotator.errors import InputError, StoreError

logger = logging.getLogger(__name__)

ProjectRef = str | int | ProjectInfo
"""A project given by name, by id, or as the ``ProjectInfo`` that the store returned."""

PROJECT_DB_NAME = "project.db"
"""File name of a project's SQLite database inside its project folder."""

IN_CHUNK = 10_000
"""Maximum number of ids bound in one ``IN (...)`` list."""


_IMAGE_COLUMNS = (
    Image.id,
    Image.path,
    Image.sha256,
    Image.width,
    Image.height,
    Image.status,
    Image.reason,
    Image.split,
    Image.feature_row,
    Image.created_at,
)
_IMAGE_DTYPES = {
    "id": "int64",
    "path": "str",
    "sha256": "str",
    "width": "Int64",
    "height": "Int64",
    "status": "str",
    "reason": "str",
    "split": "str",
    "feature_row": "Int64",
}
_LABEL_DTYPES = {
    "id": "int64",
    "image_id": "int64",
    "path": "str",
    "split": "str",
    "class_id": "int64",
    "class_index": "int64",
    "class_name": "str",
    "annotator": "str",
    "source": "str",
    "batch_id": "Int64",
}
_ROUND_DTYPES = {
    "id": "int64",
    "index": "int64",
    "labels_spent": "int64",
    "strategy": "str",
    "refit_seconds": "float64",
    "prior_precision": "float64",
    "metrics": "object",
    "note": "str",
}


class Store:
    """The project database: projects, classes, images, labels, batches and rounds.

    Parameters
    ----------
    url
        A database URL (``sqlite:////abs/path/project.db``,
        ``postgresql+psycopg://user@127.0.0.1:5432/name``) or an engine from
        ``annotator.db.make_engine``. A store made from a URL owns its engine and disposes of it
        in ``close``.
    migrate
        Migrate the database to the newest schema on opening (an empty database gets the whole
        schema). With ``False`` the store only checks that the schema is current.

    Raises
    ------
    StoreError
        If the database is unreachable, or its schema is newer than the code or, with
        ``migrate=False``, older.

    Notes
    -----
    A ``Store`` is safe to share between threads: every method opens its own session. On SQLite,
    write methods begin ``IMMEDIATE`` transactions, so concurrent writers queue for the lock
    (up to the busy timeout) instead of failing halfway.
    """

    def __init__(self, url: str | URL | Engine, *, migrate: bool = True) -> None:
        self._owns_engine = not isinstance(url, Engine)
        self._engine = make_engine(url) if self._owns_engine else url
        self._write_engine = self._engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        try:
            if migrate:
                upgrade(self._engine)
            else:
                check_schema(self._engine)
        except StoreError:
            self.close()
            raise

    @classmethod
    def for_project_dir(cls, path: str | Path, *, migrate: bool = True) -> Store:
        """Open the SQLite store ``PROJECT_DIR/project.db``, creating the file if needed.

        Raises
        ------
        StoreError
            If ``path`` is not an existing folder.
        """
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise StoreError(
                f"project folder {fspath(folder)!r} does not exist or is not a folder. "
                "Create the project first or check the path."
            )
        return cls(sqlite_url(folder / PROJECT_DB_NAME), migrate=migrate)

    @property
    def url(self) -> str:
        """Database URL with the password masked."""
        return display_url(self._engine.url)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for migrations and tests. Services call methods instead."""
        return self._engine

    def close(self) -> None:
        """Close the pooled connections if this store created the engine."""
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _session(self, action: str, *, write: bool = False) -> Iterator[Session]:
        """Open a session in one transaction, committed on success and rolled back on any error.

        ``action`` describes the operation for error messages, e.g. "submit batch 3".
        """
        engine = self._write_engine if write else self._engine
        try:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                yield session
        except IntegrityError as error:
            raise StoreError(
                f"cannot {action}: the database rejected it ({_first_line(error.orig)}). Another "
                "writer may have changed the project at the same time, so reload and retry."
            ) from error
        except OperationalError as error:
            raise StoreError(
                f"cannot {action} in the database at {self.url!r}: {_first_line(error.orig)}. "
                "Check that the database is reachable and writable. A locked SQLite file means "
                "that another process held the write lock too long, so retry."
            ) from error
        except SQLAlchemyError as error:
            raise StoreError(
                f"cannot {action} in the database at {self.url!r}: {_first_line(error)}"
            ) from error

    def _project(self, session: Session, project: ProjectRef, *, lock: bool = False) -> Project:
        """Load a project row by name, id or ``ProjectInfo``, with a row lock if ``lock``."""
        statement = select(Project)
        if isinstance(project, ProjectInfo):
            statement = statement.where(Project.id == project.id)
        elif isinstance(project, str):
            statement = statement.where(Project.name == project.strip())
        elif isinstance(project, int) and not isinstance(project, bool):
            statement = statement.where(Project.id == project)
        else:
            raise InputError(
                f"project must be a name, an id or a ProjectInfo, got {type(project).__name__} "
                f"{project!r}"
            )
        if lock:
            # Serialises writers of one project on PostgreSQL. SQLite's IMMEDIATE transactions
            # already hold the database's write lock.
            statement = statement.with_for_update()

        row = session.scalars(statement).one_or_none()
        if row is None:
            known = session.scalars(select(Project.name).order_by(Project.name)).all()
            listed = format_values(known) if known else "none"
            raise StoreError(
                f"project {_project_label(project)} not found in the database at {self.url!r}. "
                f"Check the name. Existing projects: {listed}."
            )
        return row

    def _read_frame(
        self, session: Session, statement: Select[Any], dtypes: Mapping[str, str]
    ) -> pd.DataFrame:
        """Run ``statement`` with ``pandas.read_sql`` and give the columns stable dtypes.

        Timestamps come back as aware UTC datetimes and become ``datetime64[..., UTC]``.
        """
        frame = pd.read_sql(statement, session.connection())
        frame = frame.astype({column: dtype for column, dtype in dtypes.items() if column in frame})
        for column in frame.columns:
            if column.endswith("_at"):
                frame[column] = pd.to_datetime(frame[column], utc=True)
        return frame

    # ------------------------------------------------------------------ projects

    def create_project(
        self,
        name: str,
        *,
        model_spec: str,
        factor_source: str,
        config: Mapping[str, Any] | None = None,
    ) -> ProjectInfo:
        """Create a project.

        Parameters
        ----------
        name
            Unique project name.
        model_spec
            The vision-language model, e.g. ``ViT-B-32:openai`` or ``demo``.
        factor_source
            How the posterior factors were obtained, e.g. ``published:/path``,
            ``estimated:pool`` or ``demo``.
        config
            The project configuration as plain JSON data.

        Raises
        ------
        StoreError
            If a project of that name exists.
        """
        name = check_name(name, "project name")
        model_spec = check_text(model_spec, "model_spec")
        factor_source = check_text(factor_source, "factor_source")
        config_data = json_value(dict(config or {}), "config")

        with self._session(f"create project {name!r}", write=True) as session:
            if session.scalars(select(Project.id).where(Project.name == name)).first() is not None:
                raise StoreError(
                    f"project {name!r} already exists in the database at {self.url!r}. Choose "
                    "another name or open the existing project with get_project."
                )
            project = Project(
                name=name,
                created_at=utc_now(),
                config=config_data,
                model_spec=model_spec,
                factor_source=factor_source,
            )
            session.add(project)
            session.flush()
            info = _project_info(project)
        logger.info("created project %r (id %d, model %s)", name, info.id, model_spec)
        return info

    def get_project(self, project: ProjectRef) -> ProjectInfo:
        """Return a project by name, id or ``ProjectInfo``.

        Raises
        ------
        StoreError
            If no such project exists. The message lists the existing names.
        """
        with self._session(f"read project {_project_label(project)}") as session:
            return _project_info(self._project(session, project))

    def list_projects(self) -> list[ProjectInfo]:
        """Return all projects, ordered by name."""
        with self._session("list projects") as session:
            projects = session.scalars(select(Project).order_by(Project.name)).all()
            return [_project_info(project) for project in projects]

    def update_project_config(self, project: ProjectRef, config: Mapping[str, Any]) -> ProjectInfo:
        """Replace a project's configuration with ``config`` (plain JSON data)."""
        config_data = json_value(dict(config), "config")
        with self._session(
            f"update the config of project {_project_label(project)}", write=True
        ) as session:
            row = self._project(session, project, lock=True)
            row.config = config_data
            session.flush()
            return _project_info(row)

    def set_factor_source(self, project: ProjectRef, factor_source: str) -> ProjectInfo:
        """Record how the posterior factors of a project were obtained."""
        factor_source = check_text(factor_source, "factor_source")
        with self._session(
            f"set the factor source of project {_project_label(project)}", write=True
        ) as session:
            row = self._project(session, project, lock=True)
            row.factor_source = factor_source
            session.flush()
            return _project_info(row)

    def delete_project(self, project: ProjectRef) -> None:
        """Delete a project with its classes, images, labels, batches and rounds."""
        with self._session(f"delete project {_project_label(project)}", write=True) as session:
            row = self._project(session, project, lock=True)
            project_id, name = row.id, row.name
            session.expunge(row)
            session.execute(delete(Project).where(Project.id == project_id))
        logger.info("deleted project %r (id %d)", name, project_id)

    # ------------------------------------------------------------------ classes

    def set_classes(
        self, project: ProjectRef, classes: Sequence[str] | Mapping[str, Prompt]
    ) -> list[ClassInfo]:
        """Define the classes of a project, in classifier order.

        Parameters
        ----------
        classes
            Class names in order, or an ordered mapping of class name to prompt: a prompt
            string, a list of prompt templates, or None for the project's templates.

        Returns
        -------
        list[ClassInfo]
            The classes after the change, ordered by index.

        Raises
        ------
        StoreError
            If labelled classes would be renamed, reordered or removed. The existing classes in
            their order may always be kept, with new prompts and new classes appended at the
            end. Without labels, the list may be replaced entirely.
        """
        specs = class_specs(classes)
        label = _project_label(project)
        with self._session(f"set the classes of project {label}", write=True) as session:
            row = self._project(session, project, lock=True)
            existing = session.scalars(
                select(ImageClass).where(ImageClass.project_id == row.id).order_by(ImageClass.index)
            ).all()
            existing_names = [item.name for item in existing]
            new_names = [name for name, _ in specs]

            if new_names[: len(existing_names)] == existing_names:
                # Keep the existing classes (and their ids), update prompts, append the rest.
                for item, (_, prompt) in zip(existing, specs, strict=False):
                    item.prompt = prompt
                to_insert = specs[len(existing) :]
                first_index = len(existing)
            else:
                labelled = session.scalars(
                    select(ImageClass.name)
                    .join(Label, Label.class_id == ImageClass.id)
                    .where(ImageClass.project_id == row.id)
                    .distinct()
                ).all()
                if labelled:
                    raise StoreError(
                        f"cannot replace the classes of project {row.name!r}: classes "
                        f"{format_values(sorted(labelled))} already have labels. Keep the "
                        f"existing classes in their order ({format_values(existing_names)}) "
                        "and append new ones at the end."
                    )
                session.execute(delete(ImageClass).where(ImageClass.project_id == row.id))
                to_insert = specs
                first_index = 0

            if to_insert:
                _insert_rows(
                    session,
                    ImageClass,
                    [
                        {
                            "project_id": row.id,
                            "index": first_index + offset,
                            "name": name,
                            "prompt": prompt,
                        }
                        for offset, (name, prompt) in enumerate(to_insert)
                    ],
                )
            session.flush()
            result = self._classes(session, row.id)
        logger.info("project %r has %d classes", row.name, len(result))
        return result

    def classes(self, project: ProjectRef) -> list[ClassInfo]:
        """Return the classes of a project, ordered by index."""
        with self._session(f"read the classes of project {_project_label(project)}") as session:
            return self._classes(session, self._project(session, project).id)

    def _classes(self, session: Session, project_id: int) -> list[ClassInfo]:
        rows = session.scalars(
            select(ImageClass).where(ImageClass.project_id == project_id).order_by(ImageClass.index)
        ).all()
        return [ClassInfo(id=r.id, index=r.index, name=r.name, prompt=r.prompt) for r in rows]

    # ------------------------------------------------------------------ images

    def add_images(
        self,
        project: ProjectRef,
        records: Iterable[ImageRecordLike],
        *,
        split: Split | str = Split.POOL,
    ) -> IngestResult:
        """Insert or update images by path, in bulk, so ingesting a folder again is safe.

        A new path becomes a new image in ``split``. A known path keeps its id, split and
        feature row, and its hash, size, status and reason are updated if they changed. When
        the content hash changed or the image is now skipped, its feature row is cleared so that
        stale features are never read. Those ids are returned in ``invalidated_image_ids``.

        Parameters
        ----------
        records
            Objects with ``path, sha256, width, height, status, reason`` attributes, such as
            ``annotator.data.images.ImageRecord``.
        split
            Split of the new images.

        Raises
        ------
        InputError
            If a record is inconsistent (``ok`` with a reason, ``skipped`` without one, a
            non-positive size) or a path appears twice.
        """
        split_value = enum_value(Split, split, "split")
        rows = image_rows(records)
        label = _project_label(project)

        with self._session(f"add images to project {label}", write=True) as session:
            project_id = self._project(session, project, lock=True).id
            existing = {
                row.path: row
                for row in session.execute(
                    select(
                        Image.id,
                        Image.path,
                        Image.sha256,
                        Image.width,
                        Image.height,
                        Image.status,
                        Image.reason,
                        Image.feature_row,
                    ).where(Image.project_id == project_id)
                )
            }

            now = utc_now()
            new_rows: list[dict[str, Any]] = []
            changed_rows: list[dict[str, Any]] = []
            invalidated: list[int] = []
            for row in rows:
                old = existing.get(row["path"])
                if old is None:
                    new_rows.append(
                        {
                            **row,
                            "project_id": project_id,
                            "split": split_value,
                            "feature_row": None,
                            "created_at": now,
                        }
                    )
                    continue
                fields = ("sha256", "width", "height", "status", "reason")
                if all(getattr(old, field) == row[field] for field in fields):
                    continue
                feature_row = old.feature_row
                content_changed = old.sha256 != row["sha256"]
                if feature_row is not None and (content_changed or row["status"] != ImageStatus.OK):
                    feature_row = None
                    invalidated.append(old.id)
                changed_rows.append(
                    {"id": old.id, **{f: row[f] for f in fields}, "feature_row": feature_row}
                )

            if new_rows:
                _insert_rows(session, Image, new_rows)
            if changed_rows:
                _update_by_id(session, Image, changed_rows)

        result = IngestResult(
            inserted=len(new_rows),
            updated=len(changed_rows),
            unchanged=len(rows) - len(new_rows) - len(changed_rows),
            invalidated_image_ids=tuple(invalidated),
        )
        logger.info(
            "added images to project %s: inserted=%d updated=%d unchanged=%d invalidated=%d",
            label,
            result.inserted,
            result.updated,
            result.unchanged,
            len(invalidated),
        )
        return result

    def images_frame(
        self,
        project: ProjectRef,
        *,
        status: ImageStatus | str | None = None,
        split: Split | str | None = None,
    ) -> pd.DataFrame:
        """Return the images of a project, ordered by id, optionally filtered.

        Returns
        -------
        pandas.DataFrame
            One row per image with columns ``id, path, sha256, width, height, status, reason,
            split, feature_row, created_at``. ``width``, ``height`` and ``feature_row`` are
            nullable ``Int64``.
        """
        status_value = None if status is None else enum_value(ImageStatus, status, "status")
        split_value = None if split is None else enum_value(Split, split, "split")
        with self._session(f"read the images of project {_project_label(project)}") as session:
            project_id = self._project(session, project).id
            statement = select(*_IMAGE_COLUMNS).where(Image.project_id == project_id)
            if status_value is not None:
                statement = statement.where(Image.status == status_value)
            if split_value is not None:
                statement = statement.where(Image.split == split_value)
            return self._read_frame(session, statement.order_by(Image.id), _IMAGE_DTYPES)

    def set_split(self, project: ProjectRef, image_ids: Iterable[int], split: Split | str) -> int:
        """Move images to ``split`` and return how many were moved.

        Labels move with their images, so moving a labelled image changes which labels train
        the head and which measure accuracy.

        Raises
        ------
        StoreError
            If an id is not an image of the project, or an image is in an open batch (its
            purpose there was chosen for its current split).
        """
        split_value = enum_value(Split, split, "split")
        ids = check_ids(image_ids, "image id")
        label = _project_label(project)
        with self._session(f"set the split of images in project {label}", write=True) as session:
            project_id = self._project(session, project, lock=True).id
            self._images(session, project_id, label, ids)
            in_open = self._open_batches_holding(session, project_id, ids)
            if in_open:
                raise StoreError(
                    f"cannot change the split of images {format_values(sorted(in_open))}: they "
                    f"are in open batches {format_values(sorted(set(in_open.values())))}. "
                    "Submit or expire those batches first."
                )
            moved = 0
            for chunk in chunked(ids, IN_CHUNK):
                moved += session.execute(
                    update(Image)
                    .where(Image.project_id == project_id, Image.id.in_(chunk))
                    .where(Image.split != split_value)
                    .values(split=split_value)
                ).rowcount
        logger.info("moved %d images of project %s to split %s", moved, label, split_value)
        return moved

    def assign_feature_rows(self, project: ProjectRef, rows: Mapping[int, int]) -> None:
        """Record the feature-cache row of each image, given as ``{image_id: row}``.

        Rows already held by the given images may be exchanged among them.

        Raises
        ------
        InputError
            If a row is negative or two images get the same row.
        StoreError
            If an image is not an ``ok`` image of the project, or a row belongs to another image.
        """
        mapping = check_id_map(rows, "image id", "feature row", value_minimum=0)
        shared = sorted(row for row, count in Counter(mapping.values()).items() if count > 1)
        if shared:
            raise InputError(f"feature rows {format_values(shared)} are given to several images")
        if not mapping:
            return
        ids = list(mapping)
        label = _project_label(project)
        with self._session(f"assign feature rows in project {label}", write=True) as session:
            project_id = self._project(session, project, lock=True).id
            states = self._images(session, project_id, label, ids)
            _reject_skipped(
                states,
                label,
                "have no features. Assign feature rows only to images with status 'ok'.",
            )
            changes = {
                image_id: row
                for image_id, row in mapping.items()
                if states[image_id].feature_row != row
            }

            owners: dict[int, int] = {}
            for chunk in chunked(list(changes.values()), IN_CHUNK):
                rows_in_use = session.execute(
                    select(Image.feature_row, Image.id).where(
                        Image.project_id == project_id, Image.feature_row.in_(chunk)
                    )
                )
                owners.update({row: owner for row, owner in rows_in_use})
            conflicts = {row: owner for row, owner in owners.items() if owner not in mapping}
            if conflicts:
                raise StoreError(
                    f"feature rows {format_values(sorted(conflicts))} already belong to images "
                    f"{format_values(conflicts[row] for row in sorted(conflicts))} of project "
                    f"{label}, and each image needs its own row"
                )

            # Rows exchanged among the given images are freed first, so that no row ever has two
            # owners under the unique (project_id, feature_row) constraint.
            exchanged = sorted(set(owners.values()))
            for chunk in chunked(exchanged, IN_CHUNK):
                session.execute(
                    update(Image).where(Image.id.in_(chunk)).values(feature_row=None),
                    execution_options={"synchronize_session": False},
                )
            _update_by_id(
                session,
                Image,
                [{"id": image_id, "feature_row": row} for image_id, row in changes.items()],
            )
        logger.debug("assigned %d feature rows in project %s", len(mapping), label)

    def _images(
        self, session: Session, project_id: int, label: str, ids: Sequence[int]
    ) -> dict[int, _ImageState]:
        """Load the state of images by id, raising if an id is not an image of the project."""
        found: dict[int, _ImageState] = {}
        for chunk in chunked(ids, IN_CHUNK):
            rows = session.execute(
                select(Image.id, Image.status, Image.split, Image.feature_row).where(
                    Image.project_id == project_id, Image.id.in_(chunk)
                )
            )
            for image_id, status, split, feature_row in rows:
                found[image_id] = _ImageState(status, split, feature_row)
        missing = [image_id for image_id in ids if image_id not in found]
        if missing:
            raise StoreError(
                f"image ids {format_values(missing)} are not images of project {label}. "
                "Use the ids from images_frame."
            )
        return found

    def _open_batches_holding(
        self, session: Session, project_id: int, ids: Sequence[int]
    ) -> dict[int, int]:
        """Return ``{image_id: batch_id}`` for the images that are in an open batch."""
        holding: dict[int, int] = {}
        for chunk in chunked(ids, IN_CHUNK):
            holding.update(
                session.execute(
                    select(BatchItem.image_id, BatchItem.batch_id)
                    .join(Batch, Batch.id == BatchItem.batch_id)
                    .where(
                        Batch.project_id == project_id,
                        Batch.status == BatchStatus.OPEN.value,
                        BatchItem.image_id.in_(chunk),
                    )
                ).all()
            )
        return holding

    # ------------------------------------------------------------------ labels

    def add_labels(
        self,
        project: ProjectRef,
        labels: Mapping[int, int],
        *,
        annotator: str,
        source: LabelSource | str = LabelSource.HUMAN,
    ) -> int:
        """Add labels ``{image_id: class_id}`` outside any batch, all or none, and count them.

        Use it for imported labels and oracle labels. Labels from a batch go through
        ``submit_batch``. An image labelled again gets a new row and the newest row counts.

        Raises
        ------
        StoreError
            If an image or class is not one of the project's, or an image is skipped.
        """
        mapping = check_id_map(labels, "image id", "class id")
        annotator = check_name(annotator, "annotator")
        source_value = enum_value(LabelSource, source, "label source")
        if not mapping:
            return 0
        label = _project_label(project)
        with self._session(f"add labels to project {label}", write=True) as session:
            project_id = self._project(session, project, lock=True).id
            self._check_label_targets(session, project_id, label, mapping)
            self._insert_labels(session, project_id, mapping, annotator, source_value, None)
        logger.info(
            "added %d %s labels by %r to project %s", len(mapping), source_value, annotator, label
        )
        return len(mapping)

    def _check_label_targets(
        self, session: Session, project_id: int, label: str, mapping: Mapping[int, int]
    ) -> None:
        """Raise unless every image and class of ``mapping`` belongs to the project."""
        states = self._images(session, project_id, label, list(mapping))
        _reject_skipped(states, label, "cannot be labelled")
        class_ids = sorted(set(mapping.values()))
        known = set(
            session.scalars(
                select(ImageClass.id).where(
                    ImageClass.project_id == project_id, ImageClass.id.in_(class_ids)
                )
            )
        )
        foreign = [class_id for class_id in class_ids if class_id not in known]
        if foreign:
            raise StoreError(
                f"class ids {format_values(foreign)} are not classes of project {label}. "
                "Use the ids from Store.classes."
            )

    def _insert_labels(
        self,
        session: Session,
        project_id: int,
        mapping: Mapping[int, int],
        annotator: str,
        source: str,
        batch_id: int | None,
    ) -> None:
        now = utc_now()
        _insert_rows(
            session,
            Label,
            [
                {
                    "project_id": project_id,
                    "image_id": image_id,
                    "class_id": class_id,
                    "annotator": annotator,
                    "created_at": now,
                    "source": source,
                    "batch_id": batch_id,
                }
                for image_id, class_id in mapping.items()
            ],
        )

    def labels_frame(
        self,
        project: ProjectRef,
        *,
        latest_only: bool = False,
        split: Split | str | None = None,
        source: LabelSource | str | None = None,
    ) -> pd.DataFrame:
        """Return the labels of a project, ordered by id.

        Parameters
        ----------
        latest_only
            Keep one row per image: the label with the largest id, which is the newest.
        split
            Only labels of images in this split.
        source
            Only labels from this source.

        Returns
        -------
        pandas.DataFrame
            Columns ``id, image_id, path, split, class_id, class_index, class_name, annotator,
            source, batch_id, created_at``. ``batch_id`` is nullable ``Int64``.
        """
        split_value = None if split is None else enum_value(Split, split, "split")
        source_value = None if source is None else enum_value(LabelSource, source, "source")
        with self._session(f"read the labels of project {_project_label(project)}") as session:
            project_id = self._project(session, project).id
            statement = (
                select(
                    Label.id,
                    Label.image_id,
                    Image.path,
                    Image.split,
                    Label.class_id,
                    ImageClass.index.label("class_index"),
                    ImageClass.name.label("class_name"),
                    Label.annotator,
                    Label.source,
                    Label.batch_id,
                    Label.created_at,
                )
                .join(Image, Image.id == Label.image_id)
                .join(ImageClass, ImageClass.id == Label.class_id)
                .where(Label.project_id == project_id)
            )
            if source_value is not None:
                statement = statement.where(Label.source == source_value)
            if latest_only:
                # The newest label of each image has the largest id. Ids only grow, whereas
                # created_at may tie within one transaction.
                newest = (
                    select(func.max(Label.id))
                    .where(Label.project_id == project_id)
                    .group_by(Label.image_id)
                )
                if source_value is not None:
                    newest = newest.where(Label.source == source_value)
                statement = statement.where(Label.id.in_(newest))
            if split_value is not None:
                statement = statement.where(Image.split == split_value)
            return self._read_frame(session, statement.order_by(Label.id), _LABEL_DTYPES)

    # ------------------------------------------------------------------ batches

    def open_batch(
        self,
        project: ProjectRef,
        annotator: str,
        items: Sequence[int | NewBatchItem],
        *,
        kind: BatchKind | str,
        strategy: str,
        round_index: int,
    ) -> BatchInfo:
        """Hand images to an annotator as a new open batch, in the given display order.

        Parameters
        ----------
        items
            Image ids or ``NewBatchItem``s. A bare id gets the purpose ``evaluation`` in an
            evaluation batch and ``acquisition`` otherwise, and no score.
        kind
            ``acquisition`` and ``evaluation`` batches contain only items of that purpose, and
            ``mixed`` batches hold both.
        strategy
            Name of the acquisition strategy that chose the items.
        round_index
            Index of the ranking round whose scores chose the items.

        Raises
        ------
        StoreError
            If an image is not an ``ok`` image of the project, is already in an open batch, or
            its split does not match its purpose (acquisition items come from the pool,
            evaluation items from the evaluation split).
        """
        annotator = check_name(annotator, "annotator")
        kind_value = enum_value(BatchKind, kind, "batch kind")
        strategy = check_name(strategy, "strategy")
        round_index = check_int(round_index, "round_index")
        new_items = batch_items(items, kind_value)
        ids = [item.image_id for item in new_items]
        label = _project_label(project)

        with self._session(f"open a batch in project {label}", write=True) as session:
            project_id = self._project(session, project, lock=True).id
            self._check_batch_images(session, project_id, label, new_items)

            batch = Batch(
                project_id=project_id,
                annotator=annotator,
                kind=kind_value,
                strategy=strategy,
                status=BatchStatus.OPEN.value,
                created_at=utc_now(),
                submitted_at=None,
                round_index=round_index,
            )
            session.add(batch)
            session.flush()
            _insert_rows(
                session,
                BatchItem,
                [
                    {
                        "batch_id": batch.id,
                        "image_id": item.image_id,
                        "position": position,
                        "score": item.score,
                        "purpose": item.purpose,
                    }
                    for position, item in enumerate(new_items)
                ],
            )
            info = self._batch_infos(session, [batch])[0]
        logger.info(
            "opened batch %d in project %s for %r: %d images, kind=%s strategy=%s round=%d",
            info.id,
            label,
            annotator,
            len(ids),
            kind_value,
            strategy,
            round_index,
        )
        return info

    def _check_batch_images(
        self, session: Session, project_id: int, label: str, items: Sequence[NewBatchItem]
    ) -> None:
        ids = [item.image_id for item in items]
        states = self._images(session, project_id, label, ids)
        _reject_skipped(states, label, "cannot be handed out")
        for purpose, split in (
            (ItemPurpose.ACQUISITION, Split.POOL),
            (ItemPurpose.EVALUATION, Split.EVALUATION),
        ):
            wrong = [
                item.image_id
                for item in items
                if item.purpose == purpose and states[item.image_id].split != split
            ]
            if wrong:
                raise StoreError(
                    f"images {format_values(wrong)} have the purpose {purpose.value!r} but are "
                    f"not in the {split.value!r} split, where {purpose.value} items must come "
                    "from"
                )
        in_open = self._open_batches_holding(session, project_id, ids)
        if in_open:
            raise StoreError(
                f"images {format_values(sorted(in_open))} are already in open batches "
                f"{format_values(sorted(set(in_open.values())))}. Choose other images or expire "
                "those batches first."
            )

    def get_batch(self, batch_id: int) -> BatchInfo:
        """Return a batch with its items.

        Raises
        ------
        StoreError
            If no batch has this id.
        """
        batch_id = check_int(batch_id, "batch id", minimum=1)
        with self._session(f"read batch {batch_id}") as session:
            return self._batch_infos(session, [self._batch(session, batch_id)])[0]

    def open_batches(self, project: ProjectRef, annotator: str | None = None) -> list[BatchInfo]:
        """Return the open batches of a project, oldest first, optionally of one annotator."""
        with self._session(f"read open batches of project {_project_label(project)}") as session:
            project_id = self._project(session, project).id
            statement = select(Batch).where(
                Batch.project_id == project_id, Batch.status == BatchStatus.OPEN.value
            )
            if annotator is not None:
                statement = statement.where(Batch.annotator == check_name(annotator, "annotator"))
            batches = session.scalars(statement.order_by(Batch.id)).all()
            return self._batch_infos(session, batches)

    def submit_batch(
        self,
        batch_id: int,
        labels: Mapping[int, int],
        *,
        source: LabelSource | str = LabelSource.HUMAN,
    ) -> BatchInfo:
        """Store the labels ``{image_id: class_id}`` of a batch and mark it submitted.

        Both happen in one transaction: on any failure no label is written, the batch stays
        open and ``StoreError`` is raised. Images of the batch without a label stay unlabelled
        and may be handed out again.

        Parameters
        ----------
        labels
            A class for some or all images of the batch, at least one.
        source
            ``human`` for annotators, ``oracle`` for simulated ones.

        Raises
        ------
        InputError
            If ``labels`` is empty.
        StoreError
            If the batch does not exist, was already submitted or has expired, or a label names
            an image outside the batch or a class of another project.
        """
        batch_id = check_int(batch_id, "batch id", minimum=1)
        mapping = check_id_map(labels, "image id", "class id")
        source_value = enum_value(LabelSource, source, "label source")
        if not mapping:
            raise InputError(
                f"no labels given for batch {batch_id}. Label at least one of its images, or "
                "let the batch expire."
            )

        with self._session(f"submit batch {batch_id}", write=True) as session:
            batch = self._batch(session, batch_id, lock=True)
            if batch.status == BatchStatus.SUBMITTED:
                submitted = f"{batch.submitted_at:%Y-%m-%d %H:%M:%S} UTC"
                raise StoreError(
                    f"batch {batch_id} was already submitted at {submitted} and its labels are "
                    "stored. Open a new batch to label more images."
                )
            if batch.status == BatchStatus.EXPIRED:
                raise StoreError(
                    f"batch {batch_id} has expired and cannot be submitted, because its images "
                    "may have been handed to someone else. Open a new batch."
                )

            item_ids = set(
                session.scalars(select(BatchItem.image_id).where(BatchItem.batch_id == batch_id))
            )
            outside = [image_id for image_id in mapping if image_id not in item_ids]
            if outside:
                raise StoreError(
                    f"images {format_values(outside)} are not in batch {batch_id}. Submit labels "
                    f"only for its images: {format_values(sorted(item_ids))}."
                )
            label = f"id {batch.project_id}"
            self._check_label_targets(session, batch.project_id, label, mapping)

            # Labels first, then the status: a failure in either rolls back both.
            self._insert_labels(
                session, batch.project_id, mapping, batch.annotator, source_value, batch_id
            )
            session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status == BatchStatus.OPEN.value)
                .values(status=BatchStatus.SUBMITTED.value, submitted_at=utc_now())
            )
            session.refresh(batch)
            info = self._batch_infos(session, [batch])[0]
        logger.info(
            "submitted batch %d of project id %d by %r: %d labels, %d images left unlabelled",
            batch_id,
            info.project_id,
            info.annotator,
            len(mapping),
            len(item_ids) - len(mapping),
        )
        return info

    def expire_batches(
        self, older_than: timedelta, *, project: ProjectRef | None = None
    ) -> list[int]:
        """Expire open batches created more than ``older_than`` ago and return their ids.

        Expired batches can no longer be submitted, and their images may be handed out again.
        Without ``project``, batches of all projects expire.
        """
        cutoff = utc_now() - check_age(older_than)
        with self._session("expire batches", write=True) as session:
            statement = select(Batch.id).where(
                Batch.status == BatchStatus.OPEN.value, Batch.created_at < cutoff
            )
            if project is not None:
                statement = statement.where(Batch.project_id == self._project(session, project).id)
            expired = list(session.scalars(statement.order_by(Batch.id)))
            for chunk in chunked(expired, IN_CHUNK):
                session.execute(
                    update(Batch)
                    .where(Batch.id.in_(chunk))
                    .values(status=BatchStatus.EXPIRED.value)
                )
        if expired:
            logger.info("expired %d batches older than %s: %s", len(expired), older_than, expired)
        return expired

    def _batch(self, session: Session, batch_id: int, *, lock: bool = False) -> Batch:
        statement = select(Batch).where(Batch.id == batch_id)
        if lock:
            statement = statement.with_for_update()
        batch = session.scalars(statement).one_or_none()
        if batch is None:
            raise StoreError(
                f"batch {batch_id} not found in the database at {self.url!r}. Use the ids from "
                "open_batches."
            )
        return batch

    def _batch_infos(self, session: Session, batches: Sequence[Batch]) -> list[BatchInfo]:
        """Convert batches to ``BatchInfo``, loading all their items in one query."""
        if not batches:
            return []
        items: dict[int, list[BatchItemInfo]] = {batch.id: [] for batch in batches}
        for chunk in chunked(list(items), IN_CHUNK):
            rows = session.execute(
                select(
                    BatchItem.batch_id,
                    BatchItem.image_id,
                    Image.path,
                    BatchItem.position,
                    BatchItem.score,
                    BatchItem.purpose,
                )
                .join(Image, Image.id == BatchItem.image_id)
                .where(BatchItem.batch_id.in_(chunk))
                .order_by(BatchItem.batch_id, BatchItem.position)
            )
            for batch_id, image_id, path, position, score, purpose in rows:
                items[batch_id].append(BatchItemInfo(image_id, path, position, score, purpose))
        return [
            BatchInfo(
                id=batch.id,
                project_id=batch.project_id,
                annotator=batch.annotator,
                kind=batch.kind,
                strategy=batch.strategy,
                status=batch.status,
                created_at=batch.created_at,
                submitted_at=batch.submitted_at,
                round_index=batch.round_index,
                items=tuple(items[batch.id]),
            )
            for batch in batches
        ]

    # ------------------------------------------------------------------ rounds

    def add_round(
        self,
        project: ProjectRef,
        *,
        labels_spent: int,
        strategy: str,
        metrics: Mapping[str, Any],
        index: int | None = None,
        refit_seconds: float | None = None,
        prior_precision: float | None = None,
        note: str | None = None,
    ) -> RoundInfo:
        """Record a refit and its evaluation as the project's next round.

        Parameters
        ----------
        labels_spent
            Pool labels that trained this round's head.
        metrics
            Plain JSON data. NumPy numbers and arrays are converted, NaN and infinity rejected.
        index
            Expected index of the new round. None appends after the latest (0 for the first).
        refit_seconds
            Wall-clock seconds of the refit, None for round 0.
        prior_precision
            Prior precision λ of the head's posterior, positive.

        Raises
        ------
        StoreError
            If ``index`` is given and is not the next index.
        """
        labels_spent = check_int(labels_spent, "labels_spent")
        strategy = check_name(strategy, "strategy")
        metrics_data = json_value(dict(metrics), "metrics")
        if index is not None:
            index = check_int(index, "round index")
        refit_seconds = check_optional_float(refit_seconds, "refit_seconds", minimum=0.0)
        prior_precision = check_optional_float(
            prior_precision, "prior_precision", minimum=0.0, strict=True
        )
        if note is not None and not isinstance(note, str):
            raise InputError(f"note must be a string or None, got {type(note).__name__}")

        label = _project_label(project)
        with self._session(f"add a round to project {label}", write=True) as session:
            project_id = self._project(session, project, lock=True).id
            latest = session.scalar(
                select(func.max(Round.index)).where(Round.project_id == project_id)
            )
            next_index = 0 if latest is None else latest + 1
            if index is not None and index != next_index:
                raise StoreError(
                    f"round {index} cannot be added to project {label} because the next round "
                    f"index is {next_index}. Omit index to append."
                )
            row = Round(
                project_id=project_id,
                index=next_index,
                labels_spent=labels_spent,
                strategy=strategy,
                created_at=utc_now(),
                refit_seconds=refit_seconds,
                prior_precision=prior_precision,
                metrics=metrics_data,
                note=note,
            )
            session.add(row)
            session.flush()
            info = _round_info(row)
        logger.info(
            "added round %d to project %s: labels_spent=%d strategy=%s",
            info.index,
            label,
            labels_spent,
            strategy,
        )
        return info

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, Any]) -> RoundInfo:
        """Replace a round's metrics, after new evaluation labels changed the measurement.

        Raises
        ------
        StoreError
            If no round has this id.
        """
        round_id = check_int(round_id, "round id")
        metrics_data = json_value(dict(metrics), "metrics")
        with self._session(f"update the metrics of round {round_id}", write=True) as session:
            row = session.get(Round, round_id, with_for_update=True)
            if row is None:
                raise StoreError(
                    f"round id {round_id} does not exist; use the ids from rounds_frame"
                )
            row.metrics = metrics_data
            session.flush()
            return _round_info(row)

    def rounds_frame(self, project: ProjectRef) -> pd.DataFrame:
        """Return the rounds of a project, ordered by index.

        Returns
        -------
        pandas.DataFrame
            Columns ``id, index, labels_spent, strategy, created_at, refit_seconds,
            prior_precision, metrics, note``. ``metrics`` contains dicts, which
            ``pandas.json_normalize`` flattens.
        """
        with self._session(f"read the rounds of project {_project_label(project)}") as session:
            project_id = self._project(session, project).id
            statement = (
                select(
                    Round.id,
                    Round.index,
                    Round.labels_spent,
                    Round.strategy,
                    Round.created_at,
                    Round.refit_seconds,
                    Round.prior_precision,
                    Round.metrics,
                    Round.note,
                )
                .where(Round.project_id == project_id)
                .order_by(Round.index)
            )
            return self._read_frame(session, statement, _ROUND_DTYPES)

    def latest_round(self, project: ProjectRef) -> RoundInfo | None:
        """Return the round with the largest index, or None before round 0 is recorded."""
        with self._session(f"read the rounds of project {_project_label(project)}") as session:
            project_id = self._project(session, project).id
            row = session.scalars(
                select(Round)
                .where(Round.project_id == project_id)
                .order_by(Round.index.desc())
                .limit(1)
            ).first()
            return None if row is None else _round_info(row)

    # ------------------------------------------------------------------ summary

    def summary(self, project: ProjectRef) -> ProjectSummary:
        """Count a project's images by status and split, its labels, open batches and rounds."""
        with self._session(f"summarise project {_project_label(project)}") as session:
            project_id = self._project(session, project).id
            counts: dict[tuple[str, str], int] = {
                (status, split): count
                for status, split, count in session.execute(
                    select(Image.status, Image.split, func.count())
                    .where(Image.project_id == project_id)
                    .group_by(Image.status, Image.split)
                )
            }
            labelled = dict(
                session.execute(
                    select(Image.split, func.count(func.distinct(Label.image_id)))
                    .join(Image, Image.id == Label.image_id)
                    .where(Label.project_id == project_id)
                    .group_by(Image.split)
                ).all()
            )
            label_count = session.scalar(
                select(func.count()).select_from(Label).where(Label.project_id == project_id)
            )
            open_count = session.scalar(
                select(func.count())
                .select_from(Batch)
                .where(Batch.project_id == project_id, Batch.status == BatchStatus.OPEN.value)
            )
            round_count = session.scalar(
                select(func.count()).select_from(Round).where(Round.project_id == project_id)
            )

        ok, skipped = ImageStatus.OK.value, ImageStatus.SKIPPED.value
        pool, evaluation = Split.POOL.value, Split.EVALUATION.value
        return ProjectSummary(
            images_ok=counts.get((ok, pool), 0) + counts.get((ok, evaluation), 0),
            images_skipped=counts.get((skipped, pool), 0) + counts.get((skipped, evaluation), 0),
            pool=counts.get((ok, pool), 0),
            evaluation=counts.get((ok, evaluation), 0),
            labelled_pool=labelled.get(pool, 0),
            labelled_evaluation=labelled.get(evaluation, 0),
            labels=label_count or 0,
            open_batches=open_count or 0,
            rounds=round_count or 0,
        )


# ---------------------------------------------------------------------- helpers


class _ImageState(NamedTuple):
    status: str
    split: str
    feature_row: int | None


def _reject_skipped(states: Mapping[int, _ImageState], label: str, consequence: str) -> None:
    """Raise if any of the images was skipped at ingestion."""
    skipped = [image_id for image_id, state in states.items() if state.status != ImageStatus.OK]
    if skipped:
        raise StoreError(
            f"images {format_values(skipped)} of project {label} were skipped at ingestion "
            f"(they could not be decoded) and {consequence}"
        )


def _insert_rows(session: Session, model: type[Base], rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows with one Core executemany, bypassing the ORM's per-object bookkeeping."""
    # NOTE: psycopg runs an executemany as one pipelined INSERT per row. On a busy 2-core
    # machine 25,000 images took about 5-9 s on PostgreSQL against 1-3 s on SQLite.
    if rows:
        session.execute(insert(model.__table__), list(rows))


def _update_by_id(session: Session, model: type[Base], rows: Sequence[Mapping[str, Any]]) -> None:
    """Update rows by primary key ``id`` with one Core executemany.

    Every row must have the same keys: ``id`` and the columns to set.
    """
    if not rows:
        return
    table = model.__table__
    columns = [key for key in rows[0] if key != "id"]
    statement = (
        update(table)
        .where(table.c.id == bindparam("row_id"))
        .values({column: bindparam(f"new_{column}") for column in columns})
    )
    session.execute(
        statement,
        [{"row_id": row["id"], **{f"new_{c}": row[c] for c in columns}} for row in rows],
    )


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _project_label(project: object) -> str:
    if isinstance(project, ProjectInfo):
        return repr(project.name)
    if isinstance(project, int) and not isinstance(project, bool):
        return f"id {project}"
    return repr(project)


def _project_info(row: Project) -> ProjectInfo:
    return ProjectInfo(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        config=dict(row.config),
        model_spec=row.model_spec,
        factor_source=row.factor_source,
    )


def _round_info(row: Round) -> RoundInfo:
    return RoundInfo(
        id=row.id,
        index=row.index,
        labels_spent=row.labels_spent,
        strategy=row.strategy,
        created_at=row.created_at,
        refit_seconds=row.refit_seconds,
        prior_precision=row.prior_precision,
        metrics=dict(row.metrics),
        note=row.note,
    )

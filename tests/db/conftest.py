"""Fixtures of the store tests: every store test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import URL
from sqlalchemy.pool import NullPool

from annotator.db import ClassInfo, ProjectInfo, Store, make_engine, sqlite_url, upgrade
from annotator.db.models import Base

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """URL of an empty database: a SQLite file, then a new PostgreSQL database."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "project.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_server: Any) -> Iterator[URL]:
    """A PostgreSQL database of this test session, migrated once and dropped at the end."""
    url = postgres_server.create_database()
    try:
        upgrade(url)
        yield url
    finally:
        postgres_server.drop_database(url)


def _empty_tables(url: URL) -> None:
    """Delete every row and restart the id sequences, so that each test starts empty."""
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def migrated_sqlite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that store tests copy, so that each test skips the migration."""
    path = tmp_path_factory.mktemp("template") / "project.db"
    upgrade(sqlite_url(path))
    # upgrade() closed its connections, so SQLite has moved the write-ahead log into the file.
    assert not path.with_name("project.db-wal").exists()
    return path


@pytest.fixture(params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """URL of an empty database at the newest schema: a SQLite file, then PostgreSQL.

    The PostgreSQL database is shared by the session and emptied before each test, because
    creating and dropping a database per test costs seconds on a busy server.
    """
    if request.param == "sqlite":
        path = tmp_path / "project.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite_file"), path)
        return sqlite_url(path)
    url = request.getfixturevalue("migrated_postgres_url")
    _empty_tables(url)
    return url


@pytest.fixture
def store(migrated_url: URL) -> Iterator[Store]:
    """An empty store on each backend."""
    with Store(migrated_url) as opened:
        yield opened


@dataclass(frozen=True)
class FakeImageRecord:
    """The attributes that Store.add_images reads, as annotator.data.images.ImageRecord has."""

    path: str
    sha256: str | None
    width: int | None
    height: int | None
    status: str
    reason: str | None


def ok_record(path: str, digest: str = "0", width: int = 32, height: int = 24) -> FakeImageRecord:
    """A decodable image record with a 64-digit hash made from ``digest``."""
    return FakeImageRecord(path, digest.rjust(64, "0"), width, height, "ok", None)


def skipped_record(path: str, reason: str = "empty file (0 bytes)") -> FakeImageRecord:
    return FakeImageRecord(path, None, None, None, "skipped", reason)


@dataclass(frozen=True)
class Seeded:
    """A project with three classes, pool and evaluation images and one skipped image."""

    project: ProjectInfo
    classes: list[ClassInfo]
    pool_ids: list[int]
    evaluation_ids: list[int]
    skipped_id: int


def seed_project(store: Store, name: str = "pets", pool: int = 6, evaluation: int = 2) -> Seeded:
    """Create a project with classes and images in both splits."""
    project = store.create_project(
        name, model_spec="ViT-B-32:openai", factor_source="demo", config={"batch_size": 4}
    )
    classes = store.set_classes(project, ["cat", "dog", "fox"])
    store.add_images(project, [ok_record(f"{name}/pool/{i}.png", str(i)) for i in range(pool)])
    store.add_images(
        project,
        [ok_record(f"{name}/eval/{i}.png", f"e{i}") for i in range(evaluation)],
        split="evaluation",
    )
    store.add_images(project, [skipped_record(f"{name}/broken.png")])
    frame = store.images_frame(project)
    pool_ids = frame.loc[(frame.split == "pool") & (frame.status == "ok"), "id"].tolist()
    evaluation_ids = frame.loc[frame.split == "evaluation", "id"].tolist()
    skipped_id = int(frame.loc[frame.status == "skipped", "id"].iloc[0])
    return Seeded(project, classes, pool_ids, evaluation_ids, skipped_id)


@pytest.fixture
def seeded(store: Store) -> Seeded:
    """A store with one seeded project."""
    return seed_project(store)

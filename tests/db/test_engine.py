"""Tests of engine creation, SQLite connection settings and schema upgrades."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import URL, text
from sqlalchemy.exc import IntegrityError

from annotator.db import Store, check_schema, display_url, make_engine, sqlite_url, upgrade
from annotator.db.engine import SQLITE_BEGIN_OPTION, SQLITE_BUSY_TIMEOUT_MS, head_revision
from annotator.errors import StoreError


def _free_local_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sqlite_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = sqlite_url("folder with spaces/project.db")
    assert url.drivername == "sqlite+pysqlite"
    assert url.database == str(tmp_path / "folder with spaces" / "project.db")


def test_sqlite_pragmas_on_every_connection(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "project.db"))
    try:
        # Two connections open at once, so the second is a new DBAPI connection.
        with engine.connect() as first, engine.connect() as second:
            for connection in (first, second):
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                busy = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
                assert busy == SQLITE_BUSY_TIMEOUT_MS
    finally:
        engine.dispose()


def test_sqlite_foreign_keys_enforced(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "project.db"))
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
            connection.exec_driver_sql(
                "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER "
                "REFERENCES parent(id))"
            )
        with (
            pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"),
            engine.begin() as connection,
        ):
            connection.exec_driver_sql("INSERT INTO child (id, parent_id) VALUES (1, 99)")
    finally:
        engine.dispose()


def test_immediate_transaction_takes_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "project.db"
    engine = make_engine(sqlite_url(path))
    writer = engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
    try:
        with writer.connect() as connection, connection.begin():
            # Nothing is written yet, but an IMMEDIATE transaction already holds the lock.
            connection.execute(text("SELECT 1"))
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
        with engine.connect() as connection, connection.begin():
            connection.execute(text("SELECT 1"))
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                # A deferred (reading) transaction leaves the write lock free.
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
            finally:
                other.close()
    finally:
        engine.dispose()


def test_display_url_masks_password() -> None:
    url = "postgresql+psycopg://alice:s3cret@127.0.0.1:5432/annotator"
    displayed = display_url(url)
    assert "s3cret" not in displayed
    assert "alice" in displayed
    assert "127.0.0.1:5432/annotator" in displayed


def test_make_engine_invalid_url() -> None:
    with pytest.raises(StoreError, match="invalid database URL"):
        make_engine("not a url")


def test_make_engine_unknown_driver() -> None:
    with pytest.raises(StoreError, match="driver name"):
        make_engine("nosuchdb+nodriver://127.0.0.1/x")


def test_upgrade_creates_schema_and_is_idempotent(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "project.db")
    assert upgrade(url) == head_revision()
    assert upgrade(url) == head_revision()
    engine = make_engine(url)
    try:
        check_schema(engine)
        with engine.connect() as connection:
            tables = {
                row[0]
                for row in connection.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
    finally:
        engine.dispose()
    expected = {"projects", "classes", "images", "batches", "batch_items", "labels", "rounds"}
    assert expected <= tables
    assert "alembic_version" in tables


def test_upgrade_accepts_engine(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "project.db"))
    try:
        assert upgrade(engine) == head_revision()
        # The caller's engine stays usable.
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM projects").scalar() == 0
    finally:
        engine.dispose()


def test_database_newer_than_code(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "project.db")
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    finally:
        engine.dispose()

    with pytest.raises(StoreError, match="newer annotator") as raised:
        upgrade(url)
    assert "9999_future" in str(raised.value)
    with pytest.raises(StoreError, match="newer annotator"):
        Store(url)


def test_check_schema_on_empty_database(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "project.db")
    with pytest.raises(StoreError, match="upgrade"):
        Store(url, migrate=False)
    upgrade(url)
    with Store(url, migrate=False) as store:
        assert store.list_projects() == []


def test_unreachable_sqlite_folder(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "missing" / "project.db")
    with pytest.raises(StoreError, match="folder exists") as raised:
        upgrade(url)
    assert "missing" in str(raised.value)


def test_unreachable_postgres_hides_password() -> None:
    url = URL.create(
        "postgresql+psycopg",
        username="annotator",
        password="hunter2",
        host="127.0.0.1",
        port=_free_local_port(),
        database="nothing",
        query={"connect_timeout": "3"},
    )
    with pytest.raises(StoreError, match="cannot use the database") as raised:
        upgrade(url)
    message = str(raised.value)
    assert "hunter2" not in message
    assert "127.0.0.1" in message
    assert "server is running" in message


def test_project_dir_store_file(project_dir: Path) -> None:
    with Store.for_project_dir(project_dir) as store:
        store.create_project("p", model_spec="demo", factor_source="demo")
    assert (project_dir / "project.db").is_file()
    with Store.for_project_dir(project_dir) as store:
        assert [project.name for project in store.list_projects()] == ["p"]


def test_project_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.for_project_dir(tmp_path / "absent")

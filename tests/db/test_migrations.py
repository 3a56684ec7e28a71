"""Tests that the Alembic migrations create exactly the schema of the models."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Column, Integer, MetaData, inspect

from annotator.db import make_engine, sqlite_url, upgrade
from annotator.db.engine import alembic_config, head_revision
from annotator.db.models import Base

DB_FOLDER = Path(__file__).resolve().parents[2] / "db"
TABLES = {"projects", "classes", "images", "batches", "batch_items", "labels", "rounds"}


def _schema_differences(url: URL, metadata: MetaData) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def test_migration_matches_models(database_url: URL) -> None:
    upgrade(database_url)
    assert _schema_differences(database_url, Base.metadata) == []


def test_comparison_detects_drift(database_url: URL) -> None:
    upgrade(database_url)
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["images"].append_column(Column("extra", Integer, nullable=True))

    differences = _schema_differences(database_url, drifted)
    assert any(diff[0] == "add_column" and diff[3].name == "extra" for diff in differences)


def test_downgrade_removes_schema(database_url: URL) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert TABLES.isdisjoint(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    # And back up again.
    assert upgrade(database_url) == head_revision()


def test_offline_mode_emits_sql(tmp_path: Path) -> None:
    config = alembic_config(sqlite_url(tmp_path / "never-created.db"))
    buffer = io.StringIO()
    config.output_buffer = buffer
    command.upgrade(config, "head", sql=True)
    script = buffer.getvalue()
    for table in TABLES:
        assert f"CREATE TABLE {table}" in script
    assert not (tmp_path / "never-created.db").exists()


def test_alembic_command_with_ini(tmp_path: Path) -> None:
    database = tmp_path / "by-hand.db"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-c",
            str(DB_FOLDER / "alembic.ini"),
            "-x",
            f"url={sqlite_url(database).render_as_string(hide_password=False)}",
            "upgrade",
            "head",
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert database.is_file()
    assert _schema_differences(sqlite_url(database), Base.metadata) == []


@pytest.mark.parametrize("table", sorted(TABLES - {"projects"}))
def test_every_table_has_cascade_from_project(table: str) -> None:
    foreign_keys = Base.metadata.tables[table].foreign_keys
    targets = {key.column.table.name: key.ondelete for key in foreign_keys}
    # batch_items reach their project through their batch.
    parent = "batches" if table == "batch_items" else "projects"
    assert targets[parent] == "CASCADE"

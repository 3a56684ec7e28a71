"""Fixtures shared by all test folders: PostgreSQL test databases and project folders.

The PostgreSQL fixtures use the server at 127.0.0.1:5432 with trust authentication. Each test
gets a new database with a unique name, dropped afterwards. When the server is unreachable the
tests skip, unless ANNOTATOR_REQUIRE_POSTGRES=1 is set, as in CI, which makes them fail.
"""

from __future__ import annotations

import getpass
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_MAINTENANCE_DATABASE = "test"
REQUIRE_POSTGRES_VARIABLE = "ANNOTATOR_REQUIRE_POSTGRES"


def _postgres_unavailable(reason: str) -> None:
    """Skip the test, or fail it when the environment requires PostgreSQL."""
    if os.environ.get(REQUIRE_POSTGRES_VARIABLE) == "1":
        pytest.fail(f"{reason}; {REQUIRE_POSTGRES_VARIABLE}=1 requires the PostgreSQL tests to run")
    pytest.skip(f"{reason}; start PostgreSQL on {POSTGRES_HOST}:{POSTGRES_PORT} to run this test")


def _admin_engine(url: URL) -> Engine:
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


class PostgresServer:
    """Creates and drops uniquely named databases on the test server."""

    def __init__(self, admin_url: URL) -> None:
        self.admin_url = admin_url

    def create_database(self, template: str | None = None) -> URL:
        """Create an empty database, or a copy of ``template``, and return its URL."""
        name = f"annotator_test_{uuid.uuid4().hex[:16]}"
        statement = f'CREATE DATABASE "{name}"'
        if template is not None:
            statement += f' TEMPLATE "{template}"'
        engine = _admin_engine(self.admin_url)
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(statement)
        finally:
            engine.dispose()
        return self.admin_url.set(database=name)

    def drop_database(self, url: URL) -> None:
        """Drop the database of ``url``, ending connections that a failed test left open."""
        engine = _admin_engine(self.admin_url)
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The PostgreSQL test server, as the first role that may create databases.

    Tries the ``postgres`` role, then the current user's.
    """
    roles = list(dict.fromkeys(["postgres", getpass.getuser()]))
    problems = []
    for role in roles:
        url = URL.create(
            "postgresql+psycopg",
            username=role,
            host=POSTGRES_HOST,
            port=POSTGRES_PORT,
            database=POSTGRES_MAINTENANCE_DATABASE,
            query={"connect_timeout": "5"},
        )
        engine = _admin_engine(url)
        try:
            with engine.connect() as connection:
                may_create = connection.execute(
                    text(
                        "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
                    )
                ).scalar()
        except OperationalError as error:
            problems.append(f"role {role!r}: {str(error.orig).strip().splitlines()[0]}")
            continue
        finally:
            engine.dispose()
        if may_create:
            return PostgresServer(url)
        problems.append(f"role {role!r} may not create databases")
    _postgres_unavailable(
        f"no PostgreSQL role can create a test database on {POSTGRES_HOST}:{POSTGRES_PORT} "
        f"({'; '.join(problems)})"
    )
    raise AssertionError("unreachable: _postgres_unavailable skips or fails")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[URL]:
    """URL of a new, empty PostgreSQL database that is dropped after the test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """An empty project folder."""
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------- annotator's cache

CACHE_VARIABLE = "ANNOTATOR_CACHE_DIR"


@pytest.fixture(scope="session", autouse=True)
def annotator_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache folder for the whole session, so the demo model is trained at most once.

    The session never reads or writes the user's own cache.
    """
    previous = os.environ.get(CACHE_VARIABLE)
    path = tmp_path_factory.mktemp("annotator-cache")
    os.environ[CACHE_VARIABLE] = str(path)
    yield path
    if previous is None:
        os.environ.pop(CACHE_VARIABLE, None)
    else:
        os.environ[CACHE_VARIABLE] = previous


@pytest.fixture(scope="session")
def demo_model(annotator_cache: Path) -> Path:
    """The demo model with its posterior factors, trained and estimated once per session."""
    from annotator.services.demo import ensure_demo_model

    return ensure_demo_model(progress=False)


@pytest.fixture(scope="session")
def demo_build(demo_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo project, ingested and ranked, with its evaluation split labelled.

    Tests must not label it: they work on copies (``scratch_copy``) that share its caches.
    """
    from annotator.services.demo import build_demo_project

    directory = tmp_path_factory.mktemp("demo") / "demo-project"
    return build_demo_project(directory, progress=False)

"""Engine creation and schema migrations.

SQLite files are the default store, one per project. Every new SQLite connection gets
write-ahead logging (readers never block the writer), foreign keys (off by default in SQLite)
and a busy timeout (a writer waits for the lock instead of failing at once). A PostgreSQL URL
(``postgresql+psycopg://user@host/db``) puts the same tables on a server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from annotator.errors import StoreError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for another writer's lock before failing, in ms."""

SQLITE_BEGIN_OPTION = "annotator_sqlite_begin"
"""Execution option that selects how SQLite transactions begin: ``DEFERRED`` or ``IMMEDIATE``.

A deferred transaction that reads and then writes fails at once with "database is locked" when
another connection wrote in between, whatever the busy timeout. Write transactions therefore
begin ``IMMEDIATE``: they take the write lock first and wait for it up to the busy timeout.
"""


def sqlite_url(path: str | Path) -> URL:
    """Return the SQLAlchemy URL of a SQLite database file.

    Parameters
    ----------
    path
        Database file, made absolute. It need not exist yet.
    """
    return URL.create("sqlite+pysqlite", database=str(Path(path).expanduser().absolute()))


def display_url(url: str | URL) -> str:
    """Return ``url`` as a string with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


def _parse_url(url: str | URL) -> URL:
    try:
        return make_url(url)
    except ArgumentError as error:
        raise StoreError(
            f"invalid database URL {display_url(url)!r}: {error}. Use e.g. "
            "'sqlite:////abs/path/project.db' or 'postgresql+psycopg://user@127.0.0.1:5432/name'."
        ) from error


def _is_sqlite_file(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")


def _configure_sqlite(engine: Engine, *, file_backed: bool) -> None:
    """Install the connection listeners that every SQLite connection needs."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Stop the sqlite3 module from issuing BEGIN itself, so that the "begin" listener below
        # decides how each transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if file_backed:
                cursor.execute("PRAGMA journal_mode = WAL")
                # In WAL mode NORMAL survives application crashes and is much faster than FULL.
                # Only an OS crash or power loss can lose the last commits.
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE"):
            raise ValueError(f"{SQLITE_BEGIN_OPTION} is {mode!r}, expected DEFERRED or IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str | URL, **engine_options: Any) -> Engine:
    """Create an engine for ``url``, with WAL, foreign keys and a busy timeout for SQLite.

    Parameters
    ----------
    url
        A SQLAlchemy URL, e.g. ``sqlite_url(path)`` or
        ``postgresql+psycopg://user@127.0.0.1:5432/name``.
    **engine_options
        Passed to ``sqlalchemy.create_engine`` (``echo``, ``pool_size``, ...).

    Raises
    ------
    StoreError
        If the URL cannot be parsed or names a driver that is not installed.
    """
    parsed = _parse_url(url)
    if parsed.get_backend_name() == "postgresql":
        # Fail over a dead connection in the pool instead of raising on first use.
        engine_options.setdefault("pool_pre_ping", True)
    try:
        engine = create_engine(parsed, **engine_options)
    except (ArgumentError, ImportError) as error:
        raise StoreError(
            f"cannot create a database engine for {display_url(parsed)!r}: {error}. "
            "Check the URL's driver name (sqlite+pysqlite or postgresql+psycopg)."
        ) from error

    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine, file_backed=_is_sqlite_file(parsed))
    logger.debug("created engine for %s", display_url(parsed))
    return engine


def alembic_config(url: str | URL | None = None) -> Config:
    """Build the Alembic configuration in code, so no ``alembic.ini`` is needed at run time.

    Parameters
    ----------
    url
        Database URL for offline (SQL script) mode. Online runs pass a connection instead.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolates "%", so escape it in passwords and paths.
        rendered = make_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def head_revision() -> str:
    """Return the newest migration revision that this version of the code ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no Alembic migrations found in {MIGRATIONS_DIR}. Reinstall annotator.")
    return head


def current_revision(connection: Connection) -> str | None:
    """Return the migration revision that the database is at, or None for an empty database."""
    return MigrationContext.configure(connection).get_current_revision()


def _check_known_revision(revision: str | None, url: str) -> None:
    """Raise if the database was migrated by a newer version of the code."""
    if revision is None:
        return
    script = ScriptDirectory.from_config(alembic_config())
    known = {rev.revision for rev in script.walk_revisions()}
    if revision not in known:
        raise StoreError(
            f"the database at {url!r} is at schema revision {revision!r}, which this version of "
            f"annotator does not know (it ships up to {head_revision()!r}): the database was "
            "written by a newer annotator. Upgrade annotator, or use another database."
        )


def upgrade(url_or_engine: str | URL | Engine) -> str:
    """Migrate the database to the newest schema and return the revision it is at.

    Runs the Alembic migrations in ``migrations/`` programmatically. A database that is already
    at the newest revision is left as it is, and an empty one gets the whole schema.

    Parameters
    ----------
    url_or_engine
        A database URL or an engine from ``make_engine``.

    Raises
    ------
    StoreError
        If the database cannot be reached, was written by a newer version of annotator, or a
        migration fails. The message names the URL with its password masked.
    """
    owns_engine = not isinstance(url_or_engine, Engine)
    engine = make_engine(url_or_engine) if owns_engine else url_or_engine
    url = display_url(engine.url)
    try:
        with engine.connect() as connection:
            previous_revision = current_revision(connection)
            _check_known_revision(previous_revision, url)
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            revision = current_revision(connection)
    except SQLAlchemyError as error:
        raise StoreError(_connection_failure_message(url, error)) from error
    finally:
        if owns_engine:
            engine.dispose()
    if revision != previous_revision:
        logger.info(
            "database %s upgraded from schema revision %s to %s", url, previous_revision, revision
        )
    else:
        logger.debug("database %s is at schema revision %s", url, revision)
    return revision or ""


def check_schema(engine: Engine) -> None:
    """Raise unless the database is at the newest schema revision that this code ships.

    Raises
    ------
    StoreError
        If the database is unreachable, empty, older or newer than the code, with the fix.
    """
    url = display_url(engine.url)
    try:
        with engine.connect() as connection:
            revision = current_revision(connection)
    except SQLAlchemyError as error:
        raise StoreError(_connection_failure_message(url, error)) from error
    _check_known_revision(revision, url)
    head = head_revision()
    if revision != head:
        raise StoreError(
            f"the database at {url!r} is at schema revision {revision!r} but this code needs "
            f"{head!r}. Run annotator.db.upgrade({url!r}) or open the store with migrate=True."
        )


def _connection_failure_message(url: str, error: SQLAlchemyError) -> str:
    detail = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    return (
        f"cannot use the database at {url!r}: {detail}. Check that the server is running and "
        "the URL's host, port, user and database name are right, or for SQLite that the "
        "file's folder exists and is writable."
    )

"""Alembic environment of the annotator store.

Run programmatically by ``annotator.db.engine.upgrade``, which passes an open connection in
``config.attributes["connection"]``. Developers can also run the ``alembic`` command with
``db/alembic.ini``. The database URL then comes from ``-x url=...`` or from ``sqlalchemy.url``
in that file. Offline mode (``alembic upgrade head --sql``) prints the SQL instead of running it.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, pool

from annotator.db.engine import make_engine
from annotator.db.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None:
    # Only the alembic command has an ini file. Programmatic runs keep the caller's logging.
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError(
            "no database URL for the migrations. Pass -x url=sqlite:////abs/path/project.db "
            "or set sqlalchemy.url in alembic.ini."
        )
    return url


def _configure(**options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most constraints in place, so batch mode rebuilds the table.
        render_as_batch=True,
        compare_type=True,
        **options,
    )


def _run_with_connection(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the migration SQL for the configured URL without connecting."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on a new one to the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with_connection(connection)
        return

    engine = make_engine(_database_url(), poolclass=pool.NullPool)
    try:
        with engine.begin() as new_connection:
            _run_with_connection(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""Create and open projects: a folder with ``annotator.yaml``, a store and on-disk caches.

Layout of a project folder::

    annotator.yaml                 the project config
    project.db                     SQLite store (unless the config names a database URL)
    cache/features/<model key>/    image features, memory-mapped (one row per ingested image)
    cache/model/<model key>/       projections, class text features and posterior factors
    rankings/round-NNNN.npz        the pool's scores and predictions after each round
    exports/                       labelled sets written by ``annotator export``
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from annotator.config import CONFIG_FILENAME, ProjectConfig, load_config, write_config
from annotator.db.engine import display_url, sqlite_url
from annotator.db.records import ProjectInfo
from annotator.db.store import Store
from annotator.errors import ConfigError
from annotator.models.specs import ModelSpec, folder_safe

logger = logging.getLogger(__name__)

DATABASE_FILENAME = "project.db"


@dataclass
class Project:
    """An opened project: its folder, validated config, store and database id."""

    directory: Path
    config: ProjectConfig
    store: Store
    project_id: int

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.parse(self.config.model.spec, arch=self.config.model.arch)

    @property
    def model_key(self) -> str:
        """A folder-safe identity of the model, used to key feature and model caches."""
        return folder_safe(self.model_spec.cache_key)

    @property
    def images_dir(self) -> Path:
        return self.config.resolve_path(self.directory, self.config.images)

    @property
    def features_dir(self) -> Path:
        return self.directory / "cache" / "features" / self.model_key

    @property
    def model_cache_dir(self) -> Path:
        return self.directory / "cache" / "model" / self.model_key

    @property
    def rankings_dir(self) -> Path:
        return self.directory / "rankings"

    @property
    def exports_dir(self) -> Path:
        return self.directory / "exports"

    @property
    def oracle_path(self) -> Path | None:
        if self.config.oracle is None:
            return None
        return self.config.resolve_path(self.directory, self.config.oracle)

    def close(self) -> None:
        self.store.close()


DATABASE_URL_VARIABLE = "ANNOTATOR_DATABASE_URL"


def database_url(directory: Path, config: ProjectConfig) -> str:
    """Return the store URL: ANNOTATOR_DATABASE_URL, the configured one, or a SQLite file.

    The environment variable wins so that a password never has to be written into
    ``annotator.yaml``.
    """
    override = os.environ.get(DATABASE_URL_VARIABLE)
    if override:
        return override
    if config.database:
        return config.database
    return sqlite_url(directory / DATABASE_FILENAME)


def create_project(
    directory: Path, config: ProjectConfig, *, exist_ok: bool = False, url: str | None = None
) -> Project:
    """Create a project folder with its config and store, or open it when it already matches.

    With ``exist_ok`` an existing project of the same name is opened, and its config is
    replaced by ``config`` when only tunable settings changed. A different model or class
    list would invalidate cached features and labels, so it raises instead.
    ``url`` overrides the store URL that :func:`database_url` would choose.
    """
    directory = directory.resolve()
    config_path = directory / CONFIG_FILENAME
    if config_path.exists():
        if not exist_ok:
            raise ConfigError(
                f"{directory} already contains a project ({CONFIG_FILENAME}); open it with "
                "`annotator serve` or choose an empty folder"
            )
        existing = load_config(config_path)
        _check_compatible(existing, config, config_path)
        if existing != config:
            write_config(config, config_path)
            logger.info("updated project config %s", config_path)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_config(config, config_path)
        logger.info("created project config %s", config_path)

    store = Store(url or database_url(directory, config))
    record = _find_project(store, config.name)
    if record is None:
        record = store.create_project(
            config.name,
            config=config.model_dump(mode="json"),
            model_spec=config.model.spec,
            factor_source="pending",
        )
        prompts = config.class_prompts()
        store.set_classes(
            record.id,
            {name: list(p) for name, p in zip(config.class_names, prompts, strict=True)},
        )
        logger.info("created project %r (id %d)", config.name, record.id)
    else:
        store.update_project_config(record.id, config.model_dump(mode="json"))
    return Project(directory=directory, config=config, store=store, project_id=record.id)


def open_project(directory: Path) -> Project:
    """Open an existing project folder."""
    directory = directory.resolve()
    config = load_config(directory / CONFIG_FILENAME)
    store = Store(database_url(directory, config))
    record = _find_project(store, config.name)
    if record is None:
        store.close()
        raise ConfigError(
            f"project {config.name!r} from {directory / CONFIG_FILENAME} is not in its database "
            f"{display_url(store.url)}; create it with `annotator init` in a new folder"
        )
    return Project(directory=directory, config=config, store=store, project_id=record.id)


def _check_compatible(existing: ProjectConfig, new: ProjectConfig, path: Path) -> None:
    for field in ("name", "classes", "model", "images"):
        if getattr(existing, field) != getattr(new, field):
            raise ConfigError(
                f"{path} already defines a project with a different {field}; "
                "create the new project in another folder"
            )


def _find_project(store: Store, name: str) -> ProjectInfo | None:
    return next((p for p in store.list_projects() if p.name == name), None)

"""The store: SQLAlchemy models, engine and sessions, Alembic migrations and queries.

Services use ``Store`` and the records it returns, and no other module issues SQL.
"""

from __future__ import annotations

from annotator.db.engine import check_schema, display_url, make_engine, sqlite_url, upgrade
from annotator.db.models import (
    BatchKind,
    BatchStatus,
    ImageStatus,
    ItemPurpose,
    LabelSource,
    Split,
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
from annotator.db.store import PROJECT_DB_NAME, ProjectRef, Store

__all__ = [
    "PROJECT_DB_NAME",
    "BatchInfo",
    "BatchItemInfo",
    "BatchKind",
    "BatchStatus",
    "ClassInfo",
    "ImageRecordLike",
    "ImageStatus",
    "IngestResult",
    "ItemPurpose",
    "LabelSource",
    "NewBatchItem",
    "ProjectInfo",
    "ProjectRef",
    "ProjectSummary",
    "Prompt",
    "RoundInfo",
    "Split",
    "Store",
    "check_schema",
    "display_url",
    "make_engine",
    "sqlite_url",
    "upgrade",
]

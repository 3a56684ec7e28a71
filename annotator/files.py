"""Atomic file writes, shared by the caches, the demo builder and the project services."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(
    path: Path,
    write: Callable[[IO[bytes]], object],
    *,
    temporary_dir: Path | None = None,
    fsync: bool = True,
) -> None:
    """Write ``path`` by calling ``write`` on a temporary file, then renaming it over ``path``.

    An interrupted write leaves the old file or the new one, never part of one. The temporary
    file goes to ``temporary_dir`` (default: the folder of ``path``), which must be on the same
    file system. With ``fsync`` the data reaches the disk before the rename, so the new file
    also survives a power loss.
    """
    directory = path.parent if temporary_dir is None else temporary_dir
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON with sorted keys through :func:`write_atomic`."""
    text = json.dumps(payload, indent=2, sort_keys=True)
    write_atomic(path, lambda file: file.write(text.encode("utf-8")))

"""Export the labelled set: a CSV, JSON lines, or a folder per class."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pandas as pd

from annotator.errors import InputError
from annotator.services.project import Project

logger = logging.getLogger(__name__)


class ExportFormat(StrEnum):
    """Output formats of ``annotator export``."""

    CSV = "csv"
    """One row per labelled image: ``path,label,split,annotator,source,labelled_at,sha256``."""
    JSONL = "jsonl"
    """The same fields as CSV, one JSON object per line."""
    FOLDERS = "folders"
    """A folder per class holding copies of its images (``--link`` makes symbolic links)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    rows: int


def labelled_frame(project: Project, *, include_evaluation: bool = True) -> pd.DataFrame:
    """Return the latest label of every labelled usable image, with its path and class name."""
    images = project.store.images_frame(project.project_id, status="ok")
    labels = project.store.labels_frame(project.project_id, latest_only=True)
    frame = labels.merge(images[["id", "sha256"]], left_on="image_id", right_on="id", how="inner")
    if not include_evaluation:
        frame = frame[frame["split"] != "evaluation"]
    frame = frame.rename(columns={"created_at": "labelled_at", "class_name": "label"})
    columns = ["path", "label", "split", "annotator", "source", "labelled_at", "sha256"]
    return frame.sort_values("path")[columns].reset_index(drop=True)


def export_labels(
    project: Project,
    output: Path,
    export_format: ExportFormat | str = ExportFormat.CSV,
    *,
    include_evaluation: bool = True,
    link: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write the labelled set to ``output`` in the given format.

    The file or folder is written under a temporary name and renamed at the end, so a
    failed export never leaves a partial result behind under the requested name.
    """
    try:
        export_format = ExportFormat(export_format)
    except ValueError as error:
        valid = ", ".join(f.value for f in ExportFormat)
        raise InputError(
            f"unknown export format {export_format!r}; choose one of {valid}"
        ) from error
    if output.exists() and not overwrite:
        raise InputError(f"{output} already exists; choose another path or pass --overwrite")

    frame = labelled_frame(project, include_evaluation=include_evaluation)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.partial")
    if temporary.exists():
        _remove(temporary)

    if export_format is ExportFormat.CSV:
        frame.to_csv(temporary, index=False)
    elif export_format is ExportFormat.JSONL:
        with temporary.open("w", encoding="utf-8") as handle:
            for record in frame.to_dict(orient="records"):
                handle.write(json.dumps(record, default=str) + "\n")
    else:
        _write_class_folders(frame, temporary, link=link)

    if output.exists():
        _remove(output)
    os.replace(temporary, output)
    logger.info("exported %d labelled images to %s (%s)", len(frame), output, export_format.value)
    return ExportResult(path=output, rows=len(frame))


def _write_class_folders(frame: pd.DataFrame, root: Path, *, link: bool) -> None:
    root.mkdir(parents=True)
    for row in frame.itertuples(index=False):
        source = Path(row.path)
        folder = root / _safe_folder(row.label)
        folder.mkdir(exist_ok=True)
        # The content hash prefix keeps two images with the same file name apart.
        target = folder / f"{row.sha256[:12]}-{source.name}"
        if link:
            target.symlink_to(source.resolve())
        else:
            shutil.copy2(source, target)


def _safe_folder(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in name).strip()
    return cleaned or "unnamed"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()

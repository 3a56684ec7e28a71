"""Readers of labelled datasets and of image–caption pairs.

Two layouts hold labelled images:

- class folders: ``root/<class name>/<image>``, with images found recursively inside each
  class folder, as torchvision's ``ImageFolder`` expects.
- a CSV file with a header and the columns ``path,label``. Other columns are ignored.

Image–caption pairs, used to estimate posterior factors, come as a CSV with ``path,caption``.
Relative paths in a CSV are relative to the CSV's folder. The readers check that each file
exists but do not decode it, which ``annotator.data.images.inspect_image`` does.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from annotator.data.images import IMAGE_EXTENSIONS, discover_images, normalise_extensions
from annotator.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledDataset:
    """Images with one class each.

    Attributes
    ----------
    paths
        Image files, shape ``(N,)``.
    labels
        Class indices into ``class_names``, ``int64`` of shape ``(N,)``.
    class_names
        Class names, sorted. ``labels`` index into them.
    """

    paths: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def label_names(self) -> list[str]:
        """Return the class name of each image, in the order of ``paths``."""
        return [self.class_names[index] for index in self.labels]


@dataclass(frozen=True)
class CaptionPairs:
    """Images with a caption each. An image may appear in several pairs."""

    paths: tuple[Path, ...]
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def read_labelled_dataset(
    source: str | Path, *, extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> LabelledDataset:
    """Read a labelled dataset from class folders or from a ``path,label`` CSV.

    Parameters
    ----------
    source
        A folder with one subfolder per class, or a ``.csv`` file.
    extensions
        Image extensions to look for in class folders, ignored for a CSV.

    Returns
    -------
    LabelledDataset
        Images in sorted order for class folders and in row order for a CSV. Classes are
        sorted by name in both cases.

    Raises
    ------
    InputError
        If ``source`` is neither a folder nor a CSV file, a folder has no class folders or an
        image outside them, or a CSV row has a missing file, an empty label or a repeated path.
        The message names the row or file and the value.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        dataset = _read_class_folders(source, normalise_extensions(extensions))
    elif source.is_file() and source.suffix.lower() == ".csv":
        dataset = _read_label_csv(source)
    elif source.exists():
        raise InputError(
            f"labelled dataset {os.fspath(source)!r} is neither a folder of class folders nor a "
            ".csv file with columns path,label"
        )
    else:
        raise InputError(f"labelled dataset {os.fspath(source)!r} does not exist. Check the path.")
    logger.info(
        "read %d labelled images in %d classes from %s",
        len(dataset),
        len(dataset.class_names),
        source,
    )
    return dataset


def _read_class_folders(root: Path, extensions: frozenset[str]) -> LabelledDataset:
    class_dirs = sorted(
        entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not class_dirs:
        raise InputError(
            f"{os.fspath(root)!r} has no class folders. Put each class's images in "
            f"{os.fspath(root / '<class name>')}."
        )
    stray = [
        entry.name
        for entry in root.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in extensions
    ]
    if stray:
        raise InputError(
            f"images {sorted(stray)[:5]} lie directly in {os.fspath(root)!r}, outside any class "
            f"folder. Move each into {os.fspath(root / '<class name>')}."
        )

    paths: list[Path] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        images = discover_images(class_dir, extensions)
        if not images:
            logger.warning("class folder %s has no images, but the class is kept", class_dir)
        paths.extend(images)
        labels.extend([index] * len(images))
    if not paths:
        raise InputError(
            f"no images with extensions {sorted(extensions)} in the class folders of "
            f"{os.fspath(root)!r}"
        )
    return LabelledDataset(
        paths=tuple(paths),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=tuple(class_dir.name for class_dir in class_dirs),
    )


def _read_csv_column(csv_path: Path, column: str) -> list[tuple[int, Path, str]]:
    """Read the ``path`` and ``column`` columns of a CSV as ``(line, path, value)`` triples.

    ``line`` is the 1-based line number in the file (the header is line 1). Paths are resolved
    against the CSV's folder and must be existing files. Values must not be blank.
    """
    rows: list[tuple[int, Path, str]] = []
    # utf-8-sig drops the byte-order mark that spreadsheet programs write.
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in ("path", column) if name not in header]
        if missing:
            raise InputError(
                f"{os.fspath(csv_path)!r} lacks the columns {missing} because its header is "
                f"{header}. The first line must name the columns, e.g. 'path,{column}'."
            )
        reader.fieldnames = header

        for record in reader:
            line = reader.line_num
            raw_path = (record.get("path") or "").strip()
            value = (record.get(column) or "").strip()
            if not raw_path:
                raise InputError(f"{os.fspath(csv_path)!r} line {line}: empty path")
            if not value:
                raise InputError(
                    f"{os.fspath(csv_path)!r} line {line}: empty {column} for {raw_path!r}"
                )
            path = Path(raw_path).expanduser()
            if not path.is_absolute():
                path = csv_path.parent / path
            if not path.is_file():
                raise InputError(
                    f"{os.fspath(csv_path)!r} line {line}: image file {raw_path!r} not found "
                    f"at {os.fspath(path)}. Relative paths start at the CSV's folder."
                )
            rows.append((line, path, value))
    if not rows:
        raise InputError(f"{os.fspath(csv_path)!r} has a header but no rows")
    return rows


def _read_label_csv(csv_path: Path) -> LabelledDataset:
    rows = _read_csv_column(csv_path, "label")

    first_line: dict[Path, int] = {}
    for line, path, _ in rows:
        key = Path(os.path.normpath(path))
        if key in first_line:
            raise InputError(
                f"{os.fspath(csv_path)!r} line {line}: image {os.fspath(path)!r} is already "
                f"labelled on line {first_line[key]}. Give each image one row."
            )
        first_line[key] = line

    class_names = tuple(sorted({label for _, _, label in rows}))
    index_of = {name: index for index, name in enumerate(class_names)}
    return LabelledDataset(
        paths=tuple(path for _, path, _ in rows),
        labels=np.asarray([index_of[label] for _, _, label in rows], dtype=np.int64),
        class_names=class_names,
    )


def read_caption_pairs(csv_path: str | Path) -> CaptionPairs:
    """Read image–caption pairs from a CSV with the columns ``path,caption``.

    Raises
    ------
    InputError
        If the file is missing, lacks a column, or a row has a missing image or an empty
        caption. The message names the line and the value.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise InputError(f"caption file {os.fspath(csv_path)!r} does not exist. Check the path.")
    rows = _read_csv_column(csv_path, "caption")
    logger.info("read %d image-caption pairs from %s", len(rows), csv_path)
    return CaptionPairs(
        paths=tuple(path for _, path, _ in rows),
        captions=tuple(caption for _, _, caption in rows),
    )

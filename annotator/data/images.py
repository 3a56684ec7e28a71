"""Image files: discovery, validation by full decoding, content hashing and loading.

A file that cannot be decoded is never an error here: ``inspect_image`` records it with status
``skipped`` and a reason a person understands, so one bad file never stops an ingestion.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from annotator.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
"""File extensions that ``discover_images`` looks for by default, compared case-insensitively."""

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"

HASH_CHUNK_BYTES = 1 << 20
"""Bytes read at a time while hashing, so large files never sit in memory whole."""

# Pillow's decoders raise these for corrupt input, depending on the format plugin.
# DecompressionBombError derives from Exception directly, so it is listed on its own.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)

ImageStatusValue = Literal["ok", "skipped"]


@dataclass(frozen=True)
class ImageRecord:
    """Result of ``inspect_image`` for one file.

    ``width`` and ``height`` are in pixels after the EXIF orientation is applied and are None
    for skipped images. ``sha256`` is the hex digest of the file's bytes, None only when the
    file could not be read.
    """

    path: Path
    sha256: str | None
    width: int | None
    height: int | None
    status: ImageStatusValue
    reason: str | None

    @property
    def ok(self) -> bool:
        """Whether the image decoded fully."""
        return self.status == STATUS_OK


def normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    """Return extensions in lower case with a leading dot, e.g. ``{".jpg", ".png"}``."""
    if isinstance(extensions, str):
        raise InputError(
            f"extensions must be a collection of extensions, got the string {extensions!r}. "
            f"Write [{extensions!r}]."
        )
    normalised = set()
    for extension in extensions:
        stripped = extension.strip().lower()
        if not stripped or stripped == ".":
            raise InputError(f"invalid image extension {extension!r}, expected e.g. '.png'")
        normalised.add(stripped if stripped.startswith(".") else f".{stripped}")
    if not normalised:
        raise InputError("extensions is empty. Give at least one, e.g. ['.jpg', '.png'].")
    return frozenset(normalised)


def discover_images(root: str | Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Find image files under ``root``, recursively, in sorted order.

    Files and folders whose names start with a dot are skipped. Symbolic links are followed,
    but a folder reached twice (a link loop, or two links to one folder) is walked only once.
    A broken link with an image extension is listed, so that ``inspect_image`` reports it.

    Parameters
    ----------
    root
        Folder to search.
    extensions
        Extensions to match, case-insensitively, with or without the leading dot.

    Returns
    -------
    list[pathlib.Path]
        Paths below ``root`` (``root / relative``, links not resolved), sorted by their
        relative path.

    Raises
    ------
    InputError
        If ``root`` is not an existing folder or ``extensions`` is empty.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise InputError(f"image folder {os.fspath(root)!r} does not exist. Check the path.")
    if not root.is_dir():
        raise InputError(f"{os.fspath(root)!r} is a file, not a folder. Give the folder above it.")
    accepted = normalise_extensions(extensions)

    found: list[Path] = []
    visited: set[tuple[int, int]] = set()

    def _log_walk_error(error: OSError) -> None:
        logger.warning("cannot list %s, so its images are left out: %s", error.filename, error)

    for folder, dirnames, filenames in os.walk(root, followlinks=True, onerror=_log_walk_error):
        stat = os.stat(folder)
        key = (stat.st_dev, stat.st_ino)
        if key in visited:
            logger.warning(
                "skipping %s: this folder was already walked (symbolic link loop)", folder
            )
            dirnames.clear()
            continue
        visited.add(key)

        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in accepted:
                found.append(Path(folder, name))

    found.sort(key=lambda path: path.relative_to(root).as_posix())
    logger.debug("found %d images under %s", len(found), root)
    return found


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes, read in chunks of ``HASH_CHUNK_BYTES``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _skipped(path: Path, reason: str, sha256: str | None = None) -> ImageRecord:
    logger.info("skipping image %s: %s", path, reason)
    return ImageRecord(path, sha256, None, None, STATUS_SKIPPED, reason)


def _bomb_reason(width: int, height: int) -> str | None:
    """Return why an image is too large to decode safely, or None if it is within the limit.

    Pillow itself only warns between its limit and twice the limit, and raises above that.
    This check skips every image above the limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        return (
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limit} pixels that guards against decompression bombs (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    return None


def _decode_rgb(path: Path) -> Image.Image:
    """Decode the whole file, apply its EXIF orientation and convert to RGB.

    Raises the underlying Pillow or OS error, which ``inspect_image`` and ``load_rgb`` translate.
    """
    with Image.open(path) as image:
        reason = _bomb_reason(*image.size)
        if reason is not None:
            raise Image.DecompressionBombError(reason)
        # load() decodes every pixel, so truncated and corrupt data fail here, not later.
        image.load()
        oriented = ImageOps.exif_transpose(image)
        return oriented.convert("RGB")


def _describe_decode_error(error: Exception, path: Path) -> str:
    """Return a reason a person understands for a failure of ``_decode_rgb``."""
    if isinstance(error, Image.DecompressionBombError):
        text = str(error)
        return text if text.startswith("image too large") else f"image too large: {text}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image: cannot identify image file format"
    if isinstance(error, PermissionError):
        return "cannot read file: permission denied"
    if isinstance(error, IsADirectoryError):
        return "not a file: it is a folder"
    if isinstance(error, FileNotFoundError):
        return "file not found (a broken symbolic link, or removed during ingestion)"
    message = str(error).replace(str(path), "").strip() or type(error).__name__
    if isinstance(error, ValueError) and "conversion from" in message:
        return f"unsupported image mode: {message}"
    if "truncated" in message:
        return f"corrupt or truncated image: {message}"
    return f"cannot decode image: {message}"


def inspect_image(path: str | Path) -> ImageRecord:
    """Hash and fully decode one image file, and report whether it can be used.

    The file is decoded with Pillow to the last pixel (``Image.open`` then ``load``, not
    ``verify``), its EXIF orientation is applied and it is converted to RGB, exactly as
    ``load_rgb`` does. A file that fails any step gets status ``skipped`` and a reason:

    - ``"empty file (0 bytes)"``
    - ``"not an image: cannot identify image file format"`` (e.g. a text file named ``.png``)
    - ``"corrupt or truncated image: ..."``
    - ``"unsupported image mode: ..."`` (cannot be converted to RGB)
    - ``"image too large: ..."`` (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``)
    - ``"file not found ..."``, ``"cannot read file: permission denied"``

    Parameters
    ----------
    path
        The image file.

    Returns
    -------
    ImageRecord
        ``width`` and ``height`` after EXIF orientation, and ``sha256`` of the file's bytes, also
        for skipped files that could be read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        sha256 = sha256_file(path)
    except OSError as error:
        return _skipped(path, _describe_decode_error(error, path))
    if size == 0:
        return _skipped(path, "empty file (0 bytes)", sha256)

    try:
        image = _decode_rgb(path)
    except _DECODE_ERRORS as error:
        return _skipped(path, _describe_decode_error(error, path), sha256)
    return ImageRecord(path, sha256, image.width, image.height, STATUS_OK, None)


def inspect_images(
    paths: Sequence[str | Path],
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[ImageRecord]:
    """Inspect many images, in the order given, optionally on several threads.

    Threads run in parallel here because Pillow's decoders and ``hashlib`` release the GIL on
    large inputs.

    Parameters
    ----------
    paths
        Image files, e.g. from ``discover_images``.
    workers
        Number of threads. With 1, images are inspected in the calling thread.
    progress
        Called as ``progress(done, total)`` after each image, in the calling thread.

    Returns
    -------
    list[ImageRecord]
        One record per path, in the order of ``paths``.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    total = len(paths)
    records: list[ImageRecord] = []
    if workers == 1 or total <= 1:
        results: Iterable[ImageRecord] = map(inspect_image, paths)
        for record in results:
            records.append(record)
            if progress is not None:
                progress(len(records), total)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inspect") as pool:
            # map() yields in input order but submits ahead, so a slow file does not stall others.
            for record in pool.map(inspect_image, paths):
                records.append(record)
                if progress is not None:
                    progress(len(records), total)

    skipped = sum(not record.ok for record in records)
    logger.info("inspected %d images: %d ok, %d skipped", total, total - skipped, skipped)
    return records


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image, apply its EXIF orientation and return it in RGB mode.

    Raises
    ------
    InputError
        If the file cannot be read or decoded. The message names the file and the reason.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > 0:
            return _decode_rgb(path)
    except _DECODE_ERRORS as error:
        raise InputError(
            f"cannot load image {os.fspath(path)!r}: {_describe_decode_error(error, path)}. "
            "Ingest the folder again so that it is marked skipped."
        ) from error
    raise InputError(
        f"cannot load image {os.fspath(path)!r}: empty file (0 bytes). Ingest the folder again "
        "so that it is marked skipped."
    )

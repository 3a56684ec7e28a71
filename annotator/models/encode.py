"""Batched, resumable image feature extraction into a :class:`FeatureCache`.

A torch ``DataLoader`` decodes and preprocesses images in worker processes while the main
process runs the forward pass, so decoding overlaps with the model. Each batch is written to
the cache and marked done before the next one, so an interrupted run loses at most the
batches in flight, and a rerun encodes only the rows that are not done. A file that cannot be
decoded is reported with its reason and does not stop the run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from annotator.data.features import FeatureCache
from annotator.errors import ConfigError, InputError
from annotator.models.towers import VisionLanguageModel

logger = logging.getLogger(__name__)

MAX_LOGGED_FAILURES = 20
"""Decoding failures logged one by one per run; the rest are counted in one summary line."""

# Errors Pillow raises for unreadable, truncated or malformed files.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)


class EncodeFailure(NamedTuple):
    """An image that could not be decoded: its path and the reason."""

    path: Path
    reason: str


@dataclass
class EncodeStats:
    """Outcome of one :func:`encode_images` call.

    ``failed`` and ``failed_rows`` are aligned: ``failed[i]`` is the file of cache row
    ``failed_rows[i]``. Failed rows stay missing in the cache, so a rerun retries them.
    """

    requested: int = 0
    """Rows passed in."""
    already_done: int = 0
    """Rows that were done before this call and were skipped."""
    encoded: int = 0
    """Rows encoded and marked done by this call."""
    failed: list[EncodeFailure] = field(default_factory=list)
    failed_rows: list[int] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of the call."""

    @property
    def images_per_second(self) -> float:
        """Encoded rows per second of wall time."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully, apply its EXIF orientation and convert it to RGB.

    Raises
    ------
    OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError
        When Pillow cannot decode the file.
    """
    with Image.open(path) as image:
        image.load()  # decode now, so that a truncated file fails here
        upright = ImageOps.exif_transpose(image)
        return upright.convert("RGB")


class _ImageFiles(Dataset):
    """Preprocessed images by position; a failure yields its reason instead of pixels."""

    def __init__(
        self,
        paths: Sequence[Path],
        positions: np.ndarray,
        preprocess: Callable[[Image.Image], torch.Tensor],
    ):
        self.paths = paths
        self.positions = positions
        self.preprocess = preprocess

    def __len__(self) -> int:
        return int(self.positions.size)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        position = int(self.positions[index])
        try:
            pixels = self.preprocess(load_rgb(self.paths[position]))
        except _DECODE_ERRORS as error:
            return position, None, f"{type(error).__name__}: {error}"
        return position, pixels, None


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the decoded images; return positions, pixels ``(b, 3, H, W)`` and failures."""
    good = [(position, pixels) for position, pixels, _ in items if pixels is not None]
    failures = [
        (position, reason) for position, pixels, reason in items if pixels is None and reason
    ]
    positions = torch.tensor([position for position, _ in good], dtype=torch.int64)
    pixels = torch.stack([pixels for _, pixels in good]) if good else None
    return positions, pixels, failures


def default_num_workers(device: torch.device) -> int:
    """Choose the number of decoding workers for a model on ``device``.

    On the CPU the forward pass needs cores too, so decoding gets half of the usable CPUs, at
    most 8. Beside a GPU decoding is usually the bottleneck, so it gets all of them, at most 16.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS and Windows
        cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(16, cpus))
    return max(1, min(8, cpus // 2))


def _check_inputs(
    model: VisionLanguageModel,
    paths: Sequence[str | Path],
    cache: FeatureCache,
    rows: npt.ArrayLike | None,
) -> np.ndarray:
    if cache.feature_dim != model.image_dim:
        raise ConfigError(
            f"the feature cache {cache.directory} stores {cache.feature_dim}-wide features but "
            f"{model.name} makes {model.image_dim}-wide ones; use this model's cache folder"
        )
    expected_offsets = model.embed_dim if model.has_image_offset else None
    if cache.offset_dim != expected_offsets:
        raise ConfigError(
            f"the feature cache {cache.directory} has offset width {cache.offset_dim} but "
            f"{model.name} needs {expected_offsets}; use this model's cache folder"
        )
    if model.cache_key is not None and cache.key != model.cache_key:
        raise ConfigError(
            f"the feature cache {cache.directory} belongs to {cache.key!r}, not to {model.name} "
            f"({model.cache_key!r}); use this model's cache folder"
        )
    if rows is None:
        index = np.arange(len(paths), dtype=np.int64)
    else:
        index = np.asarray(rows)
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise InputError(
                f"rows must be a 1-D integer array, got shape {index.shape} of {index.dtype}"
            )
        index = index.astype(np.int64)
    if index.size != len(paths):
        raise InputError(f"got {len(paths)} paths but {index.size} rows; pass one row per path")
    if index.size and (index.min() < 0 or index.max() >= cache.num_rows):
        raise InputError(
            f"rows must lie in [0, {cache.num_rows}) for this cache, got {index.min()}..{index.max()}; "
            "grow the cache first"
        )
    if np.unique(index).size != index.size:
        raise InputError("rows contain duplicates; each path needs its own cache row")
    return index


def encode_images(
    model: VisionLanguageModel,
    paths: Sequence[str | Path],
    cache: FeatureCache,
    *,
    rows: npt.ArrayLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> EncodeStats:
    """Encode the images whose cache rows are not done, and mark each finished batch done.

    Parameters
    ----------
    model
        The wrapped model; its ``preprocess`` runs in the worker processes.
    paths
        Image files; ``paths[i]`` goes to cache row ``rows[i]``.
    cache
        Open, writable feature cache of this model.
    rows
        Cache row of each path; ``range(len(paths))`` when None.
    batch_size
        Images per forward pass.
    num_workers
        Decoding worker processes; 0 decodes in this process. None picks
        :func:`default_num_workers`.
    progress
        Show a tqdm progress bar on stderr.
    on_batch
        Called after each batch is marked done with (rows finished so far, rows pending at the
        start), e.g. to drive a progress widget.

    Returns
    -------
    EncodeStats
        Counts, the failures with their reasons, and the wall time.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise InputError(f"num_workers must be 0 or more, got {num_workers}")
    file_paths = [Path(path) for path in paths]
    index = _check_inputs(model, file_paths, cache, rows)
    stats = EncodeStats(requested=int(index.size))

    # 1. Skip rows that are already done.
    done = cache.done
    pending = np.flatnonzero(~done[index]) if index.size else np.zeros(0, dtype=np.int64)
    stats.already_done = int(index.size - pending.size)
    if pending.size == 0:
        stats.seconds = time.perf_counter() - started
        logger.info("all %d requested rows are already encoded", stats.requested)
        return stats

    # 2. Decode in workers, encode here, and commit batch by batch.
    workers = default_num_workers(model.device) if num_workers is None else num_workers
    loader = DataLoader(
        _ImageFiles(file_paths, pending, model.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    logger.info(
        "encoding %d images with %s (batch %d, %d workers); %d already done",
        pending.size,
        model.name,
        batch_size,
        workers,
        stats.already_done,
    )
    finished = 0
    with tqdm(
        total=int(pending.size), unit="img", desc="encoding images", disable=not progress
    ) as bar:
        for positions, pixels, failures in loader:
            for position, reason in failures:
                _record_failure(stats, file_paths[position], int(index[position]), reason)
            if pixels is not None:
                result = model.image_features(pixels)
                batch_rows = index[positions.numpy()]
                offsets = None if result.offsets is None else result.offsets.cpu().numpy()
                cache.write(batch_rows, result.features.cpu().numpy(), offsets)
                cache.mark_done(batch_rows)
                stats.encoded += int(batch_rows.size)
            handled = len(failures) + (0 if pixels is None else int(pixels.shape[0]))
            finished += handled
            bar.update(handled)
            if on_batch is not None:
                on_batch(finished, int(pending.size))
    cache.flush()

    if len(stats.failed) > MAX_LOGGED_FAILURES:
        logger.warning(
            "%d more images failed to decode; EncodeStats.failed lists them all",
            len(stats.failed) - MAX_LOGGED_FAILURES,
        )
    stats.seconds = time.perf_counter() - started
    logger.info(
        "encoded %d images in %.1f s (%.1f img/s); %d failed, %d were already done",
        stats.encoded,
        stats.seconds,
        stats.images_per_second,
        len(stats.failed),
        stats.already_done,
    )
    return stats


def _record_failure(stats: EncodeStats, path: Path, row: int, reason: str) -> None:
    stats.failed.append(EncodeFailure(path=path, reason=reason))
    stats.failed_rows.append(row)
    if len(stats.failed) <= MAX_LOGGED_FAILURES:
        logger.warning("cannot decode %s (cache row %d): %s", path, row, reason)

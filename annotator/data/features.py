"""On-disk caches of model features, so an image is decoded and encoded once per model.

:class:`FeatureCache` keeps one folder per model (callers name it after
``ModelSpec.cache_key``) with raw little-endian ``float32`` arrays that are memory-mapped:

- ``features.f32``: image features, ``(N, p)``;
- ``offsets.f32``: per-image offsets, ``(N, D)``, only for models that have them (SigLIP);
- ``done.u8``: completion mask, one byte per row, 1 when the row's features are final;
- ``cache.json``: model key, shapes, dtype and the number of finished rows.

Rows become done only after their features and offsets reach the disk (``msync``), so a
crash or a SIGKILL mid-write leaves unwritten rows missing, and encoding resumes with them.
Growing the cache extends the files in place with zero rows that are not done.

:class:`TextFeatureCache` stores small ``(C, q)`` class text feature arrays keyed by the
model and the prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from annotator.errors import ConfigError, InputError, NumericalError, StoreError
from annotator.files import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_NAME = "annotator-feature-cache"
FORMAT_VERSION = 1
METADATA_FILENAME = "cache.json"
FEATURES_FILENAME = "features.f32"
OFFSETS_FILENAME = "offsets.f32"
DONE_FILENAME = "done.u8"

_FLOAT = np.dtype("<f4")
_MASK = np.dtype("u1")


def _as_rows(rows: npt.ArrayLike, num_rows: int) -> np.ndarray:
    """Validate row indices: a 1-D array of distinct integers in ``[0, num_rows)``."""
    array = np.asarray(rows)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise InputError(
            f"rows must be a 1-D array of integers, got shape {array.shape} of {array.dtype}"
        )
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= num_rows):
        bad = array[(array < 0) | (array >= num_rows)]
        raise InputError(
            f"rows {bad[:5].tolist()} are outside the cache's {num_rows} rows; grow the cache first"
        )
    if np.unique(array).size != array.size:
        raise InputError("rows contain duplicates; each row can be written once per call")
    return array


class FeatureCache:
    """Memory-mapped image features of one model, with a completion mask.

    Create one with :meth:`create` and reopen it with :meth:`open`; the constructor is
    private. Use it as a context manager, or call :meth:`close`, to write the metadata.

    Attributes
    ----------
    directory : Path
        The cache folder.
    key : str
        Identity of the model whose features these are (``ModelSpec.cache_key``).
    feature_dim : int
        Width ``p`` of the features.
    offset_dim : int or None
        Width ``D`` of the offsets, or None for models without offsets.
    """

    def __init__(self, directory: Path, metadata: dict[str, Any], *, writable: bool) -> None:
        self.directory = directory
        self.key: str = metadata["key"]
        self.feature_dim: int = int(metadata["feature_dim"])
        self.offset_dim: int | None = (
            None if metadata["offset_dim"] is None else int(metadata["offset_dim"])
        )
        self.writable = writable
        self._num_rows = int(metadata["num_rows"])
        self._closed = False
        self._map_files()
        # Rows written through this handle; only these may be marked done.
        self._written = np.zeros(self._num_rows, dtype=bool)

    # 1. Creating and opening

    @staticmethod
    def exists(directory: str | Path) -> bool:
        """Return whether ``directory`` contains a feature cache (its metadata file)."""
        return (Path(directory) / METADATA_FILENAME).is_file()

    @classmethod
    def create(
        cls,
        directory: str | Path,
        *,
        key: str,
        num_rows: int,
        feature_dim: int,
        offset_dim: int | None = None,
        overwrite: bool = False,
    ) -> FeatureCache:
        """Create an empty cache of ``num_rows`` rows, none done.

        Raises
        ------
        InputError
            For non-positive widths or a negative row count.
        ConfigError
            If a cache exists in ``directory`` and ``overwrite`` is False.
        """
        directory = Path(directory)
        if not key:
            raise InputError("a feature cache needs a non-empty model key")
        if feature_dim <= 0 or (offset_dim is not None and offset_dim <= 0) or num_rows < 0:
            raise InputError(
                f"invalid feature cache shape: num_rows={num_rows}, feature_dim={feature_dim}, "
                f"offset_dim={offset_dim}; widths must be positive and rows non-negative"
            )
        if cls.exists(directory) and not overwrite:
            raise ConfigError(
                f"a feature cache already exists in {directory}; open it with FeatureCache.open "
                "or pass overwrite=True to replace it"
            )
        directory.mkdir(parents=True, exist_ok=True)
        files = [
            (FEATURES_FILENAME, feature_dim * _FLOAT.itemsize),
            (DONE_FILENAME, _MASK.itemsize),
        ]
        if offset_dim is not None:
            files.append((OFFSETS_FILENAME, offset_dim * _FLOAT.itemsize))
        else:
            (directory / OFFSETS_FILENAME).unlink(missing_ok=True)
        for name, row_bytes in files:
            with open(directory / name, "wb") as handle:
                handle.truncate(num_rows * row_bytes)
        metadata = cls._metadata(key, num_rows, feature_dim, offset_dim, num_done=0)
        write_json_atomic(directory / METADATA_FILENAME, metadata)
        logger.info(
            "created feature cache %s: key=%s rows=%d p=%d offsets=%s",
            directory,
            key,
            num_rows,
            feature_dim,
            offset_dim,
        )
        return cls(directory, metadata, writable=True)

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        key: str | None = None,
        feature_dim: int | None = None,
        offset_dim: int | None = None,
        writable: bool = True,
    ) -> FeatureCache:
        """Open an existing cache, checking it against the expected model when given.

        Parameters
        ----------
        key, feature_dim, offset_dim
            Expected model key and widths; each is checked when not None.
        writable
            Map the files read-write (the default) or read-only.

        Raises
        ------
        ConfigError
            If the cache is missing or belongs to another model or shape.
        StoreError
            If its files are missing, truncated or of an unknown format.
        """
        directory = Path(directory)
        path = directory / METADATA_FILENAME
        if not path.is_file():
            raise ConfigError(
                f"no feature cache in {directory} ({METADATA_FILENAME} not found); "
                "create it with FeatureCache.create or run ingestion"
            )
        try:
            metadata = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise StoreError(
                f"cannot read {path}: {error}; delete {directory} and encode again"
            ) from error
        if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} is not an annotator feature cache of version {FORMAT_VERSION} "
                f"(format={metadata.get('format')!r}, version={metadata.get('version')!r}); "
                f"delete {directory} and encode again"
            )
        if metadata.get("dtype") != "float32":
            raise StoreError(f"{path} stores {metadata.get('dtype')!r}; only float32 is supported")

        expected = {"key": key, "feature_dim": feature_dim, "offset_dim": offset_dim}
        for name, value in expected.items():
            if value is not None and metadata.get(name) != value:
                raise ConfigError(
                    f"the feature cache in {directory} has {name}={metadata.get(name)!r}, but "
                    f"{value!r} was expected: it holds another model's features. Use the folder "
                    "of this model's cache key, or delete the folder to encode again"
                )
        cache = cls(directory, metadata, writable=writable)
        logger.debug(
            "opened feature cache %s: %d of %d rows done", directory, cache.num_done, cache.num_rows
        )
        return cache

    @staticmethod
    def _metadata(
        key: str, num_rows: int, feature_dim: int, offset_dim: int | None, *, num_done: int
    ) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "key": key,
            "num_rows": num_rows,
            "feature_dim": feature_dim,
            "offset_dim": offset_dim,
            "dtype": "float32",
            "num_done": num_done,
        }

    def _file_sizes(self) -> dict[str, int]:
        sizes = {
            FEATURES_FILENAME: self._num_rows * self.feature_dim * _FLOAT.itemsize,
            DONE_FILENAME: self._num_rows * _MASK.itemsize,
        }
        if self.offset_dim is not None:
            sizes[OFFSETS_FILENAME] = self._num_rows * self.offset_dim * _FLOAT.itemsize
        return sizes

    def _map_files(self) -> None:
        """Check the file sizes against the metadata and memory-map the arrays."""
        for name, expected in self._file_sizes().items():
            path = self.directory / name
            if not path.is_file():
                raise StoreError(
                    f"feature cache file {path} is missing; delete {self.directory} and encode again"
                )
            size = path.stat().st_size
            if size < expected:
                raise StoreError(
                    f"feature cache file {path} has {size} bytes but {expected} were expected; "
                    f"it is truncated. Delete {self.directory} and encode again"
                )
            if size > expected:
                # A grow that extended the files but crashed before writing the metadata.
                if not self.writable:
                    raise StoreError(
                        f"feature cache file {path} has {size} bytes, more than the {expected} in "
                        "its metadata; open the cache writable once to repair it"
                    )
                logger.warning(
                    "truncating %s from %d to %d bytes after an interrupted grow",
                    path,
                    size,
                    expected,
                )
                os.truncate(path, expected)

        mode = "r+" if self.writable else "r"
        self._features = self._map(
            FEATURES_FILENAME, _FLOAT, (self._num_rows, self.feature_dim), mode
        )
        self._offsets = (
            None
            if self.offset_dim is None
            else self._map(OFFSETS_FILENAME, _FLOAT, (self._num_rows, self.offset_dim), mode)
        )
        self._done = self._map(DONE_FILENAME, _MASK, (self._num_rows,), mode)

    def _map(self, name: str, dtype: np.dtype, shape: tuple[int, ...], mode: str) -> np.ndarray:
        if self._num_rows == 0:
            # mmap cannot map an empty file.
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.directory / name, dtype=dtype, mode=mode, shape=shape)

    # 2. Reading

    @property
    def num_rows(self) -> int:
        """Number of rows ``N``, done or not."""
        return self._num_rows

    @property
    def features(self) -> np.ndarray:
        """The features, ``(N, p)`` float32, memory-mapped. Rows not done hold zeros or stale values."""
        return self._features

    @property
    def offsets(self) -> np.ndarray | None:
        """The offsets, ``(N, D)`` float32, memory-mapped, or None for models without offsets."""
        return self._offsets

    @property
    def done(self) -> np.ndarray:
        """A copy of the completion mask, ``(N,)`` bool."""
        return np.asarray(self._done, dtype=bool).copy()

    @property
    def num_done(self) -> int:
        """Number of rows whose features are final."""
        return int(np.count_nonzero(self._done))

    def missing_rows(self) -> np.ndarray:
        """Return the rows that are not done, ascending, as int64."""
        return np.flatnonzero(np.asarray(self._done) == 0).astype(np.int64)

    def read(self, rows: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray | None]:
        """Copy the features ``(n, p)`` and offsets ``(n, D)`` of done rows.

        Raises
        ------
        InputError
            If a row is out of range or not done.
        """
        index = np.asarray(rows, dtype=np.int64)
        _as_rows(np.unique(index), self._num_rows)
        pending = index[np.asarray(self._done[index]) == 0]
        if pending.size:
            raise InputError(
                f"rows {pending[:5].tolist()} have no features yet ({pending.size} in all); encode them first"
            )
        features = np.array(self._features[index], dtype=np.float32)
        offsets = (
            None if self._offsets is None else np.array(self._offsets[index], dtype=np.float32)
        )
        return features, offsets

    # 3. Writing

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError(f"the feature cache {self.directory} is closed")
        if not self.writable:
            raise StoreError(f"the feature cache {self.directory} was opened read-only")

    def write(
        self, rows: npt.ArrayLike, features: npt.ArrayLike, offsets: npt.ArrayLike | None = None
    ) -> None:
        """Write the features ``(n, p)`` and offsets ``(n, D)`` of ``rows``, which are then not done.

        Call :meth:`mark_done` after writing. Rewriting a done row clears its mark.

        Raises
        ------
        InputError
            For rows out of range or duplicated, or arrays of the wrong shape, or offsets given
            to a cache without them (or missing for one with them).
        NumericalError
            If a value is not finite.
        """
        self._check_writable()
        index = _as_rows(rows, self._num_rows)
        values = np.asarray(features, dtype=np.float32)
        if values.shape != (index.size, self.feature_dim):
            raise InputError(
                f"features must have shape ({index.size}, {self.feature_dim}) for {index.size} rows, "
                f"got {values.shape}"
            )
        if (offsets is None) != (self.offset_dim is None):
            raise InputError(
                f"this cache {'stores' if self.offset_dim else 'has no'} offsets, but offsets were "
                f"{'not ' if offsets is None else ''}given; open the cache of the model that made them"
            )
        offset_values = None
        if offsets is not None:
            offset_values = np.asarray(offsets, dtype=np.float32)
            if offset_values.shape != (index.size, self.offset_dim):
                raise InputError(
                    f"offsets must have shape ({index.size}, {self.offset_dim}), got {offset_values.shape}"
                )
        for name, array in (("features", values), ("offsets", offset_values)):
            if array is not None and not np.isfinite(array).all():
                bad = index[~np.isfinite(array).all(axis=1)]
                raise NumericalError(
                    f"non-finite {name} for rows {bad[:5].tolist()}; nothing was written"
                )

        # Overwriting a done row makes it pending until marked again, and the cleared mask
        # reaches the disk before the new values, so a crash never mixes old and new rows.
        redone = index[np.asarray(self._done[index]) != 0]
        if redone.size:
            self._done[redone] = 0
            if isinstance(self._done, np.memmap):
                self._done.flush()
        self._features[index] = values
        if offset_values is not None and self._offsets is not None:
            self._offsets[index] = offset_values
        self._written[index] = True

    def mark_done(self, rows: npt.ArrayLike) -> None:
        """Flush the data to disk, then mark ``rows`` done and flush the mask.

        Raises
        ------
        InputError
            If a row was not written through this handle since it was opened.
        """
        self._check_writable()
        index = _as_rows(rows, self._num_rows)
        unwritten = index[~self._written[index]]
        if unwritten.size:
            raise InputError(
                f"rows {unwritten[:5].tolist()} were not written since the cache was opened; "
                "write their features before marking them done"
            )
        # Data first: the mask must never reach the disk before the values it vouches for.
        self._flush_data()
        self._done[index] = 1
        if isinstance(self._done, np.memmap):
            self._done.flush()

    def _flush_data(self) -> None:
        for array in (self._features, self._offsets):
            if isinstance(array, np.memmap):
                array.flush()

    def flush(self) -> None:
        """Flush all arrays and rewrite the metadata with the current count of done rows."""
        self._check_writable()
        self._flush_data()
        if isinstance(self._done, np.memmap):
            self._done.flush()
        write_json_atomic(
            self.directory / METADATA_FILENAME,
            self._metadata(
                self.key, self._num_rows, self.feature_dim, self.offset_dim, num_done=self.num_done
            ),
        )

    def grow(self, num_rows: int) -> None:
        """Extend the cache to ``num_rows`` rows. The new rows are zero and not done.

        Raises
        ------
        InputError
            If ``num_rows`` is smaller than the current number of rows.
        """
        self._check_writable()
        if num_rows < self._num_rows:
            raise InputError(
                f"cannot shrink the feature cache {self.directory} from {self._num_rows} to "
                f"{num_rows} rows; create a new cache instead"
            )
        if num_rows == self._num_rows:
            return
        self.flush()
        old_rows = self._num_rows
        num_done = self.num_done
        self._release_maps()

        # 1. Extend the files with zeros. A crash here leaves files longer than the
        #    metadata records, which the next writable open repairs.
        self._num_rows = num_rows
        for name, size in self._file_sizes().items():
            os.truncate(self.directory / name, size)

        # 2. Record the new size, then map the longer files.
        write_json_atomic(
            self.directory / METADATA_FILENAME,
            self._metadata(
                self.key, num_rows, self.feature_dim, self.offset_dim, num_done=num_done
            ),
        )
        self._map_files()
        written = np.zeros(num_rows, dtype=bool)
        written[:old_rows] = self._written
        self._written = written
        logger.info("grew feature cache %s from %d to %d rows", self.directory, old_rows, num_rows)

    def _release_maps(self) -> None:
        # Dropping the references unmaps the files once numpy releases its views.
        self._features = np.zeros((0, self.feature_dim), dtype=_FLOAT)
        self._offsets = None
        self._done = np.zeros(0, dtype=_MASK)

    def close(self) -> None:
        """Flush (when writable) and unmap the files. Closing twice does nothing."""
        if self._closed:
            return
        if self.writable:
            self.flush()
        self._release_maps()
        self._closed = True

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.directory)!r}, key={self.key!r}, rows={self._num_rows}, "
            f"done={self.num_done if not self._closed else '?'}, p={self.feature_dim}, offsets={self.offset_dim})"
        )


class TextFeatureCache:
    """Class text features ``(C, q)`` on disk, one ``.npy`` file per model and prompt set.

    The file name is a hash of the model key, the class names and their prompts, so editing
    a prompt or a class selects another file instead of returning stale features.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(model_key: str, class_names: Sequence[str], prompts: Sequence[Sequence[str]]) -> str:
        """Return the hash that names the file of these classes and prompts."""
        payload = json.dumps(
            [model_key, list(class_names), [list(p) for p in prompts]], ensure_ascii=False
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]

    def path(
        self, model_key: str, class_names: Sequence[str], prompts: Sequence[Sequence[str]]
    ) -> Path:
        """Return the ``.npy`` file for these classes and prompts; it may not exist."""
        return self.directory / f"text-{self.key(model_key, class_names, prompts)}.npy"

    def load(
        self, model_key: str, class_names: Sequence[str], prompts: Sequence[Sequence[str]]
    ) -> np.ndarray | None:
        """Return the cached ``(C, q)`` float32 features, or None when they are not cached.

        Raises
        ------
        StoreError
            If the file exists but cannot be read or has the wrong number of rows.
        """
        path = self.path(model_key, class_names, prompts)
        if not path.is_file():
            return None
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise StoreError(
                f"cannot read cached text features {path}: {error}; delete the file"
            ) from error
        if (
            features.ndim != 2
            or features.shape[0] != len(class_names)
            or features.dtype != np.float32
        ):
            raise StoreError(
                f"cached text features {path} have shape {features.shape} and dtype {features.dtype}, "
                f"expected ({len(class_names)}, q) float32; delete the file"
            )
        return features

    def save(
        self,
        model_key: str,
        class_names: Sequence[str],
        prompts: Sequence[Sequence[str]],
        features: npt.ArrayLike,
    ) -> Path:
        """Store ``(C, q)`` features atomically, with a JSON sidecar naming the model and prompts."""
        values = np.asarray(features, dtype=np.float32)
        if (
            values.ndim != 2
            or values.shape[0] != len(class_names)
            or len(prompts) != len(class_names)
        ):
            raise InputError(
                f"text features must be (C, q) with C = {len(class_names)} classes and one prompt "
                f"list per class ({len(prompts)} given), got shape {values.shape}"
            )
        if not np.isfinite(values).all():
            raise NumericalError("text features contain non-finite values; nothing was saved")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(model_key, class_names, prompts)
        write_atomic(path, lambda file: np.save(file, values, allow_pickle=False))
        sidecar = {
            "model_key": model_key,
            "class_names": list(class_names),
            "prompts": [list(p) for p in prompts],
            "shape": list(values.shape),
        }
        write_json_atomic(path.with_suffix(".json"), sidecar)
        return path

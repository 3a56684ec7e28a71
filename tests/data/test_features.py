"""FeatureCache and TextFeatureCache on real files: layout, validation, crashes and growth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotator.data.features import (
    DONE_FILENAME,
    FEATURES_FILENAME,
    METADATA_FILENAME,
    OFFSETS_FILENAME,
    FeatureCache,
    TextFeatureCache,
)
from annotator.errors import ConfigError, InputError, NumericalError, StoreError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _values(rows: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def test_create_layout(tmp_path: Path) -> None:
    cache = FeatureCache.create(
        tmp_path / "c", key="model-a", num_rows=5, feature_dim=4, offset_dim=3
    )
    assert (tmp_path / "c" / FEATURES_FILENAME).stat().st_size == 5 * 4 * 4
    assert (tmp_path / "c" / OFFSETS_FILENAME).stat().st_size == 5 * 3 * 4
    assert (tmp_path / "c" / DONE_FILENAME).stat().st_size == 5
    metadata = json.loads((tmp_path / "c" / METADATA_FILENAME).read_text())
    assert metadata["key"] == "model-a"
    assert metadata["num_rows"] == 5
    assert metadata["feature_dim"] == 4
    assert metadata["offset_dim"] == 3
    assert metadata["dtype"] == "float32"
    assert metadata["num_done"] == 0
    assert cache.missing_rows().tolist() == [0, 1, 2, 3, 4]
    assert FeatureCache.exists(tmp_path / "c")
    assert not FeatureCache.exists(tmp_path / "other")


def test_write_mark_read_round_trip(tmp_path: Path) -> None:
    features, offsets = _values(3, 4, 0), _values(3, 2, 1)
    with FeatureCache.create(tmp_path, key="m", num_rows=6, feature_dim=4, offset_dim=2) as cache:
        cache.write([4, 0, 2], features, offsets)
        cache.mark_done([4, 0, 2])

    reopened = FeatureCache.open(tmp_path, key="m", feature_dim=4, offset_dim=2)
    assert reopened.missing_rows().tolist() == [1, 3, 5]
    assert reopened.num_done == 3
    read_features, read_offsets = reopened.read([4, 0, 2])
    np.testing.assert_array_equal(read_features, features)
    assert read_offsets is not None
    np.testing.assert_array_equal(read_offsets, offsets)
    assert json.loads((tmp_path / METADATA_FILENAME).read_text())["num_done"] == 3


def test_files_are_raw_float32(tmp_path: Path) -> None:
    features = _values(2, 3, 0)
    with FeatureCache.create(tmp_path, key="m", num_rows=2, feature_dim=3) as cache:
        cache.write([0, 1], features)
        cache.mark_done([0, 1])
    raw = np.fromfile(tmp_path / FEATURES_FILENAME, dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(raw, features)


def test_rewrite_clears_done(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=2, feature_dim=2)
    cache.write([0, 1], _values(2, 2, 0))
    cache.mark_done([0, 1])
    cache.write([1], _values(1, 2, 1))
    assert cache.missing_rows().tolist() == [1]
    assert np.fromfile(tmp_path / DONE_FILENAME, dtype=np.uint8).tolist() == [1, 0]


def test_unwritten_rows_cannot_be_done(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=4, feature_dim=2)
    cache.write([0], _values(1, 2, 0))
    with pytest.raises(InputError, match=r"rows \[1\] were not written"):
        cache.mark_done([0, 1])
    assert cache.num_done == 0


def test_written_not_marked_stays_missing(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=3, feature_dim=2)
    cache.write([0, 1], _values(2, 2, 0))
    cache.mark_done([0])
    cache.write([2], _values(1, 2, 1))
    cache.flush()
    del cache

    reopened = FeatureCache.open(tmp_path)
    assert reopened.missing_rows().tolist() == [1, 2]
    with pytest.raises(InputError, match="were not written since the cache was opened"):
        reopened.mark_done([1])


CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from annotator.data.features import FeatureCache

    cache = FeatureCache.open(sys.argv[1])
    cache.write([0, 1], np.ones((2, 3), dtype=np.float32))
    cache.mark_done([0, 1])
    cache.write([2, 3], np.full((2, 3), 2.0, dtype=np.float32))
    os.kill(os.getpid(), signal.SIGKILL)  # dies between writing rows 2, 3 and marking them
    """
)


def test_sigkill_between_write_and_mark(tmp_path: Path) -> None:
    FeatureCache.create(tmp_path / "c", key="m", num_rows=4, feature_dim=3).close()
    script = tmp_path / "writer.py"
    script.write_text(CRASHING_WRITER)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "c"), str(REPO_ROOT)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -9, result.stderr.decode()

    cache = FeatureCache.open(tmp_path / "c")
    assert cache.missing_rows().tolist() == [2, 3]
    np.testing.assert_array_equal(cache.read([0, 1])[0], np.ones((2, 3), dtype=np.float32))


def test_grow_keeps_rows(tmp_path: Path) -> None:
    features, offsets = _values(2, 3, 0), _values(2, 2, 1)
    cache = FeatureCache.create(tmp_path, key="m", num_rows=2, feature_dim=3, offset_dim=2)
    cache.write([0, 1], features, offsets)
    cache.mark_done([1])
    cache.grow(5)

    assert cache.num_rows == 5
    assert cache.missing_rows().tolist() == [0, 2, 3, 4]
    cache.mark_done([0])  # written before the grow, so it may still be marked
    cache.write([4], _values(1, 3, 2), _values(1, 2, 3))
    cache.mark_done([4])
    cache.close()

    reopened = FeatureCache.open(tmp_path)
    assert reopened.num_rows == 5
    assert reopened.missing_rows().tolist() == [2, 3]
    np.testing.assert_array_equal(reopened.read([0, 1])[0], features)
    assert (tmp_path / FEATURES_FILENAME).stat().st_size == 5 * 3 * 4


def test_grow_from_empty(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=0, feature_dim=2)
    assert cache.missing_rows().size == 0
    assert cache.features.shape == (0, 2)
    cache.grow(3)
    cache.write([2], _values(1, 2, 0))
    cache.mark_done([2])
    cache.close()
    assert FeatureCache.open(tmp_path).missing_rows().tolist() == [0, 1]


def test_shrink_rejected(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=3, feature_dim=2)
    with pytest.raises(InputError, match="cannot shrink"):
        cache.grow(2)


def test_interrupted_grow_repaired(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=2, feature_dim=2)
    cache.write([0], _values(1, 2, 0))
    cache.mark_done([0])
    cache.close()
    # A grow that extended the files and died before writing the metadata.
    for name, row_bytes in ((FEATURES_FILENAME, 8), (DONE_FILENAME, 1)):
        os.truncate(tmp_path / name, 7 * row_bytes)

    with pytest.raises(StoreError, match="open the cache writable once"):
        FeatureCache.open(tmp_path, writable=False)
    repaired = FeatureCache.open(tmp_path)
    assert repaired.num_rows == 2
    assert repaired.missing_rows().tolist() == [1]
    assert (tmp_path / FEATURES_FILENAME).stat().st_size == 2 * 8


def test_truncated_file_detected(tmp_path: Path) -> None:
    FeatureCache.create(tmp_path, key="m", num_rows=4, feature_dim=2).close()
    os.truncate(tmp_path / FEATURES_FILENAME, 5)
    with pytest.raises(StoreError, match="truncated"):
        FeatureCache.open(tmp_path)


def test_missing_file_detected(tmp_path: Path) -> None:
    FeatureCache.create(tmp_path, key="m", num_rows=4, feature_dim=2).close()
    (tmp_path / DONE_FILENAME).unlink()
    with pytest.raises(StoreError, match="is missing"):
        FeatureCache.open(tmp_path)


def test_open_checks_model(tmp_path: Path) -> None:
    FeatureCache.create(tmp_path, key="model-a", num_rows=1, feature_dim=4).close()
    with pytest.raises(ConfigError, match="key='model-a', but 'model-b' was expected"):
        FeatureCache.open(tmp_path, key="model-b")
    with pytest.raises(ConfigError, match="feature_dim=4, but 5 was expected"):
        FeatureCache.open(tmp_path, feature_dim=5)
    with pytest.raises(ConfigError, match="offset_dim=None, but 3 was expected"):
        FeatureCache.open(tmp_path, offset_dim=3)


def test_open_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no feature cache in"):
        FeatureCache.open(tmp_path / "nothing")


def test_unknown_format_rejected(tmp_path: Path) -> None:
    FeatureCache.create(tmp_path, key="m", num_rows=1, feature_dim=2).close()
    metadata = json.loads((tmp_path / METADATA_FILENAME).read_text())
    metadata["version"] = 99
    (tmp_path / METADATA_FILENAME).write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match="version 1"):
        FeatureCache.open(tmp_path)


def test_create_refuses_existing(tmp_path: Path) -> None:
    FeatureCache.create(tmp_path, key="m", num_rows=1, feature_dim=2).close()
    with pytest.raises(ConfigError, match="already exists"):
        FeatureCache.create(tmp_path, key="m", num_rows=1, feature_dim=2)
    replaced = FeatureCache.create(tmp_path, key="n", num_rows=2, feature_dim=3, overwrite=True)
    assert replaced.key == "n"
    assert replaced.num_rows == 2


@pytest.mark.parametrize(
    ("rows", "features", "message"),
    [
        ([0, 5], np.zeros((2, 2)), "outside the cache"),
        ([0, 0], np.zeros((2, 2)), "duplicates"),
        ([0], np.zeros((1, 3)), r"shape \(1, 2\)"),
        ([[0]], np.zeros((1, 2)), "1-D array"),
        ([0.5], np.zeros((1, 2)), "integers"),
    ],
)
def test_write_validates(tmp_path: Path, rows: list, features: np.ndarray, message: str) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=3, feature_dim=2)
    with pytest.raises(InputError, match=message):
        cache.write(rows, features)


def test_write_rejects_nan(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=3, feature_dim=2)
    values = np.array([[1.0, np.nan]], dtype=np.float32)
    with pytest.raises(NumericalError, match=r"rows \[1\]"):
        cache.write([1], values)
    assert not cache.features[1].any()


def test_offsets_required_iff_stored(tmp_path: Path) -> None:
    with_offsets = FeatureCache.create(
        tmp_path / "a", key="m", num_rows=1, feature_dim=2, offset_dim=2
    )
    with pytest.raises(InputError, match="offsets were not given"):
        with_offsets.write([0], np.zeros((1, 2)))
    without = FeatureCache.create(tmp_path / "b", key="m", num_rows=1, feature_dim=2)
    with pytest.raises(InputError, match="has no offsets"):
        without.write([0], np.zeros((1, 2)), np.zeros((1, 2)))


def test_read_only_rejects_writes(tmp_path: Path) -> None:
    FeatureCache.create(tmp_path, key="m", num_rows=1, feature_dim=2).close()
    cache = FeatureCache.open(tmp_path, writable=False)
    with pytest.raises(StoreError, match="read-only"):
        cache.write([0], np.zeros((1, 2)))


def test_read_pending_rows_rejected(tmp_path: Path) -> None:
    cache = FeatureCache.create(tmp_path, key="m", num_rows=2, feature_dim=2)
    with pytest.raises(InputError, match="have no features yet"):
        cache.read([1])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.tuples(
            st.sets(st.integers(0, 19), min_size=1, max_size=6), st.booleans(), st.booleans()
        ),
        min_size=1,
        max_size=8,
    )
)
def test_matches_reference_model(tmp_path_factory: pytest.TempPathFactory, batches: list) -> None:
    """Random writes, marks and reopenings agree with a dictionary of done rows."""
    folder = tmp_path_factory.mktemp("cache")
    cache = FeatureCache.create(folder, key="m", num_rows=20, feature_dim=3)
    reference: dict[int, np.ndarray] = {}
    for step, (rows, mark, reopen) in enumerate(batches):
        index = sorted(rows)
        values = _values(len(index), 3, step)
        cache.write(index, values)
        if mark:
            cache.mark_done(index)
            reference.update({row: values[i] for i, row in enumerate(index)})
        else:
            for row in index:
                reference.pop(row, None)
        if reopen:
            cache.close()
            cache = FeatureCache.open(folder)
    assert sorted(set(range(20)) - set(reference)) == cache.missing_rows().tolist()
    for row, values in reference.items():
        np.testing.assert_array_equal(cache.read([row])[0][0], values)


def test_text_cache_round_trip(tmp_path: Path) -> None:
    store = TextFeatureCache(tmp_path)
    names = ["cat", "dog"]
    prompts = [("a cat",), ("a dog", "a puppy")]
    assert store.load("model-a", names, prompts) is None
    features = _values(2, 5, 0)
    path = store.save("model-a", names, prompts, features)

    np.testing.assert_array_equal(store.load("model-a", names, prompts), features)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["model_key"] == "model-a"
    assert sidecar["prompts"] == [["a cat"], ["a dog", "a puppy"]]


def test_text_cache_keyed_by_everything(tmp_path: Path) -> None:
    store = TextFeatureCache(tmp_path)
    names = ["cat", "dog"]
    prompts = [("a cat",), ("a dog",)]
    store.save("model-a", names, prompts, _values(2, 5, 0))
    assert store.load("model-b", names, prompts) is None
    assert store.load("model-a", names, [("a cat",), ("a hound",)]) is None
    assert store.load("model-a", ["cat", "hound"], prompts) is None
    keys = {
        TextFeatureCache.key("model-a", names, prompts),
        TextFeatureCache.key("model-a", names, [("a cat", ""), ("a dog",)]),
        TextFeatureCache.key("model-a", names, [("a cat a dog",), ()]),
    }
    assert len(keys) == 3


def test_text_cache_validates(tmp_path: Path) -> None:
    store = TextFeatureCache(tmp_path)
    with pytest.raises(InputError, match="C = 2 classes"):
        store.save("m", ["a", "b"], [("a",), ("b",)], _values(3, 4, 0))
    with pytest.raises(NumericalError):
        store.save("m", ["a"], [("a",)], np.array([[np.inf, 0.0]]))
    path = store.save("m", ["a"], [("a",)], _values(1, 4, 0))
    np.save(path, np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(StoreError, match="delete the file"):
        store.load("m", ["a"], [("a",)])

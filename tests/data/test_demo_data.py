"""Tests of the demo digits: the split, the rendering and the shifted pool on disk."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import RidgeClassifier

from annotator.data.demo_data import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_VARIANTS_PER_DIGIT,
    DIGIT_NAMES,
    GROUND_TRUTH_FILENAME,
    DemoPool,
    load_digit_splits,
    render_deployment_pool,
    render_digit,
    shift_digit,
    write_demo_pool,
)
from annotator.errors import InputError


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> DemoPool:
    return write_demo_pool(tmp_path_factory.mktemp("demo") / "out", seed=0)


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
    }


def _read_ground_truth(csv_path: Path) -> list[tuple[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["path", "label"]
    # Paths are relative to the CSV's folder and all point into the pool folder.
    assert all(path.startswith("pool/") for path, _ in rows[1:])
    return [(path.removeprefix("pool/"), label) for path, label in rows[1:]]


def _png_digest(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def test_splits_partition_all_digits() -> None:
    splits = load_digit_splits(seed=0)
    train = set(splits.train_indices.tolist())
    heldout = set(splits.heldout_indices.tolist())
    deployment = set(splits.deployment_indices.tolist())

    assert not train & heldout
    assert not train & deployment
    assert not heldout & deployment
    assert train | heldout | deployment == set(range(1797))
    assert (len(train), len(heldout), len(deployment)) == (898, 270, 629)


def test_splits_match_sklearn_digits() -> None:
    splits = load_digit_splits(seed=0)
    digits = load_digits()

    for images, labels, indices in (
        (splits.train_images, splits.train_labels, splits.train_indices),
        (splits.heldout_images, splits.heldout_labels, splits.heldout_indices),
        (splits.deployment_images, splits.deployment_labels, splits.deployment_indices),
    ):
        assert images.dtype == np.uint8
        assert images.shape == (len(indices), 8, 8)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, digits.target[indices])
        # 16 grey levels scale to multiples of 255 / 16 = 15.9375, rounded.
        np.testing.assert_array_equal(images, np.rint(digits.images[indices] * 255 / 16))


def test_splits_stratified_by_class() -> None:
    splits = load_digit_splits(seed=0)
    all_counts = np.bincount(load_digits().target, minlength=10)

    for labels, fraction in (
        (splits.train_labels, 0.50),
        (splits.heldout_labels, 0.15),
        (splits.deployment_labels, 0.35),
    ):
        counts = np.bincount(labels, minlength=10)
        assert np.all(np.abs(counts - fraction * all_counts) <= 2), counts


def test_splits_deterministic_for_seed() -> None:
    first = load_digit_splits(seed=3)
    second = load_digit_splits(seed=3)
    other = load_digit_splits(seed=4)

    np.testing.assert_array_equal(first.train_indices, second.train_indices)
    np.testing.assert_array_equal(first.deployment_indices, second.deployment_indices)
    assert not np.array_equal(first.deployment_indices, other.deployment_indices)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_splits_reject_invalid_seed(seed: object) -> None:
    with pytest.raises(InputError, match="seed"):
        load_digit_splits(seed=seed)  # type: ignore[arg-type]


def test_render_digit_dark_ink_on_paper() -> None:
    image_8x8 = np.zeros((8, 8), dtype=np.uint8)
    image_8x8[2:6, 3:5] = 255

    image = render_digit(image_8x8, 40)
    pixels = np.asarray(image)

    assert image.mode == "L"
    assert image.size == (40, 40)
    assert pixels[0, 0] == 255
    assert pixels[-1, -1] == 255
    assert pixels[20, 20] == 0


def test_render_digit_keeps_paper_border() -> None:
    image = render_digit(np.full((8, 8), 255, dtype=np.uint8), 64)
    pixels = np.asarray(image)

    # The 1-pixel frame of a 10-pixel grid covers 6.4 pixels of 64 at each edge.
    assert pixels[:, :3].min() == 255
    assert pixels[:3, :].min() == 255
    assert pixels[32, 32] == 0


@pytest.mark.parametrize(
    "array",
    [np.zeros((8, 8), dtype=np.float64), np.zeros((8, 9), dtype=np.uint8), np.zeros(64, np.uint8)],
)
def test_render_digit_rejects_bad_array(array: np.ndarray) -> None:
    with pytest.raises(InputError, match="shape"):
        render_digit(array, 32)


@pytest.mark.parametrize("size", [4, 0, 32.0])
def test_render_digit_rejects_bad_size(size: object) -> None:
    with pytest.raises(InputError, match="size"):
        render_digit(np.zeros((8, 8), dtype=np.uint8), size)  # type: ignore[arg-type]


def test_shift_digit_changes_image_within_range() -> None:
    clean = render_digit(load_digit_splits(0).deployment_images[0])
    shifted = shift_digit(clean, np.random.default_rng(0))
    pixels = np.asarray(shifted, dtype=np.float64)

    assert shifted.mode == "L"
    assert shifted.size == clean.size
    assert not np.array_equal(np.asarray(clean), np.asarray(shifted))
    # The shift maps white paper to a grey level of 160–235 before lighting and noise.
    assert pixels[:4, :4].mean() < 250


def test_shift_digit_deterministic_for_generator() -> None:
    clean = render_digit(load_digit_splits(0).deployment_images[5])
    first = shift_digit(clean, np.random.default_rng([7, 1]))
    second = shift_digit(clean, np.random.default_rng([7, 1]))
    other = shift_digit(clean, np.random.default_rng([7, 2]))

    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


def test_pool_has_enough_pngs(pool: DemoPool) -> None:
    files = sorted(pool.pool_dir.iterdir())

    assert pool.num_images >= 1000
    assert pool.num_images == 629 * DEFAULT_VARIANTS_PER_DIGIT
    assert len(files) == pool.num_images
    for path in files[:50]:
        assert path.suffix == ".png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "L"
            assert image.size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)


def test_ground_truth_outside_pool(pool: DemoPool) -> None:
    assert pool.ground_truth_csv.name == GROUND_TRUTH_FILENAME
    assert pool.ground_truth_csv.is_file()
    assert pool.pool_dir not in pool.ground_truth_csv.parents
    assert all(path.suffix == ".png" for path in pool.pool_dir.iterdir())


def test_ground_truth_complete(pool: DemoPool) -> None:
    rows = _read_ground_truth(pool.ground_truth_csv)
    paths = [path for path, _ in rows]

    assert len(rows) == pool.num_images
    assert len(set(paths)) == len(paths)
    assert set(paths) == {path.name for path in pool.pool_dir.iterdir()}
    assert {label for _, label in rows} <= set(DIGIT_NAMES)

    expected = Counter(load_digit_splits(0).deployment_labels.tolist())
    counts = Counter(DIGIT_NAMES.index(label) for _, label in rows)
    assert counts == {
        label: DEFAULT_VARIANTS_PER_DIGIT * count for label, count in expected.items()
    }


def test_pool_labels_match_source_digit(pool: DemoPool) -> None:
    splits = load_digit_splits(0)
    labels_by_path = dict(_read_ground_truth(pool.ground_truth_csv))
    path_by_digest = {digest: name for name, digest in _file_digests(pool.pool_dir).items()}

    for digit in (0, 1, 100, 628):
        clean = render_digit(splits.deployment_images[digit])
        for variant in range(DEFAULT_VARIANTS_PER_DIGIT):
            shifted = shift_digit(clean, np.random.default_rng([0, digit, variant]))
            name = path_by_digest[_png_digest(shifted)]
            assert labels_by_path[name] == DIGIT_NAMES[splits.deployment_labels[digit]]


def test_pool_built_only_from_deployment_digits(pool: DemoPool) -> None:
    splits = load_digit_splits(0)
    pool_digests = set(_file_digests(pool.pool_dir).values())

    deployment_digests = set()
    for digit, image_8x8 in enumerate(splits.deployment_images):
        clean = render_digit(image_8x8)
        for variant in range(DEFAULT_VARIANTS_PER_DIGIT):
            rng = np.random.default_rng([0, digit, variant])
            deployment_digests.add(_png_digest(shift_digit(clean, rng)))
    assert pool_digests == deployment_digests

    # The same shifts applied to training digits give none of the pool's images.
    for digit, image_8x8 in enumerate(splits.train_images[:100]):
        rng = np.random.default_rng([0, digit, 0])
        assert _png_digest(shift_digit(render_digit(image_8x8), rng)) not in pool_digests


def test_pool_names_hide_labels(pool: DemoPool) -> None:
    rows = _read_ground_truth(pool.ground_truth_csv)

    for path, label in rows:
        assert label not in path
    # Neighbouring file names do not share a class more often than chance (about 0.1).
    labels = [label for _, label in rows]
    same_as_next = np.mean([a == b for a, b in zip(labels, labels[1:], strict=False)])
    assert same_as_next < 0.2


def test_pool_deterministic_bytes(pool: DemoPool, tmp_path: Path) -> None:
    again = write_demo_pool(tmp_path / "again", seed=0)

    assert _file_digests(again.pool_dir) == _file_digests(pool.pool_dir)
    assert again.ground_truth_csv.read_bytes() == pool.ground_truth_csv.read_bytes()


def test_pool_depends_on_seed(pool: DemoPool) -> None:
    _, images, _ = render_deployment_pool(load_digit_splits(1), seed=1, variants_per_digit=1)
    other_digests = {_png_digest(image) for image in images}

    assert not other_digests & set(_file_digests(pool.pool_dir).values())


def test_pool_rebuild_idempotent(tmp_path: Path) -> None:
    first = write_demo_pool(tmp_path, seed=2, variants_per_digit=1)
    digests = _file_digests(first.pool_dir)
    ground_truth = first.ground_truth_csv.read_bytes()
    modified_times = {path.name: path.stat().st_mtime_ns for path in first.pool_dir.iterdir()}

    second = write_demo_pool(tmp_path, seed=2, variants_per_digit=1)

    assert second == first
    assert _file_digests(second.pool_dir) == digests
    assert second.ground_truth_csv.read_bytes() == ground_truth
    assert {
        path.name: path.stat().st_mtime_ns for path in second.pool_dir.iterdir()
    } == modified_times
    assert sorted(path.name for path in tmp_path.iterdir()) == [GROUND_TRUTH_FILENAME, "pool"]


def test_pool_rebuild_repairs_changed_file(tmp_path: Path) -> None:
    first = write_demo_pool(tmp_path, seed=2, variants_per_digit=1)
    digests = _file_digests(first.pool_dir)
    damaged = first.pool_dir / "digit-00003.png"
    damaged.write_bytes(b"truncated")

    write_demo_pool(tmp_path, seed=2, variants_per_digit=1)

    assert _file_digests(first.pool_dir) == digests


def test_pool_rejects_unexpected_files(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "digit-99999.png").write_bytes(b"left from a larger build")

    with pytest.raises(InputError, match="would not write"):
        write_demo_pool(tmp_path, seed=2, variants_per_digit=1)
    assert sorted(path.name for path in (tmp_path / "pool").iterdir()) == ["digit-99999.png"]
    assert not (tmp_path / GROUND_TRUTH_FILENAME).exists()


def test_pool_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "pool" / "broken").mkdir(parents=True)
    (tmp_path / "pool" / "broken" / "empty.png").write_bytes(b"")
    (tmp_path / "pool" / "notes.txt").write_text("scanned on Monday\n", encoding="utf-8")

    pool = write_demo_pool(tmp_path, seed=2, variants_per_digit=1)
    rows = _read_ground_truth(pool.ground_truth_csv)

    assert (tmp_path / "pool" / "broken" / "empty.png").read_bytes() == b""
    assert (tmp_path / "pool" / "notes.txt").is_file()
    assert len(rows) == pool.num_images
    assert all(path.startswith("digit-") for path, _ in rows)


def test_pool_rejects_zero_variants(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="variants_per_digit"):
        write_demo_pool(tmp_path, variants_per_digit=0)


def _pixels(images: list[Image.Image]) -> np.ndarray:
    """Downsample to 8×8 and flatten: a cheap input for a reference classifier."""
    rows = []
    for image in images:
        small = image.resize((8, 8), Image.Resampling.BILINEAR)
        rows.append(np.asarray(small, dtype=np.float64).ravel() / 255.0)
    return np.stack(rows)


def test_shift_defeats_clean_classifier() -> None:
    # A linear classifier fit on clean renderings fails on the pool, so the shift is real. The
    # same classifier fit on shifted renderings of other pool digits does much better, so the
    # shifted digits still show their class.
    splits = load_digit_splits(0)
    _, pool_images, pool_labels = render_deployment_pool(splits, seed=0, variants_per_digit=1)
    clean_train = _pixels([render_digit(image) for image in splits.train_images])
    clean_heldout = _pixels([render_digit(image) for image in splits.heldout_images])
    shifted = _pixels(pool_images)

    clean_model = RidgeClassifier(alpha=1.0).fit(clean_train, splits.train_labels)
    clean_accuracy = clean_model.score(clean_heldout, splits.heldout_labels)
    shifted_accuracy = clean_model.score(shifted, pool_labels)

    half = len(pool_labels) // 2
    shifted_model = RidgeClassifier(alpha=1.0).fit(shifted[:half], pool_labels[:half])
    relearned_accuracy = shifted_model.score(shifted[half:], pool_labels[half:])

    assert clean_accuracy > 0.9
    assert shifted_accuracy < clean_accuracy - 0.3
    assert relearned_accuracy > 0.6
    assert relearned_accuracy > shifted_accuracy + 0.2

"""Tests of the labelled-dataset and caption readers on real folders and CSV files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotator.data.datasets import CaptionPairs, read_caption_pairs, read_labelled_dataset
from annotator.errors import InputError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color=(len(path.name) * 20 % 256, 0, 0)).save(path)
    return path


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------- class folders


def test_class_folders(tmp_path: Path) -> None:
    _image(tmp_path / "dog" / "b.png")
    _image(tmp_path / "dog" / "a.png")
    _image(tmp_path / "cat" / "nested" / "c.jpg")
    _image(tmp_path / ".cache" / "hidden.png")
    (tmp_path / "README.md").write_text("about this dataset")

    dataset = read_labelled_dataset(tmp_path)

    assert dataset.class_names == ("cat", "dog")
    relative = [path.relative_to(tmp_path).as_posix() for path in dataset.paths]
    assert relative == ["cat/nested/c.jpg", "dog/a.png", "dog/b.png"]
    np.testing.assert_array_equal(dataset.labels, [0, 1, 1])
    assert dataset.labels.dtype == np.int64
    assert dataset.label_names() == ["cat", "dog", "dog"]
    assert len(dataset) == 3


def test_class_folders_empty_class_kept(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    dataset = read_labelled_dataset(tmp_path)
    assert dataset.class_names == ("cat", "dog")
    np.testing.assert_array_equal(dataset.labels, [0])


def test_class_folders_stray_image(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "a.png")
    _image(tmp_path / "loose.png")
    with pytest.raises(InputError, match="outside any class folder") as raised:
        read_labelled_dataset(tmp_path)
    assert "loose.png" in str(raised.value)


def test_class_folders_without_classes(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no class folders"):
        read_labelled_dataset(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(InputError, match="no images"):
        read_labelled_dataset(tmp_path)


# ---------------------------------------------------------------------- CSV


def test_label_csv_relative_and_absolute(tmp_path: Path) -> None:
    first = _image(tmp_path / "data" / "images" / "1.png")
    second = _image(tmp_path / "elsewhere" / "2.png")
    csv_path = _csv(
        tmp_path / "data" / "labels.csv",
        f"path,label,annotator\nimages/1.png, zebra ,x\n{second},ant,y\n",
    )

    dataset = read_labelled_dataset(csv_path)

    assert dataset.paths == (first, second)
    assert dataset.class_names == ("ant", "zebra")
    np.testing.assert_array_equal(dataset.labels, [1, 0])


def test_label_csv_byte_order_mark(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes("\ufeffpath,label\na.png,cat\n".encode())
    assert read_labelled_dataset(csv_path).class_names == ("cat",)


def test_label_csv_missing_file(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    csv_path = _csv(tmp_path / "labels.csv", "path,label\na.png,cat\nmissing.png,dog\n")
    with pytest.raises(InputError, match="line 3") as raised:
        read_labelled_dataset(csv_path)
    assert "'missing.png' not found" in str(raised.value)


def test_label_csv_empty_label(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    csv_path = _csv(tmp_path / "labels.csv", "path,label\na.png,cat\nb.png,  \n")
    with pytest.raises(InputError, match="line 3: empty label for 'b.png'"):
        read_labelled_dataset(csv_path)


def test_label_csv_missing_column(tmp_path: Path) -> None:
    csv_path = _csv(tmp_path / "labels.csv", "file,class\na.png,cat\n")
    with pytest.raises(InputError, match=r"lacks the columns \['path', 'label'\]"):
        read_labelled_dataset(csv_path)


def test_label_csv_repeated_path(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    csv_path = _csv(tmp_path / "labels.csv", "path,label\na.png,cat\n./a.png,dog\n")
    with pytest.raises(InputError, match="line 3") as raised:
        read_labelled_dataset(csv_path)
    assert "line 2" in str(raised.value)


def test_label_csv_without_rows(tmp_path: Path) -> None:
    csv_path = _csv(tmp_path / "labels.csv", "path,label\n")
    with pytest.raises(InputError, match="no rows"):
        read_labelled_dataset(csv_path)


def test_labelled_dataset_bad_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_labelled_dataset(tmp_path / "absent")
    other = tmp_path / "labels.json"
    other.write_text("{}")
    with pytest.raises(InputError, match="neither a folder"):
        read_labelled_dataset(other)


# ---------------------------------------------------------------------- captions


def test_caption_pairs(tmp_path: Path) -> None:
    image = _image(tmp_path / "img" / "a.png")
    csv_path = _csv(
        tmp_path / "captions.csv",
        'path,caption\nimg/a.png,"a red square, small"\nimg/a.png,a tiny red tile\n',
    )
    pairs = read_caption_pairs(csv_path)
    assert pairs == CaptionPairs(
        paths=(image, image), captions=("a red square, small", "a tiny red tile")
    )
    assert len(pairs) == 2


def test_caption_pairs_bad_rows(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    empty = _csv(tmp_path / "empty.csv", "path,caption\na.png,\n")
    with pytest.raises(InputError, match="line 2: empty caption"):
        read_caption_pairs(empty)
    missing = _csv(tmp_path / "missing.csv", "path,caption\nb.png,a cat\n")
    with pytest.raises(InputError, match="'b.png' not found"):
        read_caption_pairs(missing)
    with pytest.raises(InputError, match="does not exist"):
        read_caption_pairs(tmp_path / "absent.csv")

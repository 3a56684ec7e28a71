"""Tests of image discovery, inspection and loading on real files written with Pillow."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotator.data.images import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    discover_images,
    inspect_image,
    inspect_images,
    load_rgb,
    normalise_extensions,
    sha256_file,
)
from annotator.errors import InputError

EXIF_ORIENTATION = 0x0112


def _write_image(path: Path, size: tuple[int, int] = (16, 12), mode: str = "RGB", **save) -> Path:
    """Write a random image; ``size`` is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    image.save(path, **save)
    return path


def _truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _la_tiff_with_associated_alpha(path: Path) -> Path:
    """A real TIFF that Pillow opens in mode "La", which it cannot convert to RGB.

    Pillow writes LA with unassociated alpha (ExtraSamples = 2); setting the tag to 1 marks the
    alpha as premultiplied, which Pillow maps to its mode "La".
    """
    buffer = io.BytesIO()
    Image.new("LA", (4, 4)).save(buffer, "TIFF")
    # Little-endian IFD entry: tag 338 (ExtraSamples), type SHORT, count 1, value 2.
    unassociated = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"
    data = buffer.getvalue()
    assert data.count(unassociated) == 1, "Pillow changed how it writes LA TIFF files"
    path.write_bytes(data.replace(unassociated, unassociated[:-2] + b"\x01\x00"))
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Real images, a zero-byte file and a text file named .png in nested folders."""
    root = tmp_path / "pool"
    _write_image(root / "a.png")
    _write_image(root / "nested" / "b.jpg", format="JPEG")
    _write_image(root / "nested" / "deeper" / "c.PNG")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("these are not pixels\n")
    (root / "readme.txt").write_text("not an image extension")
    return root


# ---------------------------------------------------------------------- discovery


def test_discover_recursive_sorted(mixed_folder: Path) -> None:
    found = discover_images(mixed_folder)
    relative = [path.relative_to(mixed_folder).as_posix() for path in found]
    assert relative == [
        "a.png",
        "empty.png",
        "nested/b.jpg",
        "nested/deeper/c.PNG",
        "notes.png",
    ]


def test_discover_skips_hidden(tmp_path: Path) -> None:
    _write_image(tmp_path / "visible.png")
    _write_image(tmp_path / ".hidden.png")
    _write_image(tmp_path / ".cache" / "inside.png")
    assert [path.name for path in discover_images(tmp_path)] == ["visible.png"]


def test_discover_extensions_case_insensitive(tmp_path: Path) -> None:
    _write_image(tmp_path / "one.JPEG", format="JPEG")
    _write_image(tmp_path / "two.png")
    assert [path.name for path in discover_images(tmp_path, ["jpeg"])] == ["one.JPEG"]
    assert [path.name for path in discover_images(tmp_path, [".PNG"])] == ["two.png"]


def test_discover_symlink_loop(tmp_path: Path) -> None:
    _write_image(tmp_path / "sub" / "x.png")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    os.symlink(tmp_path / "sub", tmp_path / "alias")
    found = discover_images(tmp_path)
    # The folder "sub" is reached through "alias" and "sub"; it is walked once.
    assert len(found) == 1
    assert found[0].name == "x.png"


def test_discover_lists_broken_link(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    found = discover_images(tmp_path)
    assert [path.name for path in found] == ["broken.png"]
    record = inspect_image(found[0])
    assert record.status == "skipped"
    assert record.reason.startswith("file not found")


def test_discover_invalid_root(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        discover_images(tmp_path / "absent")
    file = _write_image(tmp_path / "a.png")
    with pytest.raises(InputError, match="not a folder"):
        discover_images(file)
    with pytest.raises(InputError, match="the string"):
        discover_images(tmp_path, ".png")
    with pytest.raises(InputError, match="extensions is empty"):
        discover_images(tmp_path, [])


def test_normalise_extensions() -> None:
    assert normalise_extensions(["JPG", ".Png", " webp "]) == {".jpg", ".png", ".webp"}
    assert ".jpeg" in IMAGE_EXTENSIONS
    with pytest.raises(InputError, match="invalid image extension"):
        normalise_extensions(["."])


# ---------------------------------------------------------------------- inspection


def test_mixed_folder_reports_skipped_with_reasons(mixed_folder: Path) -> None:
    records = {path.name: inspect_image(path) for path in discover_images(mixed_folder)}

    for name in ("a.png", "b.jpg", "c.PNG"):
        assert records[name].status == "ok", records[name]
        assert records[name].reason is None
    assert records["empty.png"].status == "skipped"
    assert records["empty.png"].reason == "empty file (0 bytes)"
    assert records["notes.png"].status == "skipped"
    assert records["notes.png"].reason == "not an image: cannot identify image file format"


def test_inspect_ok_image(tmp_path: Path) -> None:
    path = _write_image(tmp_path / "a.png", size=(20, 10))
    record = inspect_image(path)
    assert record == ImageRecord(
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        width=20,
        height=10,
        status="ok",
        reason=None,
    )
    assert record.ok


def test_inspect_empty_file_has_hash(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    record = inspect_image(path)
    assert record.sha256 == hashlib.sha256(b"").hexdigest()
    assert record.width is None
    assert record.height is None


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_inspect_truncated(tmp_path: Path, fmt: str, suffix: str) -> None:
    complete = _write_image(tmp_path / f"complete{suffix}", size=(64, 64), format=fmt)
    truncated = _truncated_copy(complete, tmp_path / f"truncated{suffix}")
    record = inspect_image(truncated)
    assert record.status == "skipped"
    assert record.reason.startswith("corrupt or truncated image")
    assert record.sha256 == hashlib.sha256(truncated.read_bytes()).hexdigest()


def test_inspect_unsupported_mode(tmp_path: Path) -> None:
    path = _la_tiff_with_associated_alpha(tmp_path / "premultiplied.tif")
    with Image.open(path) as image:
        assert image.mode == "La"
    record = inspect_image(path)
    assert record.status == "skipped"
    assert record.reason.startswith("unsupported image mode")


def test_inspect_exif_orientation_swaps_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    path = _write_image(tmp_path / "rotated.jpg", size=(30, 20), format="JPEG", exif=exif)
    record = inspect_image(path)
    assert (record.width, record.height) == (20, 30)
    assert load_rgb(path).size == (20, 30)


@pytest.mark.parametrize("size", [(12, 12), (20, 20)])
def test_inspect_decompression_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    """Above the limit, and above twice the limit where Pillow itself raises."""
    path = _write_image(tmp_path / "bomb.png", size=size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        record = inspect_image(path)
    assert record.status == "skipped"
    assert record.reason.startswith("image too large")
    assert "pixels" in record.reason
    assert record.sha256 is not None


def test_inspect_directory_named_like_image(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    record = inspect_image(folder)
    assert record.status == "skipped"
    assert record.sha256 is None


def test_sha256_streams_large_file(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, size=3 * 2**20 + 17, dtype=np.uint8)
    path = tmp_path / "large.bin"
    path.write_bytes(data.tobytes())
    assert sha256_file(path) == hashlib.sha256(data.tobytes()).hexdigest()


def test_inspect_images_parallel_matches_serial(mixed_folder: Path) -> None:
    paths = discover_images(mixed_folder)
    calls: list[tuple[int, int]] = []
    serial = inspect_images(paths)
    parallel = inspect_images(
        paths, workers=3, progress=lambda done, total: calls.append((done, total))
    )
    assert parallel == serial
    assert [record.path for record in parallel] == paths
    assert calls == [(done, len(paths)) for done in range(1, len(paths) + 1)]
    with pytest.raises(InputError, match="workers"):
        inspect_images(paths, workers=0)


# ---------------------------------------------------------------------- loading


def test_load_rgb_converts_modes(tmp_path: Path) -> None:
    grey = _write_image(tmp_path / "grey.png", mode="L")
    rgba = _write_image(tmp_path / "alpha.png", mode="RGBA")
    for path in (grey, rgba):
        image = load_rgb(path)
        assert image.mode == "RGB"
        assert image.size == (16, 12)
    with Image.open(grey) as original:
        expected = np.asarray(original.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_rgb(grey)), expected)


def test_load_rgb_rejects_bad_files(mixed_folder: Path) -> None:
    with pytest.raises(InputError, match="empty file"):
        load_rgb(mixed_folder / "empty.png")
    with pytest.raises(InputError, match="not an image") as raised:
        load_rgb(mixed_folder / "notes.png")
    assert "notes.png" in str(raised.value)
    with pytest.raises(InputError, match="file not found"):
        load_rgb(mixed_folder / "absent.png")

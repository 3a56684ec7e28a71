"""The encoding benchmark runs end to end on a small architecture and reports every stage."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from annotator.bench.encode import PHOTO_SIZES, make_benchmark_images, run_encode_benchmark


def test_benchmark_images_are_photos(tmp_path: Path) -> None:
    paths = make_benchmark_images(tmp_path, 5, threads=2)
    assert [path.suffix for path in paths] == [".jpg", ".jpg", ".jpg", ".png", ".jpg"]
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            assert image.size == PHOTO_SIZES[index % len(PHOTO_SIZES)]
            assert image.mode == "RGB"
    # Photo-like content compresses: well below raw size, well above a flat image.
    raw_bytes = 640 * 480 * 3
    assert raw_bytes / 30 < paths[0].stat().st_size < raw_bytes / 2


def test_benchmark_reports_stages() -> None:
    frame = run_encode_benchmark("ViT-S-32-alt", batch_size=2, num_batches=1, num_workers=0)
    assert frame["stage"].tolist() == [
        "decode + preprocess (1 process)",
        "forward only",
        "encode_images (0 workers)",
    ]
    assert frame["images"].tolist() == [2, 2, 2]
    assert (frame["images_per_second"] > 0).all()
    assert frame["fraction_of_forward"].iloc[1] == 1.0
    assert frame.attrs["device"] == "cpu"
    assert frame.attrs["num_workers"] == 0
    assert isinstance(frame.attrs["target_met"], bool)

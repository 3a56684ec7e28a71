"""Resumable feature extraction: correct rows, per-file failures, and resuming after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from annotator.data.features import DONE_FILENAME, FeatureCache
from annotator.errors import ConfigError, InputError
from annotator.models.encode import default_num_workers, encode_images, load_rgb
from annotator.models.towers import VisionLanguageModel

from .helpers import tiny_config, wrap_tiny, write_images

REPO_ROOT = Path(__file__).resolve().parents[2]


def reference_features(
    model: VisionLanguageModel, paths: list[Path]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features computed directly, one image at a time, without the data loader or the cache."""
    features, offsets = [], []
    for path in paths:
        result = model.image_features(model.preprocess(load_rgb(path))[None])
        features.append(result.features.numpy())
        if result.offsets is not None:
            offsets.append(result.offsets.numpy())
    return np.concatenate(features), (np.concatenate(offsets) if offsets else None)


def new_cache(folder: Path, model: VisionLanguageModel, rows: int) -> FeatureCache:
    return FeatureCache.create(
        folder,
        key="tiny",
        num_rows=rows,
        feature_dim=model.image_dim,
        offset_dim=model.embed_dim if model.has_image_offset else None,
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_features_match_direct(
    tmp_path: Path, tiny_model: VisionLanguageModel, workers: int
) -> None:
    paths = write_images(tmp_path / "images", 7)
    cache = new_cache(tmp_path / "cache", tiny_model, 7)

    stats = encode_images(
        tiny_model, paths, cache, batch_size=3, num_workers=workers, progress=False
    )

    assert stats.requested == 7
    assert stats.encoded == 7
    assert stats.already_done == 0
    assert stats.failed == []
    assert cache.num_done == 7
    expected, _ = reference_features(tiny_model, paths)
    np.testing.assert_allclose(cache.features[:], expected, rtol=1e-5, atol=1e-6)


def test_rows_map_paths(tmp_path: Path, tiny_model: VisionLanguageModel) -> None:
    paths = write_images(tmp_path / "images", 3)
    cache = new_cache(tmp_path / "cache", tiny_model, 10)
    rows = np.array([7, 2, 5])

    encode_images(tiny_model, paths, cache, rows=rows, batch_size=2, num_workers=0, progress=False)

    assert cache.missing_rows().tolist() == [0, 1, 3, 4, 6, 8, 9]
    expected, _ = reference_features(tiny_model, paths)
    np.testing.assert_allclose(cache.features[rows], expected, rtol=1e-5, atol=1e-6)


def test_broken_files_reported(tmp_path: Path, tiny_model: VisionLanguageModel) -> None:
    paths = write_images(tmp_path / "images", 4)
    garbage = tmp_path / "images" / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "images" / "truncated.jpg"
    truncated.write_bytes(paths[1].read_bytes()[:200])
    missing = tmp_path / "images" / "missing.png"
    all_paths = [paths[0], garbage, paths[1], truncated, missing, paths[2], paths[3]]
    cache = new_cache(tmp_path / "cache", tiny_model, len(all_paths))

    stats = encode_images(tiny_model, all_paths, cache, batch_size=3, num_workers=1, progress=False)

    assert stats.encoded == 4
    assert sorted(stats.failed_rows) == [1, 3, 4]
    reasons = {failure.path.name: failure.reason for failure in stats.failed}
    assert set(reasons) == {"garbage.png", "truncated.jpg", "missing.png"}
    assert "UnidentifiedImageError" in reasons["garbage.png"]
    assert "FileNotFoundError" in reasons["missing.png"]
    assert reasons["truncated.jpg"]
    assert cache.missing_rows().tolist() == [1, 3, 4]
    # The services unpack failures as (path, reason) pairs.
    for path, reason in stats.failed:
        assert isinstance(path, Path)
        assert isinstance(reason, str)


def test_resume_after_exception(tmp_path: Path, tiny_model: VisionLanguageModel) -> None:
    paths = write_images(tmp_path / "images", 10)
    cache = new_cache(tmp_path / "cache", tiny_model, 10)
    calls: list[int] = []

    def stop_after_two_batches(finished: int, total: int) -> None:
        calls.append(finished)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_images(
            tiny_model,
            paths,
            cache,
            batch_size=3,
            num_workers=1,
            progress=False,
            on_batch=stop_after_two_batches,
        )
    assert cache.num_done == 6

    encoded_rows: list[int] = []
    original = tiny_model.image_features

    def counting(pixels: torch.Tensor):  # type: ignore[no-untyped-def]
        encoded_rows.append(int(pixels.shape[0]))
        return original(pixels)

    tiny_model.image_features = counting  # type: ignore[method-assign]
    stats = encode_images(tiny_model, paths, cache, batch_size=3, num_workers=0, progress=False)

    assert stats.already_done == 6
    assert stats.encoded == 4
    assert sum(encoded_rows) == 4
    assert cache.num_done == 10
    expected, _ = reference_features(wrap_tiny(seed=0), paths)
    np.testing.assert_allclose(cache.features[:], expected, rtol=1e-5, atol=1e-6)


KILLED_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from annotator.data.features import FeatureCache
    from annotator.models.encode import encode_images
    from tests.models.helpers import wrap_tiny

    images = sorted(Path(sys.argv[1]).iterdir())
    cache = FeatureCache.open(sys.argv[2])
    print("started", flush=True)
    encode_images(
        wrap_tiny(seed=0), images, cache, batch_size=2, num_workers=0, progress=False,
        on_batch=lambda finished, total: time.sleep(0.5),
    )
    print("finished", flush=True)
    """
)


def test_resume_after_sigkill(tmp_path: Path) -> None:
    model = wrap_tiny(seed=0)
    paths = write_images(tmp_path / "images", 24)
    cache_dir = tmp_path / "cache"
    new_cache(cache_dir, model, 24).close()
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)

    # 1. Start encoding in a subprocess and SIGKILL it once at least two batches are done.
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "images"), str(cache_dir), str(REPO_ROOT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 180
        done = 0
        while time.monotonic() < deadline and process.poll() is None:
            done = int(np.count_nonzero(np.fromfile(cache_dir / DONE_FILENAME, dtype=np.uint8)))
            if done >= 4:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert done >= 4, "the worker finished no batch in time"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    # 2. Rerun: only the rows not done are encoded, and every row is right.
    with FeatureCache.open(cache_dir, key="tiny") as cache:
        done_before = cache.num_done
        assert 4 <= done_before < 24
        stats = encode_images(model, paths, cache, batch_size=5, num_workers=0, progress=False)
        assert stats.already_done == done_before
        assert stats.encoded == 24 - done_before
        expected, _ = reference_features(model, paths)
        np.testing.assert_allclose(cache.features[:], expected, rtol=1e-5, atol=1e-6)


def test_offsets_written(tmp_path: Path) -> None:
    config = tiny_config(
        vision={
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_pool": "map",
            "timm_proj": "none",
            "image_size": 224,
        },
        embed_dim=192,
        init_logit_bias=-10.0,
    )
    torch.manual_seed(0)
    model = VisionLanguageModel(
        open_clip.CustomTextCLIP(**config), tokenizer=SimpleTokenizer(context_length=16)
    )
    paths = write_images(tmp_path / "images", 3)
    cache = new_cache(tmp_path / "cache", model, 3)

    encode_images(model, paths, cache, batch_size=2, num_workers=0, progress=False)

    expected_features, expected_offsets = reference_features(model, paths)
    assert cache.offsets is not None
    assert expected_offsets is not None
    np.testing.assert_allclose(cache.features[:], expected_features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.offsets[:], expected_offsets, rtol=1e-5, atol=1e-5)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # Smooth gradients survive JPEG, so a wrong rotation differs far more than compression noise.
    rows, columns = np.mgrid[0:40, 0:60]
    pixels = np.stack([columns * 4, rows * 6, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    upright = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored image must be turned 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=100, subsampling=0)

    loaded = load_rgb(path)
    assert loaded.size == upright.size
    assert loaded.mode == "RGB"
    expected = np.asarray(upright, dtype=float)
    assert np.abs(np.asarray(loaded, dtype=float) - expected).mean() < 3.0
    flipped = np.asarray(loaded.transpose(Image.Transpose.ROTATE_180), dtype=float)
    assert np.abs(flipped - expected).mean() > 30.0


def test_all_done_is_noop(tmp_path: Path, tiny_model: VisionLanguageModel) -> None:
    paths = write_images(tmp_path / "images", 2)
    cache = new_cache(tmp_path / "cache", tiny_model, 2)
    encode_images(tiny_model, paths, cache, num_workers=0, progress=False)
    stats = encode_images(tiny_model, paths, cache, num_workers=0, progress=False)
    assert stats.encoded == 0
    assert stats.already_done == 2


def test_inputs_validated(tmp_path: Path, tiny_model: VisionLanguageModel) -> None:
    paths = write_images(tmp_path / "images", 2)
    cache = new_cache(tmp_path / "cache", tiny_model, 2)
    with pytest.raises(InputError, match="2 paths but 1 rows"):
        encode_images(tiny_model, paths, cache, rows=[0], progress=False)
    with pytest.raises(InputError, match=r"rows must lie in \[0, 2\)"):
        encode_images(tiny_model, paths, cache, rows=[0, 5], progress=False)
    with pytest.raises(InputError, match="duplicates"):
        encode_images(tiny_model, paths, cache, rows=[1, 1], progress=False)
    with pytest.raises(InputError, match="batch_size"):
        encode_images(tiny_model, paths, cache, batch_size=0, progress=False)


def test_cache_of_other_model_rejected(tmp_path: Path, tiny_model: VisionLanguageModel) -> None:
    paths = write_images(tmp_path / "images", 1)
    wide = FeatureCache.create(
        tmp_path / "wide", key="x", num_rows=1, feature_dim=tiny_model.image_dim + 1
    )
    with pytest.raises(ConfigError, match="stores 33-wide features"):
        encode_images(tiny_model, paths, wide, progress=False)
    with_offsets = FeatureCache.create(
        tmp_path / "offsets", key="x", num_rows=1, feature_dim=tiny_model.image_dim, offset_dim=16
    )
    with pytest.raises(ConfigError, match="offset width 16"):
        encode_images(tiny_model, paths, with_offsets, progress=False)
    keyed = VisionLanguageModel(tiny_model.model, cache_key="model-a")
    other = FeatureCache.create(
        tmp_path / "other", key="model-b", num_rows=1, feature_dim=tiny_model.image_dim
    )
    with pytest.raises(ConfigError, match="belongs to 'model-b'"):
        encode_images(keyed, paths, other, progress=False)


def test_default_workers_positive() -> None:
    assert default_num_workers(torch.device("cpu")) >= 1
    assert default_num_workers(torch.device("cuda")) >= 1

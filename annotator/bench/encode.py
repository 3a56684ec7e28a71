"""Encoding throughput: the whole pipeline against the forward pass alone, on the same images.

The benchmark writes JPEG and PNG files at photo sizes into a temporary folder, then measures
on one randomly initialised open_clip model (its speed does not depend on the weights):

1. decoding and preprocessing alone, in this process;
2. the forward pass alone, on batches decoded beforehand;
3. :func:`encode_images` end to end: decoding in DataLoader workers overlapped with the
   forward pass, plus the feature cache writes.

The pipeline's rate divided by the forward-only rate shows how much of the model's speed
survives decoding; the target is at least ``TARGET_FRACTION``.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from annotator.data.features import FeatureCache
from annotator.errors import InputError
from annotator.models.encode import default_num_workers, encode_images, load_rgb
from annotator.models.loading import create_untrained_model
from annotator.models.towers import VisionLanguageModel

logger = logging.getLogger(__name__)

TARGET_FRACTION = 0.85
"""Minimum ratio of pipeline throughput to forward-only throughput that the pipeline aims for."""

PHOTO_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 960),
    (500, 375),
)
"""Width × height of the generated images, cycled; typical of phone and camera photos after export."""

_T = TypeVar("_T")


def _write_photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """Write a photo-like image: a smooth random field with fine noise, so it compresses like a photo."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    noise = rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
    pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if path.suffix == ".png":
        image.save(path, optimize=False)
    else:
        image.save(path, quality=90)


def make_benchmark_images(
    folder: Path, count: int, *, seed: int = 0, threads: int | None = None
) -> list[Path]:
    """Write ``count`` photo-like images into ``folder``: three JPEGs to one PNG, at ``PHOTO_SIZES``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        folder / f"photo-{index:05d}.{'png' if index % 4 == 3 else 'jpg'}" for index in range(count)
    ]
    jobs = [
        (path, PHOTO_SIZES[index % len(PHOTO_SIZES)], seed * 1_000_003 + index)
        for index, path in enumerate(paths)
    ]
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: _write_photo(*job), jobs))
    return paths


def _timed(function: Callable[[], _T], device: torch.device) -> tuple[_T, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def _decode_batches(
    model: VisionLanguageModel, paths: Sequence[Path], batch_size: int
) -> list[torch.Tensor]:
    """Decode and preprocess with one torch thread, as a DataLoader worker does.

    With several threads, the small tensor operations of preprocessing spend most of their
    time synchronising the thread pool (measured: 33 ms instead of 0.5 ms per image for
    ToTensor with 2 threads on a busy 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [
            torch.stack(
                [model.preprocess(load_rgb(path)) for path in paths[start : start + batch_size]]
            )
            for start in range(0, len(paths), batch_size)
        ]
    finally:
        torch.set_num_threads(threads)


def _forward_all(model: VisionLanguageModel, batches: Sequence[torch.Tensor]) -> int:
    count = 0
    for pixels in batches:
        # Copy the features to the host as encode_images does, so both stages do the same work.
        model.image_features(pixels).features.cpu()
        count += int(pixels.shape[0])
    return count


def run_encode_benchmark(
    arch: str = "ViT-B-32",
    batch_size: int = 64,
    num_batches: int = 4,
    num_workers: int | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    seed: int = 0,
) -> pd.DataFrame:
    """Measure images per second of decoding, the forward pass, and the full encoding pipeline.

    Parameters
    ----------
    arch
        open_clip architecture, randomly initialised.
    batch_size, num_batches
        The benchmark encodes ``batch_size * num_batches`` images in each stage.
    num_workers
        DataLoader decoding workers of the pipeline; :func:`default_num_workers` when None.
    device, precision
        As for :func:`annotator.models.load_model`.
    seed
        Seed of the generated images and the weights.

    Returns
    -------
    pandas.DataFrame
        One row per stage with ``images``, ``seconds``, ``images_per_second`` and
        ``fraction_of_forward``; ``attrs`` records the settings and the machine.
    """
    if batch_size < 1 or num_batches < 1:
        raise InputError(
            f"batch_size and num_batches must be at least 1, got {batch_size} and {num_batches}"
        )
    torch.manual_seed(seed)
    model = create_untrained_model(arch, device=device, precision=precision)
    workers = default_num_workers(model.device) if num_workers is None else num_workers
    count = batch_size * num_batches

    with tempfile.TemporaryDirectory(prefix="annotator-bench-") as folder:
        root = Path(folder)

        # 1. Images on disk, and the same images decoded once for the forward-only stage.
        paths = make_benchmark_images(root / "images", count, seed=seed)
        batches, decode_seconds = _timed(
            lambda: _decode_batches(model, paths, batch_size), torch.device("cpu")
        )

        # 2. Forward pass alone, after one warm-up batch.
        _forward_all(model, batches[:1])
        forward_images, forward_seconds = _timed(lambda: _forward_all(model, batches), model.device)
        batches.clear()  # free the decoded pixels before the pipeline stage

        # 3. The whole pipeline into a fresh feature cache.
        cache = FeatureCache.create(
            root / "cache",
            key=f"benchmark-{arch}",
            num_rows=count,
            feature_dim=model.image_dim,
            offset_dim=model.embed_dim if model.has_image_offset else None,
        )
        stats, pipeline_seconds = _timed(
            lambda: encode_images(
                model, paths, cache, batch_size=batch_size, num_workers=workers, progress=False
            ),
            model.device,
        )
        cache.close()

    forward_rate = forward_images / forward_seconds
    rows = [
        ("decode + preprocess (1 process)", count, decode_seconds),
        ("forward only", forward_images, forward_seconds),
        (f"encode_images ({workers} workers)", stats.encoded, pipeline_seconds),
    ]
    frame = pd.DataFrame(
        [
            {
                "stage": stage,
                "images": images,
                "seconds": seconds,
                "images_per_second": images / seconds,
                "fraction_of_forward": images / seconds / forward_rate,
            }
            for stage, images, seconds in rows
        ]
    )
    frame.attrs.update(
        {
            "arch": arch,
            "weights": "random (speed does not depend on them)",
            "batch_size": batch_size,
            "num_batches": num_batches,
            "num_workers": workers,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "gpu": torch.cuda.get_device_name(model.device)
            if model.device.type == "cuda"
            else None,
            "target_fraction": TARGET_FRACTION,
            "target_met": bool(frame["fraction_of_forward"].iloc[-1] >= TARGET_FRACTION),
        }
    )
    logger.info(
        "encode benchmark %s: forward %.1f img/s, pipeline %.1f img/s (%.0f%% of forward)",
        arch,
        forward_rate,
        frame["images_per_second"].iloc[-1],
        100 * frame["fraction_of_forward"].iloc[-1],
    )
    return frame

"""Helpers for the models tests: tiny real open_clip models and image files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from annotator.models.towers import VisionLanguageModel

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""A ViT CLIP small enough to build in milliseconds; open_clip's real classes at toy sizes."""


def tiny_config(
    vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """Return a copy of ``TINY_CONFIG`` with entries of its vision, text and top-level parts replaced."""
    config = copy.deepcopy(TINY_CONFIG)
    config["vision_cfg"].update(vision or {})
    config["text_cfg"].update(text or {})
    config.update(top)
    return config


def make_tiny_clip(seed: int = 0, config: dict[str, Any] | None = None) -> open_clip.CLIP:
    """Build the tiny CLIP with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return open_clip.CLIP(**(config or TINY_CONFIG))


def wrap_tiny(seed: int = 0, config: dict[str, Any] | None = None) -> VisionLanguageModel:
    """Wrap a tiny CLIP with open_clip's BPE tokenizer."""
    config = config or TINY_CONFIG
    model = make_tiny_clip(seed, config)
    tokenizer = SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    return VisionLanguageModel(model, tokenizer=tokenizer, name=f"tiny-{seed}")


def write_images(
    folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (48, 40)
) -> list[Path]:
    """Write ``count`` random RGB images, alternating PNG and JPEG, and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"image-{index:04d}.{'png' if index % 2 == 0 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths

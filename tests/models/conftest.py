"""Fixtures for the models tests: real open_clip architectures, full size and tiny."""

from __future__ import annotations

import pytest
import torch

from annotator.models.loading import create_untrained_model
from annotator.models.towers import VisionLanguageModel

from .helpers import wrap_tiny


@pytest.fixture
def tiny_model() -> VisionLanguageModel:
    return wrap_tiny(seed=0)


@pytest.fixture(scope="session")
def vit_b32() -> VisionLanguageModel:
    """Full-size ViT-B-32 with random weights (about 6 s to build on two cores)."""
    torch.manual_seed(0)
    return create_untrained_model("ViT-B-32", device="cpu")


@pytest.fixture(scope="session")
def siglip_b16() -> VisionLanguageModel:
    """Full-size ViT-B-16-SigLIP with random weights (about 15 s to build on two cores)."""
    torch.manual_seed(0)
    return create_untrained_model("ViT-B-16-SigLIP", device="cpu")

"""Fixtures shared by the Bayesian core tests."""

from __future__ import annotations

import pytest
import torch

from .helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each available device in turn."""
    return torch.device(request.param)

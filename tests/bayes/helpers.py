"""Small builders shared by the Bayesian core tests."""

from __future__ import annotations

import torch

#: Devices the device-parametrised tests run on: the CPU, and CUDA when it is available.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_spd(size: int, *, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Return a random symmetric positive definite float64 matrix of shape (size, size)."""
    factor = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return scale * (factor @ factor.T / size + 0.1 * torch.eye(size, dtype=torch.float64))

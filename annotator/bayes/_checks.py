"""Input checks shared by the public functions of the Bayesian core.

Each check raises :class:`~annotator.errors.InputError` with the offending name, value or
shape and the expected one, so callers can show the message as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from annotator.errors import InputError


def check_tensor(name: str, value: object, *, ndim: int | None = None) -> Tensor:
    """Check that ``value`` is a finite floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(value, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    # A NaN or inf entry makes the sum non-finite, and one pass without a bool copy is cheap
    # for a large pool. Only a non-finite sum, possibly an overflow, needs the exact count.
    if value.numel() and not bool(torch.isfinite(value.sum())):
        bad = int((~torch.isfinite(value)).sum())
        if bad == 0:
            return value
        raise InputError(
            f"{name} contains {bad} non-finite entries (NaN or inf). "
            "Remove or recompute them before calling"
        )
    return value


def check_shape(name: str, value: Tensor, expected: Sequence[int | None]) -> Tensor:
    """Check that ``value`` has shape ``expected``, where ``None`` matches any size."""
    actual = tuple(value.shape)
    matches = len(actual) == len(expected) and all(
        want is None or want == got for want, got in zip(expected, actual, strict=True)
    )
    if not matches:
        expected_shape = tuple("*" if want is None else want for want in expected)
        raise InputError(f"{name} must have shape {expected_shape}, got {actual}")
    return value


def check_positive(name: str, value: float) -> float:
    """Check that ``value`` is a finite number greater than zero and return it as a float."""
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise InputError(f"{name} must be a positive number, got {value!r}") from error
    if not math.isfinite(number) or number <= 0.0:
        raise InputError(f"{name} must be a finite number greater than 0, got {value!r}")
    return number


def check_finite_number(name: str, value: float) -> float:
    """Check that ``value`` is a finite number and return it as a float."""
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise InputError(f"{name} must be a finite number, got {value!r}") from error
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return number


def check_positive_int(name: str, value: int) -> int:
    """Check that ``value`` is an integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer of at least 1, got {value!r}")
    return value


def check_offsets(offsets: Tensor | None, features: Tensor, embed_dim: int) -> Tensor | None:
    """Check per-image offsets ``(N, D)`` against features ``(N, p)``."""
    if offsets is None:
        return None
    check_tensor("offsets", offsets, ndim=2)
    check_shape("offsets", offsets, (features.shape[0], embed_dim))
    if offsets.device != features.device:
        raise InputError(
            f"offsets are on {offsets.device} but features are on {features.device}. "
            "Move both to the same device"
        )
    return offsets


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """Return the dtype to compute in for ``tensor``: float64 stays, anything else is float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32

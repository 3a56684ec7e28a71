"""Dense linear algebra in float64 shared by the posteriors: Cholesky with a jitter retry
and inverses of Cholesky factors."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from annotator.errors import NumericalError

logger = logging.getLogger(__name__)

#: Jitter added on the first retry, relative to the mean diagonal entry of the matrix.
INITIAL_RELATIVE_JITTER = 1e-10
#: Number of retries. The jitter grows tenfold on each, up to ``1e-10 * 10**(5 - 1) = 1e-6``.
MAX_JITTER_RETRIES = 5


def symmetrize(matrix: Tensor) -> Tensor:
    """Return ``(M + Mᵀ) / 2``."""
    return 0.5 * (matrix + matrix.transpose(-1, -2))


def cholesky_with_jitter(matrix: Tensor, *, name: str) -> Tensor:
    """Compute the lower Cholesky factor ``L`` with ``L Lᵀ = M + εI`` in float64.

    The first attempt uses ``ε = 0``. When it fails, ``ε`` starts at
    ``1e-10 · mean(diag M)`` and grows tenfold on each of at most five retries, and each
    retry is logged as a warning.

    Parameters
    ----------
    matrix : Tensor, shape (n, n)
        Symmetric matrix that should be positive definite.
    name : str
        Name of the matrix for log records and error messages.

    Returns
    -------
    Tensor, shape (n, n), float64
        Lower-triangular factor.

    Raises
    ------
    NumericalError
        When the matrix has non-finite entries or is not positive definite even with the
        largest jitter.
    """
    matrix = symmetrize(matrix.to(torch.float64))
    if not bool(torch.isfinite(matrix).all()):
        raise NumericalError(f"{name} has non-finite entries. Check the inputs it is built from")

    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor

    scale = float(matrix.diagonal().abs().mean())
    if scale == 0.0:
        scale = 1.0
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    jitter = INITIAL_RELATIVE_JITTER * scale
    for _ in range(MAX_JITTER_RETRIES):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * identity)
        if int(info) == 0:
            logger.warning(
                "Cholesky of %s succeeded after adding jitter %.3g to the diagonal", name, jitter
            )
            return factor
        jitter *= 10.0
    raise NumericalError(
        f"{name} ({matrix.shape[-1]}x{matrix.shape[-1]}) is not positive definite even with "
        f"jitter {jitter / 10.0:.3g} on the diagonal. Increase the prior precision or check "
        "the factors"
    )


def inverse_lower_triangular(factor: Tensor) -> Tensor:
    """Return ``L⁻¹`` for a lower-triangular ``L`` of shape (n, n)."""
    identity = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.linalg.solve_triangular(factor, identity, upper=False)

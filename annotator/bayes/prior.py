"""Prior precision of a projection by the Laplace evidence.

Take a projection ``W`` (D, p) with factors ``A`` (p, p) and ``B`` (D, D), effective data count
``n`` and an isotropic Gaussian prior ``N(W₀, λ⁻¹ I)``. Up to terms that do not depend on
``λ``, the Laplace approximation of its log marginal likelihood is

    log Z(λ) = −½ λ ‖W* − W₀‖² + ½ P log λ − ½ log det(A' ⊗ B')

with ``P = p·D``, ``A' = √n A + √λ I``, ``B' = √n B + √λ I`` and
``log det(A' ⊗ B') = D·log det A' + p·log det B'``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy import optimize
from torch import Tensor

from annotator.bayes._checks import (
    check_positive,
    check_positive_int,
    check_shape,
    check_tensor,
)
from annotator.bayes.factors import KroneckerFactors
from annotator.bayes.linalg import symmetrize
from annotator.errors import InputError, NumericalError

logger = logging.getLogger(__name__)


def kron_logdet(A: Tensor, B: Tensor) -> Tensor:
    """Compute ``log det(A ⊗ B) = D·log det A + p·log det B`` in float64.

    Parameters
    ----------
    A : Tensor, shape (p, p)
        Symmetric positive definite matrix.
    B : Tensor, shape (D, D)
        Symmetric positive definite matrix.

    Returns
    -------
    Tensor, shape ()
        The log-determinant as a float64 scalar.

    Raises
    ------
    NumericalError
        When ``A`` or ``B`` is not positive definite.
    """
    check_tensor("A", A, ndim=2)
    check_tensor("B", B, ndim=2)
    return B.shape[0] * _logdet_spd(A, "A") + A.shape[0] * _logdet_spd(B, "B")


def log_evidence(
    prior_precision: float,
    A: Tensor,
    B: Tensor,
    *,
    num_data: float,
    weight: Tensor,
    prior_mean: Tensor | None = None,
) -> Tensor:
    """Compute the Laplace log evidence of one projection at prior precision ``λ``.

    ``log Z(λ) = −½ λ ‖W* − W₀‖² + ½ P log λ − ½ (D·log det A' + p·log det B')`` with
    ``A' = √n A + √λ I``, ``B' = √n B + √λ I`` and ``P = p·D``.

    Parameters
    ----------
    prior_precision : float
        ``λ > 0``.
    A : Tensor, shape (p, p)
        Input-side factor.
    B : Tensor, shape (D, D)
        Output-side factor.
    num_data : float
        Effective number of data points ``n``.
    weight : Tensor, shape (D, p)
        Posterior mean ``W*`` in ``nn.Linear`` orientation.
    prior_mean : Tensor, shape (D, p), optional
        Prior mean ``W₀``; zero when None.

    Returns
    -------
    Tensor, shape ()
        ``log Z(λ)`` in float64.
    """
    prior_precision = check_positive("prior_precision", prior_precision)
    distance_sq = _distance_sq(A, B, weight, prior_mean)
    factors = KroneckerFactors(A=A, B=B, n=num_data, prior_precision=prior_precision)
    A_damped, B_damped = factors.damped()
    num_parameters = A.shape[0] * B.shape[0]
    return (
        -0.5 * prior_precision * distance_sq
        + 0.5 * num_parameters * math.log(prior_precision)
        - 0.5 * kron_logdet(A_damped, B_damped)
    )


def optimize_prior_precision(
    A: Tensor,
    B: Tensor,
    *,
    num_data: float,
    weight: Tensor,
    prior_mean: Tensor | None = None,
    bounds: tuple[float, float] = (1e-4, 1e8),
    grid_size: int = 65,
    max_iterations: int = 100,
) -> float:
    """Choose ``λ`` by maximising the Laplace log evidence over ``log λ``.

    The eigenvalues ``a_i`` of ``A`` and ``b_j`` of ``B`` are computed once, so that
    ``log det A' = Σ_i log(√n a_i + √λ)`` costs ``O(p)`` per candidate. A grid of
    ``grid_size`` points spaced evenly in ``log λ`` over ``bounds`` finds the best interval,
    and a bounded Brent search of at most ``max_iterations`` steps refines it. Candidates for
    which a damped factor is not positive definite score ``−inf``.

    Parameters
    ----------
    A : Tensor, shape (p, p)
        Input-side factor.
    B : Tensor, shape (D, D)
        Output-side factor.
    num_data : float
        Effective number of data points ``n``.
    weight : Tensor, shape (D, p)
        Posterior mean ``W*``.
    prior_mean : Tensor, shape (D, p), optional
        Prior mean ``W₀``; zero when None.
    bounds : tuple of float
        Smallest and largest ``λ`` considered.
    grid_size : int
        Number of grid points, at least 3.
    max_iterations : int
        Maximum number of Brent iterations.

    Returns
    -------
    float
        The maximising ``λ``.

    Raises
    ------
    NumericalError
        When the evidence is not finite anywhere on the grid or at the result.
    """
    num_data = check_positive("num_data", num_data)
    low, high = (check_positive("bounds[0]", bounds[0]), check_positive("bounds[1]", bounds[1]))
    if low >= high:
        raise InputError(f"bounds must be increasing, got {bounds!r}")
    if check_positive_int("grid_size", grid_size) < 3:
        raise InputError(f"grid_size must be at least 3, got {grid_size}")
    check_positive_int("max_iterations", max_iterations)

    distance_sq = float(_distance_sq(A, B, weight, prior_mean))
    eigenvalues_A = torch.linalg.eigvalsh(symmetrize(A.to(torch.float64))).cpu().numpy()
    eigenvalues_B = torch.linalg.eigvalsh(symmetrize(B.to(torch.float64))).cpu().numpy()

    def negative_evidence(log_precision: float) -> float:
        value = _log_evidence_from_eigenvalues(
            log_precision, eigenvalues_A, eigenvalues_B, num_data, distance_sq
        )
        return -value if math.isfinite(value) else math.inf

    # 1. Coarse grid over log λ.
    grid = np.linspace(math.log(low), math.log(high), grid_size)
    values = np.array([-negative_evidence(point) for point in grid])
    if not np.isfinite(values).any():
        raise NumericalError(
            f"the log evidence is not finite for any λ in {bounds}. Check that A and B are "
            "finite and that the bounds keep the damped factors positive definite"
        )
    best = int(np.nanargmax(np.where(np.isfinite(values), values, -np.inf)))
    if best in (0, grid_size - 1):
        logger.warning(
            "The evidence is largest at the bound λ=%.3g of %s. Widen the bounds",
            math.exp(grid[best]),
            bounds,
        )

    # 2. Brent refinement between the neighbours of the best grid point.
    left = grid[max(best - 1, 0)]
    right = grid[min(best + 1, grid_size - 1)]
    result = optimize.minimize_scalar(
        negative_evidence,
        bounds=(left, right),
        method="bounded",
        options={"maxiter": max_iterations, "xatol": 1e-10},
    )
    log_precision = float(result.x) if -result.fun >= values[best] else float(grid[best])
    prior_precision = math.exp(log_precision)
    evidence = -negative_evidence(log_precision)
    if not (math.isfinite(prior_precision) and math.isfinite(evidence)):
        raise NumericalError(
            f"the prior precision search ended at the non-finite λ={prior_precision!r} with "
            f"log evidence {evidence!r}. Check A, B and the weight for extreme values"
        )
    logger.info(
        "Chose prior precision λ=%.6g (log evidence %.6g, n=%g)",
        prior_precision,
        evidence,
        num_data,
    )
    return prior_precision


def with_optimized_prior_precision(
    factors: KroneckerFactors,
    weight: Tensor,
    *,
    prior_mean: Tensor | None = None,
    bounds: tuple[float, float] = (1e-4, 1e8),
) -> KroneckerFactors:
    """Return ``factors`` with ``λ`` replaced by the one that maximises the evidence."""
    prior_precision = optimize_prior_precision(
        factors.A,
        factors.B,
        num_data=factors.n,
        weight=weight,
        prior_mean=prior_mean,
        bounds=bounds,
    )
    return factors.with_prior_precision(prior_precision)


def _log_evidence_from_eigenvalues(
    log_precision: float,
    eigenvalues_A: np.ndarray,
    eigenvalues_B: np.ndarray,
    num_data: float,
    distance_sq: float,
) -> float:
    precision = math.exp(log_precision)
    sqrt_precision = math.exp(0.5 * log_precision)
    sqrt_n = math.sqrt(num_data)
    damped_A = sqrt_n * eigenvalues_A + sqrt_precision
    damped_B = sqrt_n * eigenvalues_B + sqrt_precision
    if damped_A.min() <= 0 or damped_B.min() <= 0:
        return -math.inf
    p, D = eigenvalues_A.size, eigenvalues_B.size
    logdet = D * np.log(damped_A).sum() + p * np.log(damped_B).sum()
    return float(-0.5 * precision * distance_sq + 0.5 * p * D * log_precision - 0.5 * logdet)


def _distance_sq(A: Tensor, B: Tensor, weight: Tensor, prior_mean: Tensor | None) -> Tensor:
    check_tensor("A", A, ndim=2)
    check_tensor("B", B, ndim=2)
    check_tensor("weight", weight, ndim=2)
    check_shape("weight", weight, (B.shape[0], A.shape[0]))
    difference = weight.to(torch.float64)
    if prior_mean is not None:
        check_tensor("prior_mean", prior_mean, ndim=2)
        check_shape("prior_mean", prior_mean, tuple(weight.shape))
        difference = difference - prior_mean.to(device=weight.device, dtype=torch.float64)
    return (difference**2).sum()


def _logdet_spd(matrix: Tensor, name: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(symmetrize(matrix.to(torch.float64)))
    if int(info) != 0:
        raise NumericalError(
            f"{name} ({matrix.shape[0]}x{matrix.shape[1]}) is not positive definite, so its "
            "log-determinant is undefined. Increase the damping or check the factor"
        )
    return 2.0 * torch.log(factor.diagonal()).sum()

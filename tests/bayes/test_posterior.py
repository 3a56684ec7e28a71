"""Tests of the matrix-normal projection posterior."""

from __future__ import annotations

import logging

import pytest
import torch

from annotator.bayes.factors import KroneckerFactors
from annotator.bayes.linalg import cholesky_with_jitter
from annotator.bayes.posterior import ProjectionPosterior
from annotator.errors import InputError, NumericalError

from .helpers import random_spd


def _posterior(p=5, D=3, *, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    factors = KroneckerFactors(
        A=random_spd(p, generator=generator, scale=2.0),
        B=random_spd(D, generator=generator, scale=0.5),
        n=4.0,
        prior_precision=9.0,
    )
    weight = torch.randn(D, p, generator=generator, dtype=torch.float64)
    return ProjectionPosterior(weight.to(device), factors), factors, weight


def test_input_variance_matches_solve(device):
    posterior, factors, _ = _posterior(device=device)
    A_damped, _ = factors.damped()
    features = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    variance = posterior.input_variance(features.to(device), chunk_size=4)

    reference = (features * torch.linalg.solve(A_damped, features.T).T).sum(-1)
    assert variance.device.type == device.type
    torch.testing.assert_close(variance.cpu(), reference, rtol=1e-10, atol=1e-12)


def test_embedding_moments_formula(device):
    posterior, factors, weight = _posterior(device=device)
    A_damped, B_damped = factors.damped()
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    offsets = torch.randn(7, 3, generator=generator, dtype=torch.float64)

    mean, variance = posterior.embedding_moments(
        features.to(device), offsets.to(device), chunk_size=3
    )

    scale = (features * torch.linalg.solve(A_damped, features.T).T).sum(-1)
    profile = torch.linalg.inv(B_damped).diagonal()
    torch.testing.assert_close(mean.cpu(), features @ weight.T + offsets)
    torch.testing.assert_close(variance.cpu(), scale[:, None] * profile[None, :])


def test_moments_float32_inputs_stay_float32():
    posterior, _, _ = _posterior()
    features = torch.randn(4, 5)

    mean, variance = posterior.embedding_moments(features)

    assert mean.dtype == torch.float32
    assert variance.dtype == torch.float32
    reference_mean, reference_variance = posterior.embedding_moments(features.double())
    torch.testing.assert_close(mean.double(), reference_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance.double(), reference_variance, rtol=1e-5, atol=1e-6)


def test_weight_draws_use_cholesky_colouring():
    posterior, factors, weight = _posterior()
    A_damped, B_damped = factors.damped()

    draws = posterior.sample_weights(3, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)
    noise = torch.stack(
        [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(3)]
    )
    cholesky_A = torch.linalg.cholesky(A_damped)
    cholesky_B = torch.linalg.cholesky(B_damped)
    expected = weight + torch.linalg.solve_triangular(
        cholesky_B.T, noise, upper=True
    ) @ torch.linalg.inv(cholesky_A)
    torch.testing.assert_close(draws, expected, rtol=1e-10, atol=1e-10)


def test_weight_draws_embedding_covariance():
    posterior, factors, weight = _posterior(p=3, D=2)
    A_damped, B_damped = factors.damped()
    features = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    draws = posterior.sample_weights(20_000, torch.Generator().manual_seed(6))
    embeddings = draws @ features  # (S, D)

    expected = (features @ torch.linalg.solve(A_damped, features)) * torch.linalg.inv(B_damped)
    mean_error = (embeddings.mean(0) - weight @ features).abs()
    assert bool((mean_error < 4 * (expected.diagonal() / 20_000).sqrt()).all())
    # The standard error of a sample covariance is about √((σ_ii σ_jj + σ_ij²) / S).
    diagonal = expected.diagonal()
    standard_error = ((torch.outer(diagonal, diagonal) + expected**2) / 20_000).sqrt()
    error = (torch.cov(embeddings.T) - expected).abs()
    assert bool((error < 4 * standard_error).all())


def test_posterior_covariances_invert_damped_factors():
    posterior, factors, _ = _posterior()
    A_damped, B_damped = factors.damped()

    torch.testing.assert_close(posterior.input_covariance @ A_damped, torch.eye(5).double())
    torch.testing.assert_close(posterior.output_covariance @ B_damped, torch.eye(3).double())
    torch.testing.assert_close(
        posterior.output_variance, torch.linalg.inv(B_damped).diagonal(), rtol=1e-10, atol=0
    )


def test_posterior_rejects_bad_shapes():
    posterior, factors, weight = _posterior()
    with pytest.raises(InputError, match="weight"):
        ProjectionPosterior(weight.T, factors)
    with pytest.raises(InputError, match="width 4"):
        posterior.input_variance(torch.ones(2, 4))
    with pytest.raises(InputError, match="offsets"):
        posterior.embedding_moments(torch.ones(2, 5), torch.ones(3, 3))
    with pytest.raises(InputError, match="non-finite"):
        posterior.input_variance(torch.full((2, 5), float("nan")))


def test_posterior_rejects_indefinite_factor():
    factors = KroneckerFactors(
        A=-100.0 * torch.eye(2, dtype=torch.float64),
        B=torch.eye(2, dtype=torch.float64),
        n=1.0,
        prior_precision=1.0,
    )
    with pytest.raises(NumericalError, match="not positive definite"):
        ProjectionPosterior(torch.ones(2, 2), factors)


def test_cholesky_jitter_retry_is_logged(caplog):
    singular = torch.ones(3, 3, dtype=torch.float64)

    with caplog.at_level(logging.WARNING, logger="annotator.bayes.linalg"):
        factor = cholesky_with_jitter(singular, name="test matrix")

    assert "jitter" in caplog.text
    torch.testing.assert_close(factor @ factor.T, singular, rtol=0, atol=1e-4)

"""Tests of the Kronecker log-determinant and the prior precision by evidence."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from annotator.bayes.factors import KroneckerFactors
from annotator.bayes.prior import (
    kron_logdet,
    log_evidence,
    optimize_prior_precision,
    with_optimized_prior_precision,
)
from annotator.errors import InputError, NumericalError

from .helpers import random_spd


def test_kron_logdet_matches_dense():
    generator = torch.Generator().manual_seed(0)
    A = random_spd(4, generator=generator, scale=3.0)
    B = random_spd(3, generator=generator, scale=0.5)

    dense = torch.logdet(torch.kron(A, B))

    torch.testing.assert_close(kron_logdet(A, B), dense, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(kron_logdet(B, A), dense, rtol=1e-12, atol=1e-10)


def test_kron_logdet_rejects_indefinite():
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(NumericalError, match="not positive definite"):
        kron_logdet(indefinite, torch.eye(2, dtype=torch.float64))


def test_log_evidence_matches_dense_formula():
    generator = torch.Generator().manual_seed(1)
    A = random_spd(4, generator=generator)
    B = random_spd(3, generator=generator)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    prior_mean = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    precision, n = 2.5, 7.0

    value = log_evidence(precision, A, B, num_data=n, weight=weight, prior_mean=prior_mean)

    damped_A = math.sqrt(n) * A + math.sqrt(precision) * torch.eye(4, dtype=torch.float64)
    damped_B = math.sqrt(n) * B + math.sqrt(precision) * torch.eye(3, dtype=torch.float64)
    expected = (
        -0.5 * precision * ((weight - prior_mean) ** 2).sum()
        + 0.5 * 12 * math.log(precision)
        - 0.5 * torch.logdet(torch.kron(damped_A, damped_B))
    )
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-10)


def test_optimum_agrees_with_fine_grid():
    generator = torch.Generator().manual_seed(2)
    A = random_spd(6, generator=generator, scale=4.0)
    B = random_spd(5, generator=generator, scale=2.0)
    weight = 0.1 * torch.randn(5, 6, generator=generator, dtype=torch.float64)
    n = 50.0

    optimum = optimize_prior_precision(A, B, num_data=n, weight=weight, bounds=(1e-3, 1e6))

    def evidence(log_precision):
        return float(log_evidence(math.exp(log_precision), A, B, num_data=n, weight=weight))

    # A coarse grid over the whole range, then a fine one around its best point.
    coarse = np.linspace(math.log(1e-3), math.log(1e6), 201)
    coarse_best = coarse[int(np.argmax([evidence(t) for t in coarse]))]
    coarse_step = coarse[1] - coarse[0]
    fine = np.linspace(coarse_best - 2 * coarse_step, coarse_best + 2 * coarse_step, 201)
    values = [evidence(t) for t in fine]
    grid_best = fine[int(np.argmax(values))]
    step = fine[1] - fine[0]
    assert abs(math.log(optimum) - grid_best) <= step
    best_value = float(log_evidence(optimum, A, B, num_data=n, weight=weight))
    assert best_value >= max(values) - 1e-9


def test_optimum_moves_with_weight_norm():
    generator = torch.Generator().manual_seed(3)
    A = random_spd(4, generator=generator)
    B = random_spd(4, generator=generator)
    weight = torch.randn(4, 4, generator=generator, dtype=torch.float64)

    small = optimize_prior_precision(A, B, num_data=10.0, weight=0.1 * weight)
    large = optimize_prior_precision(A, B, num_data=10.0, weight=10.0 * weight)

    assert small > large


def test_optimum_at_bound_is_logged(caplog):
    generator = torch.Generator().manual_seed(4)
    A = random_spd(3, generator=generator)
    B = random_spd(3, generator=generator)
    weight = 1e-3 * torch.randn(3, 3, generator=generator, dtype=torch.float64)

    with caplog.at_level(logging.WARNING, logger="annotator.bayes.prior"):
        optimize_prior_precision(A, B, num_data=1.0, weight=weight, bounds=(1e-2, 1.0))

    assert "at the bound" in caplog.text


def test_optimize_raises_when_never_finite():
    B = torch.diag(torch.tensor([1.0, -10.0], dtype=torch.float64))
    A = torch.eye(2, dtype=torch.float64)
    weight = torch.ones(2, 2, dtype=torch.float64)

    with pytest.raises(NumericalError, match="not finite"):
        optimize_prior_precision(A, B, num_data=1.0, weight=weight, bounds=(1e-3, 1.0))


def test_optimize_rejects_bad_arguments():
    A = torch.eye(2, dtype=torch.float64)
    weight = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(InputError, match="increasing"):
        optimize_prior_precision(A, A, num_data=1.0, weight=weight, bounds=(10.0, 1.0))
    with pytest.raises(InputError, match="weight"):
        optimize_prior_precision(A, A, num_data=1.0, weight=torch.ones(3, 2))
    with pytest.raises(InputError, match="num_data"):
        optimize_prior_precision(A, A, num_data=0.0, weight=weight)


def test_with_optimized_prior_precision_replaces_lambda():
    generator = torch.Generator().manual_seed(5)
    factors = KroneckerFactors(
        A=random_spd(3, generator=generator),
        B=random_spd(2, generator=generator),
        n=5.0,
        prior_precision=1.0,
    )
    weight = 0.3 * torch.randn(2, 3, generator=generator, dtype=torch.float64)

    updated = with_optimized_prior_precision(factors, weight)

    expected = optimize_prior_precision(factors.A, factors.B, num_data=5.0, weight=weight)
    assert updated.prior_precision == pytest.approx(expected)
    assert updated.n == 5.0

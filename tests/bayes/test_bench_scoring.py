"""Tests of the scoring benchmark on tiny sizes: it runs and its numbers are consistent."""

from __future__ import annotations

import math

import pytest
import torch

from annotator.bayes.prior import optimize_prior_precision
from annotator.bench.scoring import (
    PUBLISHED_PRIOR_PRECISION,
    _measure,
    format_markdown,
    measure_cosine_approximation,
    realistic_projection,
    run_scoring_benchmark,
)


def test_realistic_weight_norm_maximises_evidence():
    generator = torch.Generator().manual_seed(0)

    posterior, input_factor = realistic_projection(48, 32, generator=generator)

    factors = posterior.factors
    chosen = optimize_prior_precision(
        factors.A, factors.B, num_data=factors.n, weight=posterior.weight, bounds=(1.0, 1e6)
    )
    assert chosen == pytest.approx(PUBLISHED_PRIOR_PRECISION, rel=1e-4)
    torch.testing.assert_close(input_factor, factors.A.double())


def test_scoring_benchmark_tiny_run():
    table = run_scoring_benchmark(
        pool_sizes=(300,),
        class_counts=(5, 12),
        feature_dim=48,
        embed_dim=32,
        num_samples=8,
        mc_subset=100,
        device="cpu",
    )

    assert list(table["pool"]) == [300, 300]
    assert list(table["classes"]) == [5, 12]
    assert list(table["mc_subset"]) == [100, 100]
    for column in ("method_s", "floor_s", "sampling_s", "mc_s", "mc_draws_s"):
        assert bool((table[column] > 0).all()), column
    assert bool(table["spearman_bald"].between(-1, 1).all())
    assert bool(table["spearman_mc_repeat"].between(-1, 1).all())
    assert table.attrs["factors"] == "synthetic"
    markdown = format_markdown(table)
    assert markdown.splitlines()[2].startswith("| 300 | 5 |")


def test_cosine_measurement_tiny_run():
    table = measure_cosine_approximation(
        embed_dim=32,
        feature_dim=48,
        text_dim=40,
        num_images=6,
        num_classes=3,
        num_draws=400,
        device="cpu",
    )

    assert list(table["text_side"]) == ["fixed", "random"]
    assert list(table["pairs"]) == [18, 18]
    assert table["mc_std_rel_se"].iloc[0] == pytest.approx(1 / math.sqrt(800))
    # The approximation tracks Monte Carlo to within tens of percent even at D = 32.
    assert bool((table["std_rel_error_median"] < 0.5).all())
    assert bool((table["mean_error_in_std_mean"] < 1.0).all())


def test_cpu_peak_memory_sees_allocation():
    def allocate():
        block = torch.ones(50 * 2**20)  # 200 MiB of float32, written, so it is resident
        return block.sum()

    _, measurement = _measure(torch.device("cpu"), allocate)

    assert measurement.peak_bytes >= 190 * 2**20

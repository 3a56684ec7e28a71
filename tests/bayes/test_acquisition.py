"""Tests of the predictive quantities, the pool scores and batch selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from annotator.bayes.acquisition import (
    LogitSampling,
    Strategy,
    score_pool,
    select_batch,
    truncate_logit_moments,
)
from annotator.bayes.factors import KroneckerFactors
from annotator.bayes.head import fit_head
from annotator.bayes.posterior import ProjectionPosterior
from annotator.bayes.predictive import (
    bald,
    bald_from_logits,
    entropy,
    epig,
    expected_entropy,
    margin,
    predictive_entropy,
    probit_probabilities,
    sample_logits,
)
from annotator.bayes.zeroshot import ZeroShotPosterior
from annotator.errors import InputError

from .helpers import random_spd

P, D, C = 8, 16, 4


def _zero_shot(prior_precision=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    factors = KroneckerFactors(
        A=random_spd(P, generator=generator),
        B=random_spd(D, generator=generator),
        n=prior_precision,
        prior_precision=prior_precision,
    )
    weight = torch.randn(D, P, generator=generator, dtype=torch.float64)
    classes = torch.randn(C, D, generator=generator, dtype=torch.float64)
    image = ProjectionPosterior(weight, factors)
    return ZeroShotPosterior(image, class_embeddings=classes, logit_scale=20.0)


def _pool(N=30, seed=1):
    return torch.randn(N, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_probit_formula():
    mean = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    variance = torch.tensor([[0.0, 4.0, 1.0]], dtype=torch.float64)

    probabilities = probit_probabilities(mean, variance)

    expected = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variance), dim=-1)
    torch.testing.assert_close(probabilities, expected)


def test_probit_close_to_monte_carlo_for_two_classes():
    # For two classes with one random logit the probit approximation is accurate to ~0.02.
    mean = torch.tensor([[1.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)
    variance = torch.tensor([[3.0, 0.0], [1.0, 0.0]], dtype=torch.float64)

    logits = sample_logits(mean, variance, 200_000, torch.Generator().manual_seed(2))
    monte_carlo = torch.softmax(logits, dim=-1).mean(0)

    torch.testing.assert_close(probit_probabilities(mean, variance), monte_carlo, rtol=0, atol=0.02)


def test_entropy_treats_zero_probability_as_zero():
    probabilities = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)

    values = entropy(probabilities)

    torch.testing.assert_close(values, torch.tensor([0.0, math.log(2)], dtype=torch.float64))


def test_bald_decomposition_and_sign():
    logits = torch.randn(64, 50, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    probabilities = torch.softmax(3 * logits, dim=-1)

    information = bald(probabilities)

    torch.testing.assert_close(
        information, predictive_entropy(probabilities) - expected_entropy(probabilities)
    )
    assert float(information.min()) >= -1e-12


def test_bald_from_logits_matches_probabilities():
    logits = torch.randn(32, 9, 5, generator=torch.Generator().manual_seed(15), dtype=torch.float64)

    torch.testing.assert_close(bald_from_logits(4 * logits), bald(torch.softmax(4 * logits, -1)))


def test_margin_of_top_two():
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2]])

    torch.testing.assert_close(margin(probabilities), torch.tensor([0.7, 1.0]))


def test_epig_matches_slow_reference():
    generator = torch.Generator().manual_seed(4)
    pool = torch.softmax(torch.randn(7, 3, 4, generator=generator, dtype=torch.float64), -1)
    targets = torch.softmax(torch.randn(7, 5, 4, generator=generator, dtype=torch.float64), -1)

    values = epig(pool, targets)

    expected = torch.zeros(3, dtype=torch.float64)
    for n in range(3):
        for m in range(5):
            joint = torch.einsum("sc,sd->cd", pool[:, n], targets[:, m]) / 7
            product = torch.outer(joint.sum(1), joint.sum(0))
            expected[n] += (joint * torch.log(joint / product)).sum() / 5
    torch.testing.assert_close(values, expected)


def test_epig_shared_versus_factorised():
    posterior = _zero_shot()
    pool = _pool(N=20)
    targets = _pool(N=40, seed=5)
    # The plug-in estimate of a zero mutual information has a bias of about (C − 1)² / 2S.
    num_samples = 2000

    shared = score_pool(
        posterior,
        pool,
        "epig",
        target_features=targets,
        num_samples=num_samples,
        generator=torch.Generator().manual_seed(6),
    )

    # The same marginals sampled independently per logit and per image.
    generator = torch.Generator().manual_seed(7)
    pool_mean, pool_variance = posterior.logit_moments(pool)
    target_mean, target_variance = posterior.logit_moments(targets)
    pool_probabilities = torch.softmax(
        sample_logits(pool_mean, pool_variance, num_samples, generator), -1
    )
    target_probabilities = torch.softmax(
        sample_logits(target_mean, target_variance, num_samples, generator), -1
    )
    factorised = epig(pool_probabilities, target_probabilities)

    assert float(shared.min()) > -1e-9
    assert float(shared.mean()) > 0.01
    assert float(factorised.abs().mean()) < 0.1 * float(shared.mean())


@pytest.mark.parametrize("strategy", list(Strategy))
def test_score_pool_every_strategy(strategy, device):
    posterior = _zero_shot()
    pool = _pool().to(device)

    scores = score_pool(
        posterior, pool, strategy, num_samples=32, generator=torch.Generator().manual_seed(8)
    )

    assert scores.shape == (30,)
    assert scores.device.type == device.type
    assert bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("sampling", list(LogitSampling))
def test_bald_non_negative_for_every_sampling(sampling):
    posterior = _zero_shot()

    scores = score_pool(
        posterior,
        _pool(),
        "bald",
        num_samples=64,
        generator=torch.Generator().manual_seed(9),
        sampling=sampling,
    )

    assert float(scores.min()) >= -1e-12
    assert float(scores.max()) > 0.0


def test_bald_grows_with_posterior_variance():
    pool = _pool()
    generator_seed = 10

    broad = score_pool(
        _zero_shot(prior_precision=0.01),
        pool,
        "bald",
        generator=torch.Generator().manual_seed(generator_seed),
    )
    narrow = score_pool(
        _zero_shot(prior_precision=100.0),
        pool,
        "bald",
        generator=torch.Generator().manual_seed(generator_seed),
    )

    assert float(broad.mean()) > 10 * float(narrow.mean())


def test_deterministic_scores_ignore_chunking():
    posterior = _zero_shot()
    pool = _pool()

    for strategy in ("entropy", "margin", "variance"):
        whole = score_pool(posterior, pool, strategy, chunk_size=100)
        chunked = score_pool(posterior, pool, strategy, chunk_size=7)
        torch.testing.assert_close(whole, chunked)


def test_map_scores_match_definitions():
    posterior = _zero_shot()
    pool = _pool()
    probabilities = torch.softmax(posterior.map_logits(pool), dim=-1)
    _, variance = posterior.logit_moments(pool)

    torch.testing.assert_close(score_pool(posterior, pool, "entropy"), entropy(probabilities))
    torch.testing.assert_close(score_pool(posterior, pool, "margin"), margin(probabilities))
    torch.testing.assert_close(score_pool(posterior, pool, "variance"), variance.sum(-1))


def test_score_pool_with_head_posterior():
    posterior = _zero_shot()
    labelled = _pool(N=12, seed=11)
    labels = torch.randint(0, C, (12,), generator=torch.Generator().manual_seed(12))
    head = fit_head(posterior, labelled, labels)

    for strategy in ("bald", "epig", "predictive-entropy"):
        scores = score_pool(
            head, _pool(), strategy, num_samples=32, generator=torch.Generator().manual_seed(13)
        )
        assert bool(torch.isfinite(scores).all())
        assert float(scores.min()) > -1e-9


def test_score_pool_rejects_bad_requests():
    posterior = _zero_shot()
    labelled = _pool(N=3, seed=14)
    head = fit_head(posterior, labelled, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="Generator"):
        score_pool(posterior, _pool(), "bald")
    with pytest.raises(InputError, match="unknown strategy"):
        score_pool(posterior, _pool(), "uncertainty")
    with pytest.raises(InputError, match="cannot sample embeddings"):
        score_pool(head, _pool(), "bald", generator=torch.Generator(), sampling="embedding")
    with pytest.raises(InputError, match="target_features"):
        score_pool(
            posterior,
            _pool(),
            "epig",
            target_features=torch.ones(3, P + 1),
            generator=torch.Generator(),
        )


def test_strategy_default_selection():
    assert Strategy.POWER_BALD.default_selection == "power"
    assert Strategy.BALD.default_selection == "top-k"
    assert Strategy("predictive-entropy") is Strategy.PREDICTIVE_ENTROPY


def test_top_k_order_and_ties():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])

    selected = select_batch(scores, 4)

    assert selected.tolist() == [1, 3, 0, 2]
    assert selected.dtype == torch.int64


def test_selection_skips_excluded_and_nan():
    scores = torch.tensor([float("nan"), 0.2, 5.0, float("inf"), 0.3])
    exclude = torch.tensor([False, False, True, False, False])

    selected = select_batch(scores, 5, exclude=exclude)

    assert selected.tolist() == [4, 1, 0, 3]


def test_selection_returns_fewer_when_pool_runs_dry():
    scores = torch.tensor([0.1, 0.2, 0.3])
    exclude = torch.tensor([True, False, True])

    assert select_batch(scores, 3, exclude=exclude).tolist() == [1]
    assert select_batch(scores, 0).tolist() == []


def test_power_selection_is_reproducible_and_proportional():
    scores = torch.tensor([1.0, 3.0, 0.0])
    first_picks = torch.stack(
        [
            select_batch(scores, 1, method="power", generator=torch.Generator().manual_seed(i))
            for i in range(4000)
        ]
    ).flatten()

    again = select_batch(scores, 3, method="power", generator=torch.Generator().manual_seed(0))
    once = select_batch(scores, 3, method="power", generator=torch.Generator().manual_seed(0))

    assert again.tolist() == once.tolist()
    assert again[-1].item() == 2  # a zero score is picked last
    share = float((first_picks == 1).double().mean())
    # P(index 1 first) = 3 / 4, with standard error √(0.75 · 0.25 / 4000) ≈ 0.007.
    assert abs(share - 0.75) < 0.03
    assert int((first_picks == 2).sum()) == 0


def test_power_selection_beta_sharpens():
    scores = torch.tensor([1.0, 2.0])
    picks = [
        select_batch(
            scores, 1, method="power", beta=4.0, generator=torch.Generator().manual_seed(i)
        ).item()
        for i in range(2000)
    ]
    # P(index 1) = 2⁴ / (1 + 2⁴) = 16 / 17.
    assert abs(picks.count(1) / 2000 - 16 / 17) < 0.025


def test_select_batch_rejects_bad_arguments():
    scores = torch.tensor([0.1, 0.2])
    with pytest.raises(InputError, match="Generator"):
        select_batch(scores, 1, method="power")
    with pytest.raises(InputError, match="method"):
        select_batch(scores, 1, method="best")
    with pytest.raises(InputError, match="k must"):
        select_batch(scores, -1)
    with pytest.raises(InputError, match="exclude"):
        select_batch(scores, 1, exclude=torch.tensor([True]))
    with pytest.raises(InputError, match="beta"):
        select_batch(scores, 1, method="power", beta=0.0, generator=torch.Generator())


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(min_value=-10, max_value=10),
            st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1.0]),
        ),
        min_size=1,
        max_size=30,
    ),
    excluded=st.lists(st.booleans(), min_size=30, max_size=30),
    k=st.integers(min_value=0, max_value=35),
    method=st.sampled_from(["top-k", "power"]),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_selection_properties(values, excluded, k, method, seed):
    scores = torch.tensor(values, dtype=torch.float64)
    exclude = torch.tensor(excluded[: len(values)])
    generator = torch.Generator().manual_seed(seed)

    selected = select_batch(scores, k, method=method, exclude=exclude, generator=generator)

    selectable = int((~exclude).sum())
    assert len(selected) == min(k, selectable)
    assert len(set(selected.tolist())) == len(selected)
    assert not bool(exclude[selected].any())
    # Every finite selectable score outranks every non-finite one.
    is_finite = torch.isfinite(scores[selected])
    if bool((~is_finite).any()):
        first_non_finite = int((~is_finite).nonzero()[0])
        assert bool(is_finite[:first_non_finite].all())
        assert not bool(is_finite[first_non_finite:].any())
        finite_selectable = int((torch.isfinite(scores) & ~exclude).sum())
        assert first_non_finite == finite_selectable
    if method == "top-k":
        finite_scores = scores[selected][is_finite]
        assert bool((finite_scores[:-1] >= finite_scores[1:]).all())


def test_empty_pool_scores_and_selection():
    posterior = _zero_shot()
    empty = torch.zeros(0, P, dtype=torch.float64)

    scores = score_pool(posterior, empty, "bald", generator=torch.Generator())
    mean, variance = posterior.logit_moments(empty)

    assert scores.shape == (0,)
    assert mean.shape == (0, C)
    assert variance.shape == (0, C)
    assert select_batch(scores, 5).tolist() == []


def test_truncated_moments_keep_top_and_merge_rest():
    mean = torch.tensor([[3.0, 0.0, -1.0, 2.0, -5.0]], dtype=torch.float64)
    variance = torch.tensor([[0.1, 0.1, 9.0, 0.1, 0.1]], dtype=torch.float64)

    kept_mean, kept_variance = truncate_logit_moments(mean, variance, 3)

    # Upper bounds mean + 3 sd: 3.95, 0.95, 8.0, 2.95, -4.05, so classes 2, 0 and 3 stay.
    assert kept_mean[0, :3].tolist() == [-1.0, 3.0, 2.0]
    assert kept_variance[0, :3].tolist() == [9.0, 0.1, 0.1]
    assert float(kept_variance[0, 3]) == 0.0
    merged = torch.softmax(kept_mean, -1)[0, 3]
    expected = torch.softmax(mean, -1)[0, [1, 4]].sum()
    assert float(merged) == pytest.approx(float(expected), rel=1e-12)


def test_truncated_bald_close_to_full_with_many_classes():
    generator = torch.Generator().manual_seed(3)
    classes, dim = 200, 16
    factors = KroneckerFactors(
        A=random_spd(P, generator=generator),
        B=random_spd(dim, generator=generator),
        n=20.0,
        prior_precision=20.0,
    )
    weight = torch.randn(dim, P, generator=generator, dtype=torch.float64)
    embeddings = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    posterior = ZeroShotPosterior(
        ProjectionPosterior(weight, factors), class_embeddings=embeddings, logit_scale=30.0
    )
    pool = _pool(N=200, seed=4)

    def scores(sampled_classes):
        return score_pool(
            posterior,
            pool,
            "bald",
            num_samples=2000,
            generator=torch.Generator().manual_seed(5),
            sampled_classes=sampled_classes,
        )

    full, truncated = scores(None), scores(16)
    # A posterior that spreads each image over a few of the 200 classes, as after training.
    assert 0.05 < float(full.mean()) < 1.0

    # Merging classes can only lower the mutual information (up to sampling error).
    assert float((truncated - full).max()) < 0.02
    assert float((full - truncated).abs().mean()) < 0.05 * float(full.mean())
    ranks = lambda x: x.argsort().argsort().double()  # noqa: E731
    assert float(torch.corrcoef(torch.stack([ranks(full), ranks(truncated)]))[0, 1]) > 0.95

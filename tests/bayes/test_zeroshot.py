"""Tests of the zero-shot logit posterior."""

from __future__ import annotations

import pytest
import torch

from annotator.bayes.factors import KroneckerFactors
from annotator.bayes.interface import LogitPosterior, WeightDraws
from annotator.bayes.moments import cosine_moments
from annotator.bayes.posterior import ProjectionPosterior
from annotator.bayes.zeroshot import ZeroShotPosterior
from annotator.errors import InputError

from .helpers import random_spd

P, Q, D, C = 6, 5, 4, 3


def _projection(input_dim, seed, prior_precision=4.0):
    generator = torch.Generator().manual_seed(seed)
    factors = KroneckerFactors(
        A=random_spd(input_dim, generator=generator, scale=3.0),
        B=random_spd(D, generator=generator),
        n=2.0,
        prior_precision=prior_precision,
    )
    weight = torch.randn(D, input_dim, generator=generator, dtype=torch.float64)
    return ProjectionPosterior(weight, factors)


def _zero_shot(random_text: bool, *, bias=None, prior_precision=4.0):
    image = _projection(P, 0, prior_precision)
    generator = torch.Generator().manual_seed(1)
    if random_text:
        text = _projection(Q, 2, prior_precision)
        features = torch.randn(C, Q, generator=generator, dtype=torch.float64)
        return ZeroShotPosterior(
            image, class_features=features, text=text, logit_scale=10.0, logit_bias=bias
        )
    classes = torch.randn(C, D, generator=generator, dtype=torch.float64)
    return ZeroShotPosterior(image, class_embeddings=classes, logit_scale=10.0, logit_bias=bias)


def _pool(N=9, seed=3, with_offsets=False):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, P, generator=generator, dtype=torch.float64)
    offsets = torch.randn(N, D, generator=generator, dtype=torch.float64) if with_offsets else None
    return features, offsets


@pytest.mark.parametrize("random_text", [False, True])
@pytest.mark.parametrize("with_offsets", [False, True])
def test_logit_moments_match_reference(random_text, with_offsets, device):
    posterior = _zero_shot(random_text, bias=-1.5 if with_offsets else None)
    features, offsets = _pool(with_offsets=with_offsets)

    mean, variance = posterior.logit_moments(
        features.to(device), None if offsets is None else offsets.to(device), chunk_size=4
    )

    mean_g, variance_g = posterior.image.embedding_moments(features, offsets)
    variance_h = None
    if random_text:
        _, variance_h = posterior.text.embedding_moments(posterior.class_features)
    mean_cos, variance_cos = cosine_moments(
        mean_g, variance_g, posterior.class_embeddings, variance_h
    )
    bias = 0.0 if posterior.logit_bias is None else posterior.logit_bias
    assert mean.device.type == device.type
    torch.testing.assert_close(mean.cpu(), 10.0 * mean_cos + bias)
    torch.testing.assert_close(variance.cpu(), 100.0 * variance_cos)


def test_map_logits_are_scaled_cosines():
    posterior = _zero_shot(False, bias=0.5)
    features, offsets = _pool(with_offsets=True)

    logits = posterior.map_logits(features, offsets)

    embeddings = features @ posterior.image.weight.T + offsets
    cosines = (
        torch.nn.functional.normalize(embeddings, dim=-1)
        @ torch.nn.functional.normalize(posterior.class_embeddings, dim=-1).T
    )
    torch.testing.assert_close(logits, 10.0 * cosines + 0.5)


def test_moments_approach_map_for_tiny_variance():
    posterior = _zero_shot(True, prior_precision=1e12)
    features, _ = _pool()

    mean, variance = posterior.logit_moments(features)

    torch.testing.assert_close(mean, posterior.map_logits(features), rtol=1e-6, atol=1e-6)
    assert float(variance.max()) < 1e-6


@pytest.mark.parametrize("random_text", [False, True])
def test_sampled_logits_use_shared_draws(random_text, device):
    posterior = _zero_shot(random_text)
    features, offsets = _pool(with_offsets=True)

    draws = posterior.sample_weights(4, torch.Generator().manual_seed(7))
    logits = posterior.sampled_logits(features.to(device), draws, offsets.to(device))

    assert isinstance(draws, WeightDraws)
    assert draws.num_samples == 4
    assert logits.shape == (4, 9, C)
    for index in range(4):
        embeddings = features @ draws.image_weights[index].T + offsets
        expected = (
            10.0
            * torch.nn.functional.normalize(embeddings, dim=-1)
            @ torch.nn.functional.normalize(draws.class_embeddings[index], dim=-1).T
        )
        torch.testing.assert_close(logits[index].cpu(), expected)
    # The same draws give the same logits for a subset of the pool.
    subset = posterior.sampled_logits(features[:3].to(device), draws, offsets[:3].to(device))
    torch.testing.assert_close(subset, logits[:, :3])


def test_class_draws_follow_text_posterior():
    posterior = _zero_shot(True)

    draws = posterior.sample_weights(3, torch.Generator().manual_seed(8))

    text_weights = posterior.text.sample_weights(
        3, _generator_after_image_draws(posterior, 3, seed=8)
    )
    expected = posterior.class_features @ text_weights.transpose(1, 2)
    torch.testing.assert_close(draws.class_embeddings, expected)


def _generator_after_image_draws(posterior, num_samples, *, seed):
    generator = torch.Generator().manual_seed(seed)
    posterior.image.sample_weights(num_samples, generator)
    return generator


def _wide_zero_shot(random_text: bool):
    """Return a posterior with D = 64, where the cosine approximation is within about 10%."""
    generator = torch.Generator().manual_seed(11)
    wide = 64

    def projection(input_dim):
        factors = KroneckerFactors(
            A=random_spd(input_dim, generator=generator, scale=3.0),
            B=random_spd(wide, generator=generator),
            n=2.0,
            prior_precision=400.0,
        )
        weight = torch.randn(wide, input_dim, generator=generator, dtype=torch.float64)
        return ProjectionPosterior(weight, factors)

    image = projection(P)
    if random_text:
        return ZeroShotPosterior(
            image,
            class_features=torch.randn(C, Q, generator=generator, dtype=torch.float64),
            text=projection(Q),
            logit_scale=10.0,
        )
    classes = torch.randn(C, wide, generator=generator, dtype=torch.float64)
    return ZeroShotPosterior(image, class_embeddings=classes, logit_scale=10.0)


@pytest.mark.parametrize("random_text", [False, True])
def test_weight_draws_agree_with_analytic(random_text):
    # Weight-space Monte Carlo and the analytic moments describe the same posterior, up to
    # the error of the cosine approximation.
    posterior = _wide_zero_shot(random_text)
    features, _ = _pool(N=4)

    draws = posterior.sample_weights(2000, torch.Generator().manual_seed(9))
    logits = posterior.sampled_logits(features, draws)
    mean, variance = posterior.logit_moments(features)

    torch.testing.assert_close(logits.mean(0), mean, rtol=0, atol=0.05)
    torch.testing.assert_close(logits.var(0), variance, rtol=0.2, atol=0)


@pytest.mark.parametrize("random_text", [False, True])
def test_embedding_draws_agree_with_analytic(random_text):
    posterior = _wide_zero_shot(random_text)
    features, _ = _pool(N=4)

    logits = posterior.sampled_embedding_logits(features, 2000, torch.Generator().manual_seed(10))
    mean, variance = posterior.logit_moments(features)

    assert logits.shape == (2000, 4, C)
    torch.testing.assert_close(logits.mean(0), mean, rtol=0, atol=0.05)
    torch.testing.assert_close(logits.var(0), variance, rtol=0.2, atol=0)


def test_embedding_draws_follow_diagonal_gaussian():
    posterior = _zero_shot(True, bias=0.5)
    features, offsets = _pool(N=5, with_offsets=True)

    logits = posterior.sampled_embedding_logits(
        features, 2, torch.Generator().manual_seed(12), offsets
    )

    generator = torch.Generator().manual_seed(12)
    mean_g, variance_g = posterior.image.embedding_moments(features, offsets)
    _, variance_h = posterior.text.embedding_moments(posterior.class_features)
    for index in range(2):
        g = mean_g + variance_g.sqrt() * torch.randn(5, D, generator=generator, dtype=torch.float64)
        h = posterior.class_embeddings + variance_h.sqrt() * torch.randn(
            C, D, generator=generator, dtype=torch.float64
        )
        cosines = (
            torch.nn.functional.normalize(g, dim=-1) @ torch.nn.functional.normalize(h, dim=-1).T
        )
        torch.testing.assert_close(logits[index], 10.0 * cosines + 0.5)


def test_float32_pool_computes_in_float32():
    posterior = _zero_shot(False)
    features, _ = _pool()

    mean, variance = posterior.logit_moments(features.float())

    assert mean.dtype == torch.float32
    reference_mean, reference_variance = posterior.logit_moments(features)
    torch.testing.assert_close(mean.double(), reference_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(variance.double(), reference_variance, rtol=1e-4, atol=1e-6)


def test_zero_shot_implements_protocol():
    assert isinstance(_zero_shot(False), LogitPosterior)


def test_zero_shot_rejects_bad_arguments():
    image = _projection(P, 0)
    classes = torch.ones(C, D, dtype=torch.float64)
    with pytest.raises(InputError, match="exactly one"):
        ZeroShotPosterior(image, logit_scale=1.0)
    with pytest.raises(InputError, match="text projection posterior"):
        ZeroShotPosterior(image, class_features=torch.ones(C, Q), logit_scale=1.0)
    with pytest.raises(InputError, match="class_embeddings"):
        ZeroShotPosterior(image, class_embeddings=torch.ones(C, D + 1), logit_scale=1.0)
    with pytest.raises(InputError, match="logit_scale"):
        ZeroShotPosterior(image, class_embeddings=classes, logit_scale=0.0)
    with pytest.raises(InputError, match="all zeros"):
        ZeroShotPosterior(image, class_embeddings=torch.zeros(C, D), logit_scale=1.0)
    posterior = ZeroShotPosterior(image, class_embeddings=classes, logit_scale=1.0)
    with pytest.raises(InputError, match="width"):
        posterior.logit_moments(torch.ones(2, P + 1))
    with pytest.raises(InputError, match="image_weights"):
        posterior.sampled_logits(torch.ones(2, P), WeightDraws(head_weights=torch.ones(2, C, P)))

"""Tests of the dot-product and cosine moments."""

from __future__ import annotations

import itertools

import pytest
import torch

from annotator.bayes.moments import (
    cosine_moments,
    cosine_to_logit_moments,
    dot_product_moments,
    separable_cosine_moments,
)
from annotator.errors import InputError


def _gaussians(seed=0, N=3, C=4, D=6):
    generator = torch.Generator().manual_seed(seed)
    mean_g = torch.randn(N, D, generator=generator, dtype=torch.float64)
    mean_h = torch.randn(C, D, generator=generator, dtype=torch.float64)
    variance_g = 0.5 * torch.rand(N, D, generator=generator, dtype=torch.float64)
    variance_h = 0.5 * torch.rand(C, D, generator=generator, dtype=torch.float64)
    return mean_g, variance_g, mean_h, variance_h


@pytest.mark.parametrize("random_g,random_h", [(True, True), (True, False), (False, True)])
def test_dot_product_variance_matches_monte_carlo(random_g, random_h):
    mean_g, variance_g, mean_h, variance_h = _gaussians()
    variance_g = variance_g if random_g else None
    variance_h = variance_h if random_h else None
    num_samples = 200_000
    generator = torch.Generator().manual_seed(1)

    mean, variance = dot_product_moments(mean_g, variance_g, mean_h, variance_h)

    g = mean_g.expand(num_samples, -1, -1)
    h = mean_h.expand(num_samples, -1, -1)
    if variance_g is not None:
        g = g + variance_g.sqrt() * torch.randn(g.shape, generator=generator, dtype=torch.float64)
    if variance_h is not None:
        h = h + variance_h.sqrt() * torch.randn(h.shape, generator=generator, dtype=torch.float64)
    products = g @ h.transpose(1, 2)  # (S, N, C)
    sample_mean = products.mean(0)
    sample_variance = products.var(0)
    centred = products - sample_mean
    fourth_moment = (centred**4).mean(0)
    # Standard errors of the sample mean and of the sample variance.
    mean_error = (sample_variance / num_samples).sqrt()
    variance_error = ((fourth_moment - sample_variance**2) / num_samples).sqrt()

    assert bool(((sample_mean - mean).abs() < 3 * mean_error).all())
    assert bool(((sample_variance - variance).abs() < 3 * variance_error).all())


def test_cosine_moments_without_variance_is_exact_cosine():
    mean_g, _, mean_h, _ = _gaussians(seed=2)

    mean, variance = cosine_moments(mean_g, None, mean_h, None)

    expected = (
        torch.nn.functional.normalize(mean_g, dim=-1)
        @ torch.nn.functional.normalize(mean_h, dim=-1).T
    )
    torch.testing.assert_close(mean, expected)
    assert float(variance.abs().max()) == 0.0


def test_cosine_moments_formula():
    mean_g, variance_g, mean_h, variance_h = _gaussians(seed=3)

    mean, variance = cosine_moments(mean_g, variance_g, mean_h, variance_h, chunk_size=2)

    norm_g = (mean_g**2 + variance_g).sum(-1)
    norm_h = (mean_h**2 + variance_h).sum(-1)
    for n, c in itertools.product(range(3), range(4)):
        numerator = (
            (mean_g[n] ** 2 + variance_g[n]) * variance_h[c] + variance_g[n] * mean_h[c] ** 2
        ).sum()
        denominator = norm_g[n] * norm_h[c]
        torch.testing.assert_close(mean[n, c], mean_g[n] @ mean_h[c] / denominator.sqrt())
        torch.testing.assert_close(variance[n, c], numerator / denominator)


@pytest.mark.parametrize("random_g,random_h", list(itertools.product([True, False], repeat=2)))
def test_separable_matches_general(random_g, random_h, device):
    generator = torch.Generator().manual_seed(4)
    mean_g = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    mean_h = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    scale_g, profile_g = torch.rand(7, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    scale_h, profile_h = torch.rand(3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    if not random_g:
        scale_g = profile_g = None
    if not random_h:
        scale_h = profile_h = None

    def to_device(x):
        return None if x is None else x.to(device)

    mean, variance = separable_cosine_moments(
        to_device(mean_g),
        to_device(scale_g),
        to_device(profile_g),
        to_device(mean_h),
        to_device(scale_h),
        to_device(profile_h),
        chunk_size=3,
    )

    variance_g = None if scale_g is None else scale_g[:, None] * profile_g[None, :]
    variance_h = None if scale_h is None else scale_h[:, None] * profile_h[None, :]
    expected_mean, expected_variance = cosine_moments(mean_g, variance_g, mean_h, variance_h)
    assert mean.device.type == device.type
    torch.testing.assert_close(mean.cpu(), expected_mean)
    torch.testing.assert_close(variance.cpu(), expected_variance)


def test_cosine_moments_chunking_invariant():
    mean_g, variance_g, mean_h, variance_h = _gaussians(seed=5, N=10)

    whole = cosine_moments(mean_g, variance_g, mean_h, variance_h, chunk_size=100)
    chunked = cosine_moments(mean_g, variance_g, mean_h, variance_h, chunk_size=3)

    torch.testing.assert_close(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1])


def test_cosine_approximation_close_for_small_variance():
    # With noise much smaller than the means, the norm approximation is accurate.
    generator = torch.Generator().manual_seed(6)
    mean_g = torch.randn(2, 16, generator=generator, dtype=torch.float64)
    mean_h = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    variance_g = torch.full((2, 16), 0.01, dtype=torch.float64)

    mean, variance = cosine_moments(mean_g, variance_g, mean_h, None)

    noise = torch.randn(100_000, 2, 16, generator=generator, dtype=torch.float64)
    samples = torch.nn.functional.normalize(mean_g + 0.1 * noise, dim=-1)
    cosines = samples @ torch.nn.functional.normalize(mean_h, dim=-1).T
    torch.testing.assert_close(mean, cosines.mean(0), rtol=0, atol=2e-3)
    torch.testing.assert_close(variance.sqrt(), cosines.std(0), rtol=0.1, atol=0)


def test_logit_moments_scale_and_bias():
    mean, variance = cosine_to_logit_moments(
        torch.tensor([0.5]), torch.tensor([0.01]), logit_scale=10.0, logit_bias=-2.0
    )
    torch.testing.assert_close(mean, torch.tensor([3.0]))
    torch.testing.assert_close(variance, torch.tensor([1.0]))


def test_moments_reject_bad_inputs():
    mean_g, variance_g, mean_h, variance_h = _gaussians()
    with pytest.raises(InputError, match="variance_g"):
        cosine_moments(mean_g, -variance_g, mean_h, variance_h)
    with pytest.raises(InputError, match="mean_h"):
        cosine_moments(mean_g, variance_g, mean_h[:, :3], None)
    with pytest.raises(InputError, match="together"):
        separable_cosine_moments(mean_g, torch.ones(3), None, mean_h)
    with pytest.raises(InputError, match="scale_g"):
        separable_cosine_moments(mean_g, torch.ones(4), torch.ones(6), mean_h)

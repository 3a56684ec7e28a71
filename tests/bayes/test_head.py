"""Tests of the refit linear head and its Laplace posterior."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from annotator.bayes.factors import KroneckerFactors
from annotator.bayes.head import HeadCovariance, fit_head
from annotator.bayes.interface import LogitPosterior
from annotator.bayes.posterior import ProjectionPosterior
from annotator.bayes.zeroshot import ZeroShotPosterior
from annotator.errors import InputError

from .helpers import random_spd

P, D, C = 6, 4, 3


def _zero_shot(*, num_classes=C, bias=None, seed=0, prior_precision=2.0):
    """Return a zero-shot posterior. A small ``prior_precision`` makes labels weigh more."""
    generator = torch.Generator().manual_seed(seed)
    factors = KroneckerFactors(
        A=random_spd(P, generator=generator, scale=2.0),
        B=random_spd(D, generator=generator),
        n=prior_precision * 1.5,
        prior_precision=prior_precision,
    )
    weight = torch.randn(D, P, generator=generator, dtype=torch.float64)
    classes = torch.randn(num_classes, D, generator=generator, dtype=torch.float64)
    image = ProjectionPosterior(weight, factors)
    return ZeroShotPosterior(image, class_embeddings=classes, logit_scale=5.0, logit_bias=bias)


def _data(num_labels, *, num_classes=C, seed=1, with_offsets=False):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_labels, P, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (num_labels,), generator=generator)
    offsets = None
    if with_offsets:
        offsets = torch.randn(num_labels, D, generator=generator, dtype=torch.float64)
    return features, labels, offsets


def _reference_precision(head, zero_shot, features, labels, offsets, *, kfac):
    """Return the Laplace precision over row-major vec(V) built from its definition."""
    A_damped, _ = zero_shot.image.factors.damped()
    inputs, logits = _inputs_and_logits(head.weight, zero_shot, features, offsets)
    probabilities = torch.softmax(logits, dim=-1)
    hessians = (
        torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None, :]
    )
    prior = torch.kron(torch.linalg.inv(head.prior_row_covariance).contiguous(), A_damped)
    if kfac:
        return prior + torch.kron(hessians.mean(0), inputs.T @ inputs)
    data = sum(torch.kron(h, torch.outer(x, x)) for h, x in zip(hessians, inputs, strict=True))
    return prior + data


def _inputs_and_logits(weight, zero_shot, features, offsets):
    """Return ``x = φ/‖g‖`` and the head logits, written out from their definitions."""
    embeddings = features @ zero_shot.image.weight.T
    if offsets is not None:
        embeddings = embeddings + offsets
    norms = embeddings.norm(dim=-1, keepdim=True)
    inputs = features / norms
    unit_classes = F.normalize(zero_shot.class_embeddings, dim=-1)
    logits = inputs @ weight.T
    if offsets is not None:
        logits = logits + zero_shot.logit_scale * (offsets @ unit_classes.T) / norms
    if zero_shot.logit_bias is not None:
        logits = logits + zero_shot.logit_bias
    return inputs, logits


def _reference_variance(precision, inputs):
    covariance = torch.linalg.inv(precision)
    rows = []
    for x in inputs:
        rows.append(
            torch.stack(
                [
                    torch.kron(torch.eye(C, dtype=torch.float64)[c], x)
                    @ covariance
                    @ torch.kron(torch.eye(C, dtype=torch.float64)[c], x)
                    for c in range(C)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("covariance", ["dense", "kfac"])
@pytest.mark.parametrize("with_offsets", [False, True])
def test_zero_labels_reproduce_zero_shot(covariance, with_offsets, device):
    zero_shot = _zero_shot(bias=-0.7 if with_offsets else None)
    features, labels, offsets = _data(0)
    pool, _, pool_offsets = _data(8, seed=2, with_offsets=with_offsets)

    head = fit_head(zero_shot, features, labels, covariance=covariance)

    to_device = lambda x: None if x is None else x.to(device)  # noqa: E731
    expected = zero_shot.map_logits(pool, pool_offsets)
    torch.testing.assert_close(head.weight, head.prior_mean, rtol=0, atol=0)
    torch.testing.assert_close(
        head.map_logits(to_device(pool), to_device(pool_offsets)).cpu(), expected
    )
    mean, _ = head.logit_moments(to_device(pool), to_device(pool_offsets))
    torch.testing.assert_close(mean.cpu(), expected)


@pytest.mark.parametrize("covariance", ["dense", "kfac"])
def test_zero_labels_variance_is_prior(covariance):
    zero_shot = _zero_shot()
    features, labels, _ = _data(0)
    pool, _, _ = _data(5, seed=3)

    head = fit_head(zero_shot, features, labels, covariance=covariance)
    _, variance = head.logit_moments(pool)

    inputs, _ = _inputs_and_logits(head.weight, zero_shot, pool, None)
    quadratic = zero_shot.image.input_variance(inputs)
    expected = quadratic[:, None] * head.prior_row_covariance.diagonal()[None, :]
    torch.testing.assert_close(variance, expected)


@pytest.mark.parametrize("with_offsets", [False, True])
def test_dense_matches_reference_precision(with_offsets):
    zero_shot = _zero_shot(bias=0.3, prior_precision=0.01)
    features, labels, offsets = _data(6, with_offsets=with_offsets)
    pool, _, pool_offsets = _data(4, seed=4, with_offsets=with_offsets)

    head = fit_head(zero_shot, features, labels, offsets, covariance="dense")
    _, variance = head.logit_moments(pool, pool_offsets)

    precision = _reference_precision(head, zero_shot, features, labels, offsets, kfac=False)
    inputs, _ = _inputs_and_logits(head.weight, zero_shot, pool, pool_offsets)
    torch.testing.assert_close(
        variance, _reference_variance(precision, inputs), rtol=1e-6, atol=1e-9
    )


def test_kfac_matches_reference_precision():
    zero_shot = _zero_shot(prior_precision=0.01)
    features, labels, _ = _data(6)
    pool, _, _ = _data(4, seed=4)

    head = fit_head(zero_shot, features, labels, covariance="kfac")
    _, variance = head.logit_moments(pool)

    precision = _reference_precision(head, zero_shot, features, labels, None, kfac=True)
    inputs, _ = _inputs_and_logits(head.weight, zero_shot, pool, None)
    torch.testing.assert_close(
        variance, _reference_variance(precision, inputs), rtol=1e-6, atol=1e-9
    )


def test_dense_and_kfac_agree_for_one_label(device):
    # With one labelled point the data term H_1 ⊗ x_1 x_1ᵀ is exactly Kronecker.
    zero_shot = _zero_shot(bias=0.2, prior_precision=0.01)
    features, labels, offsets = _data(1, with_offsets=True)
    pool, _, pool_offsets = _data(6, seed=5, with_offsets=True)

    dense = fit_head(zero_shot, features, labels, offsets, covariance="dense")
    kfac = fit_head(zero_shot, features, labels, offsets, covariance="kfac")

    dense_mean, dense_variance = dense.logit_moments(pool.to(device), pool_offsets.to(device))
    kfac_mean, kfac_variance = kfac.logit_moments(pool.to(device), pool_offsets.to(device))
    torch.testing.assert_close(dense_mean, kfac_mean)
    torch.testing.assert_close(dense_variance, kfac_variance, rtol=1e-8, atol=1e-12)


def test_dense_and_kfac_differ_for_many_labels():
    zero_shot = _zero_shot(prior_precision=0.01)
    features, labels, _ = _data(20)
    pool, _, _ = _data(6, seed=5)

    _, dense_variance = fit_head(zero_shot, features, labels, covariance="dense").logit_moments(
        pool
    )
    _, kfac_variance = fit_head(zero_shot, features, labels, covariance="kfac").logit_moments(pool)

    assert not torch.allclose(dense_variance, kfac_variance, rtol=1e-3)


def test_map_gradient_is_zero():
    zero_shot = _zero_shot(bias=0.4, prior_precision=0.01)
    features, labels, offsets = _data(15, with_offsets=True)

    head = fit_head(zero_shot, features, labels, offsets)

    A_damped, _ = zero_shot.image.factors.damped()
    row_precision = torch.linalg.inv(head.prior_row_covariance)

    def objective(weight):
        _, logits = _inputs_and_logits(weight, zero_shot, features, offsets)
        delta = weight - head.prior_mean
        prior = 0.5 * torch.trace(delta.T @ row_precision @ delta @ A_damped)
        return F.cross_entropy(logits, labels, reduction="sum") + prior

    at_prior = head.prior_mean.clone().requires_grad_(True)
    (gradient_at_prior,) = torch.autograd.grad(objective(at_prior), at_prior)
    at_map = head.weight.clone().requires_grad_(True)
    (gradient_at_map,) = torch.autograd.grad(objective(at_map), at_map)
    assert float(gradient_at_map.norm()) < 1e-6 * float(gradient_at_prior.norm())


def test_labels_raise_their_logits():
    zero_shot = _zero_shot()
    features, labels, _ = _data(30)

    head = fit_head(zero_shot, features, labels)

    before = zero_shot.map_logits(features).log_softmax(-1).gather(1, labels[:, None]).sum()
    after = head.map_logits(features).log_softmax(-1).gather(1, labels[:, None]).sum()
    assert float(after) > float(before)


def test_labels_shrink_variance():
    zero_shot = _zero_shot()
    pool, _, _ = _data(5, seed=6)
    empty = fit_head(zero_shot, *_data(0)[:2])
    fitted = fit_head(zero_shot, *_data(40)[:2])

    _, prior_variance = empty.logit_moments(pool)
    _, posterior_variance = fitted.logit_moments(pool)

    assert bool((posterior_variance <= prior_variance + 1e-12).all())
    assert float(posterior_variance.sum()) < float(prior_variance.sum())


@pytest.mark.parametrize("covariance", ["dense", "kfac"])
def test_weight_draws_have_posterior_covariance(covariance):
    zero_shot = _zero_shot(bias=0.1, prior_precision=0.01)
    features, labels, offsets = _data(10, with_offsets=True)
    head = fit_head(zero_shot, features, labels, offsets, covariance=covariance)
    num_samples = 4000

    draws = head.sample_weights(num_samples, torch.Generator().manual_seed(8))

    # Whitened by the Cholesky factor of the precision, the draws are standard normal.
    precision = _reference_precision(
        head, zero_shot, features, labels, offsets, kfac=covariance == "kfac"
    )
    factor = torch.linalg.cholesky(precision)
    whitened = (draws.head_weights - head.weight).reshape(num_samples, -1) @ factor
    identity = torch.eye(C * P, dtype=torch.float64)
    # Entries of a sample covariance of standard normals have standard error about 1/√S.
    assert float((whitened.mean(0)).abs().max()) < 5 / num_samples**0.5
    assert float((torch.cov(whitened.T) - identity).abs().max()) < 6 / num_samples**0.5


def test_sampled_logits_match_moments():
    zero_shot = _zero_shot(bias=0.1, prior_precision=0.01)
    features, labels, offsets = _data(10, with_offsets=True)
    pool, _, pool_offsets = _data(4, seed=7, with_offsets=True)
    head = fit_head(zero_shot, features, labels, offsets)

    draws = head.sample_weights(3000, torch.Generator().manual_seed(8))
    logits = head.sampled_logits(pool, draws, pool_offsets)
    mean, variance = head.logit_moments(pool, pool_offsets)

    assert logits.shape == (3000, 4, C)
    standard_error = (variance / 3000).sqrt()
    assert bool(((logits.mean(0) - mean).abs() < 4 * standard_error).all())
    torch.testing.assert_close(logits.var(0), variance, rtol=0.15, atol=0)


def test_more_classes_than_dimensions():
    zero_shot = _zero_shot(num_classes=7)
    features, labels, _ = _data(12, num_classes=7)
    pool, _, _ = _data(5, seed=9)

    empty = fit_head(zero_shot, features[:0], labels[:0])
    head = fit_head(zero_shot, features, labels)
    mean, variance = head.logit_moments(pool)

    torch.testing.assert_close(empty.map_logits(pool), zero_shot.map_logits(pool))
    assert bool(torch.isfinite(mean).all())
    assert bool((variance >= 0).all())


def test_auto_covariance_picks_by_size(monkeypatch):
    zero_shot = _zero_shot()
    features, labels, _ = _data(3)

    assert fit_head(zero_shot, features, labels).covariance is HeadCovariance.DENSE
    monkeypatch.setattr("annotator.bayes.head.DENSE_MAX_PARAMETERS", C * P - 1)
    assert fit_head(zero_shot, features, labels).covariance is HeadCovariance.KFAC


def test_head_implements_protocol():
    head = fit_head(_zero_shot(), *_data(2)[:2])
    assert isinstance(head, LogitPosterior)


def test_fit_head_rejects_bad_labels():
    zero_shot = _zero_shot()
    features, labels, _ = _data(4)
    with pytest.raises(InputError, match="int64"):
        fit_head(zero_shot, features, labels.float())
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        fit_head(zero_shot, features, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(InputError, match="3 labels for 4"):
        fit_head(zero_shot, features, labels[:3])
    with pytest.raises(InputError, match="covariance"):
        fit_head(zero_shot, features, labels, covariance="full")


def _reference_log_evidence(head, zero_shot, features, labels, tau):
    """Laplace log evidence in the head's own coordinates, from explicit dense matrices."""
    precision = _reference_precision(head, zero_shot, features, labels, None, kfac=False)
    A_damped, _ = zero_shot.image.factors.damped()
    prior = torch.kron(torch.linalg.inv(head.prior_row_covariance).contiguous(), A_damped)
    posterior = precision - prior + tau * prior
    delta = (head.weight - head.prior_mean).reshape(-1)
    _, logits = _inputs_and_logits(head.weight, zero_shot, features, None)
    return float(
        -F.cross_entropy(logits, labels, reduction="sum")
        - 0.5 * tau * delta @ prior @ delta
        + 0.5 * torch.logdet(tau * prior)
        - 0.5 * torch.logdet(posterior)
    )


@pytest.mark.parametrize("covariance", ["dense", "kfac"])
def test_prior_scale_scales_prior_precision(covariance):
    zero_shot = _zero_shot()
    features, labels, _ = _data(10)

    head = fit_head(zero_shot, features, labels, covariance=covariance, prior_scale=0.25)

    A_damped, _ = zero_shot.image.factors.damped()
    row_precision = torch.linalg.inv(head.prior_row_covariance)
    delta = head.weight - head.prior_mean
    _, logits = _inputs_and_logits(head.weight, zero_shot, features, None)
    probabilities = torch.softmax(logits, dim=-1)
    onehot = F.one_hot(labels, C).double()
    inputs, _ = _inputs_and_logits(head.weight, zero_shot, features, None)
    # Stationarity of CE + ½ τ tr(ΔVᵀ R⁻¹ ΔV A'): (P − Y)ᵀ X + τ R⁻¹ ΔV A' = 0.
    gradient = (probabilities - onehot).T @ inputs + 0.25 * row_precision @ delta @ A_damped
    assert float(gradient.abs().max()) < 1e-6
    assert head.prior_scale == 0.25


def test_log_evidence_matches_dense_reference():
    zero_shot = _zero_shot()
    features, labels, _ = _data(12)

    for tau in (0.1, 1.0, 7.0):
        head = fit_head(zero_shot, features, labels, covariance="dense", prior_scale=tau)
        reference = _reference_log_evidence(head, zero_shot, features, labels, tau)
        assert head.log_evidence == pytest.approx(reference, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("covariance", ["dense", "kfac"])
def test_evidence_prior_scale_is_a_maximum(covariance):
    zero_shot = _zero_shot(prior_precision=0.5)
    features, labels, _ = _data(40)

    best = fit_head(zero_shot, features, labels, covariance=covariance, prior_scale="evidence")

    for factor in (0.5, 0.8, 1.25, 2.0):
        other = fit_head(
            zero_shot,
            features,
            labels,
            covariance=covariance,
            prior_scale=best.prior_scale * factor,
        )
        assert other.log_evidence <= best.log_evidence + 1e-6


def test_prior_scale_rejects_bad_values():
    zero_shot = _zero_shot()
    features, labels, _ = _data(3)

    with pytest.raises(InputError, match="prior_scale must be a positive number or 'evidence'"):
        fit_head(zero_shot, features, labels, prior_scale="marginal")
    with pytest.raises(InputError, match="prior_scale"):
        fit_head(zero_shot, features, labels, prior_scale=-1.0)

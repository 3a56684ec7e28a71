"""Predictive distributions and the information-theoretic quantities built on them.

Entropies use ``torch.xlogy`` so that ``0·log 0 = 0``, and natural logarithms (nats).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from annotator.bayes._checks import check_positive_int, check_tensor
from annotator.bayes.posterior import ELEMENT_BUDGET
from annotator.errors import InputError


def probit_probabilities(mean: Tensor, variance: Tensor) -> Tensor:
    """Approximate the predictive ``E[softmax(z)]`` for ``z ~ N(mean, diag variance)``.

    ``p ≈ softmax(mean / √(1 + π/8 · variance))``, the probit approximation applied per
    class.

    Parameters
    ----------
    mean, variance : Tensor, shape (N, C)
        Marginal logit moments.

    Returns
    -------
    Tensor, shape (N, C)
    """
    check_tensor("mean", mean)
    check_tensor("variance", variance)
    if mean.shape != variance.shape:
        raise InputError(
            f"mean has shape {tuple(mean.shape)} but variance has {tuple(variance.shape)}"
        )
    return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * variance), dim=-1)


def sample_logits(
    mean: Tensor, variance: Tensor, num_samples: int, generator: torch.Generator
) -> Tensor:
    """Draw logits independently per class from ``N(mean, variance)``.

    The draws ignore that all classes of an image share one embedding, so they lose the
    correlation between classes. That is harmless for BALD of one image but makes joint
    predictions of two images independent, so EPIG computed from them is zero.

    Parameters
    ----------
    mean, variance : Tensor, shape (N, C)
        Marginal logit moments.
    num_samples : int
        Number of draws ``S``.
    generator : torch.Generator
        Source of randomness. The noise is drawn on the generator's device and moved to
        the device of ``mean``, so a generator on that device avoids a copy.

    Returns
    -------
    Tensor, shape (S, N, C)
    """
    check_positive_int("num_samples", num_samples)
    if mean.shape != variance.shape:
        raise InputError(
            f"mean has shape {tuple(mean.shape)} but variance has {tuple(variance.shape)}"
        )
    logits = torch.randn(
        (num_samples, *mean.shape), generator=generator, dtype=mean.dtype, device=generator.device
    ).to(mean.device)
    # In place: the (S, N, C) noise is the largest tensor of a scoring run.
    return logits.mul_(variance.clamp_min(0.0).sqrt()).add_(mean)


def entropy(probabilities: Tensor) -> Tensor:
    """Compute ``H[p] = −Σ_c p_c log p_c`` over the last dimension, with ``0·log 0 = 0``."""
    return -torch.xlogy(probabilities, probabilities).sum(-1)


def predictive_entropy(probabilities: Tensor) -> Tensor:
    """Compute ``H[E_s p_s]`` (N,) from sampled probabilities (S, N, C)."""
    return entropy(probabilities.mean(0))


def expected_entropy(probabilities: Tensor) -> Tensor:
    """Compute the aleatoric term ``E_s H[p_s]`` from sampled probabilities (S, N, C)."""
    return entropy(probabilities).mean(0)


def bald(probabilities: Tensor) -> Tensor:
    """Compute BALD, ``H[E_s p_s] − E_s H[p_s]``, from one set of samples (S, N, C).

    Both terms use the same samples, so by the concavity of the entropy the result is
    non-negative up to rounding.

    Returns
    -------
    Tensor, shape (N,)
        Mutual information between the label and the weights, in nats.
    """
    return predictive_entropy(probabilities) - expected_entropy(probabilities)


def bald_from_logits(logits: Tensor) -> Tensor:
    """Compute BALD from sampled logits (S, N, C), the same quantity as :func:`bald`.

    ``H[p_s] = −Σ_c p_s,c log p_s,c`` takes ``log p`` from ``log_softmax``, which saves one
    logarithm per sample and class against ``xlogy`` on the probabilities. Logits must be
    finite, so that every ``log p`` is finite.

    Returns
    -------
    Tensor, shape (N,)
    """
    log_probabilities = torch.log_softmax(logits, dim=-1)
    probabilities = log_probabilities.exp()
    expected = -torch.linalg.vecdot(probabilities, log_probabilities).mean(0)
    return entropy(probabilities.mean(0)) - expected


def epig(pool_probabilities: Tensor, target_probabilities: Tensor) -> Tensor:
    """Compute EPIG of each pool input against a target set, from shared samples.

    ``EPIG(x) = mean_{x*} (H[y] + H[y*] − H[y, y*])``, the expected predictive information
    gain, with the joint predictive ``p(y, y*) = mean_s p_s(y) p_s(y*)``. Sample ``s`` of the pool and of
    the targets must come from the same weight draw. The cost is ``O(S · N · M · C²)``;
    targets are processed in groups so that one (N, m, C, C) joint stays within
    :data:`~annotator.bayes.posterior.ELEMENT_BUDGET` entries.

    Parameters
    ----------
    pool_probabilities : Tensor, shape (S, N, C)
        Predictive probabilities of the pool under each draw.
    target_probabilities : Tensor, shape (S, M, C)
        Predictive probabilities of the targets under the same draws.

    Returns
    -------
    Tensor, shape (N,)
        Expected information gain about the target predictions, in nats.
    """
    if pool_probabilities.ndim != 3 or target_probabilities.ndim != 3:
        raise InputError(
            "pool_probabilities and target_probabilities must have shape (S, N, C) and "
            f"(S, M, C), got {tuple(pool_probabilities.shape)} and "
            f"{tuple(target_probabilities.shape)}"
        )
    if (
        pool_probabilities.shape[0] != target_probabilities.shape[0]
        or pool_probabilities.shape[2] != target_probabilities.shape[2]
    ):
        raise InputError(
            f"pool probabilities {tuple(pool_probabilities.shape)} and target probabilities "
            f"{tuple(target_probabilities.shape)} disagree on the sample or class count"
        )
    num_samples, num_pool, num_classes = pool_probabilities.shape
    num_targets = target_probabilities.shape[1]
    target_probabilities = target_probabilities.to(pool_probabilities)

    pool_entropy = entropy(pool_probabilities.mean(0))  # H[y], (N,)
    target_entropy = entropy(target_probabilities.mean(0))  # H[y*], (M,)
    group = max(1, ELEMENT_BUDGET // max(1, num_pool * num_classes * num_classes))
    joint_entropy_sum = pool_entropy.new_zeros(num_pool)
    for start in range(0, num_targets, group):
        targets = target_probabilities[:, start : start + group]  # (S, m, C)
        joint = torch.einsum("snc,smd->nmcd", pool_probabilities, targets) / num_samples
        joint_entropy_sum += entropy(joint.flatten(-2)).sum(-1)  # Σ_m H[y, y*_m]
    information = pool_entropy + target_entropy.mean() - joint_entropy_sum / max(num_targets, 1)
    return information


def margin(probabilities: Tensor) -> Tensor:
    """Compute ``1 − (p_(1) − p_(2))`` from probabilities (N, C): larger when the top two
    classes are closer. With one class the margin score is 0."""
    if probabilities.shape[-1] < 2:
        return probabilities.new_zeros(probabilities.shape[:-1])
    top = probabilities.topk(2, dim=-1).values
    return 1.0 - (top[..., 0] - top[..., 1])

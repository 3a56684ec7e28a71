"""Acquisition scores for a pool and batch selection.

:func:`score_pool` scores every pool image under a :class:`LogitPosterior` (higher is more
informative), and :func:`select_batch` turns the scores into a batch of indices.
"""

from __future__ import annotations

import enum
import logging
from typing import TypeVar

import torch
from torch import Tensor

from annotator.bayes._checks import (
    check_positive,
    check_positive_int,
    check_tensor,
    compute_dtype,
)
from annotator.bayes.interface import LogitPosterior, WeightDraws
from annotator.bayes.posterior import DEFAULT_CHUNK_SIZE, ELEMENT_BUDGET
from annotator.bayes.predictive import (
    bald_from_logits,
    entropy,
    epig,
    margin,
    predictive_entropy,
    sample_logits,
)
from annotator.errors import InputError

logger = logging.getLogger(__name__)

#: Default number of Monte Carlo samples per image for the sampled scores.
DEFAULT_NUM_SAMPLES = 100
#: Default number of pool images drawn as the EPIG target set when none is given.
DEFAULT_NUM_TARGETS = 256

DEFAULT_SAMPLED_CLASSES = 64
"""Classes per image that independent logit sampling draws; the rest are merged into one."""


class Strategy(enum.StrEnum):
    """Acquisition strategy: what :func:`score_pool` computes for each pool image."""

    BALD = "bald"
    """Mutual information between label and weights, ``H[E p] − E H[p]`` (epistemic)."""

    EPIG = "epig"
    """Expected information gain about the predictions on a target set, from weight draws
    shared across pool and targets. It costs ``O(S · M · C²)`` per pool image for ``M``
    targets, so it suits tens of classes rather than thousands."""

    POWER_BALD = "power-bald"
    """BALD scores, meant for ``select_batch(method="power")``, which samples a batch with
    probability proportional to ``score^β`` (stochastic batch acquisition)."""

    ENTROPY = "entropy"
    """Entropy of the MAP prediction ``softmax(z*)``, a baseline that ignores the posterior."""

    PREDICTIVE_ENTROPY = "predictive-entropy"
    """Entropy of the posterior predictive ``H[E p]`` (epistemic plus aleatoric)."""

    MARGIN = "margin"
    """``1 − (p_(1) − p_(2))`` of the MAP prediction, a baseline."""

    VARIANCE = "variance"
    """Sum over classes of the marginal logit variance."""

    RANDOM = "random"
    """Independent uniform scores: top-k of them is a uniform random batch."""

    @property
    def default_selection(self) -> str:
        """Selection method that goes with this strategy: ``"power"`` or ``"top-k"``."""
        return "power" if self is Strategy.POWER_BALD else "top-k"


class LogitSampling(enum.StrEnum):
    """Logit sampling scheme of the sampled strategies (BALD, power-BALD, predictive entropy)."""

    INDEPENDENT = "independent"
    """Each logit from its marginal ``N(mean, variance)``: cheapest, ignores the correlation
    between the classes of one image."""

    EMBEDDING = "embedding"
    """Image embeddings from their diagonal Gaussians, then cosine logits, which keeps the
    correlation between classes. Only for posteriors with ``sampled_embedding_logits``
    (the zero-shot posterior)."""

    WEIGHTS = "weights"
    """Whole weight matrices from the posterior, evaluated on every image."""


_Option = TypeVar("_Option", Strategy, LogitSampling)

_SAMPLED = {Strategy.BALD, Strategy.POWER_BALD, Strategy.PREDICTIVE_ENTROPY}
_RANDOMISED = _SAMPLED | {Strategy.EPIG, Strategy.RANDOM}


def score_pool(
    posterior: LogitPosterior,
    features: Tensor,
    strategy: Strategy | str,
    *,
    offsets: Tensor | None = None,
    target_features: Tensor | None = None,
    target_offsets: Tensor | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sampling: LogitSampling | str = LogitSampling.INDEPENDENT,
    num_targets: int = DEFAULT_NUM_TARGETS,
    sampled_classes: int | None = DEFAULT_SAMPLED_CLASSES,
) -> Tensor:
    """Score every pool image, where a higher score means more informative.

    The pool is processed in chunks, so memory depends on the chunk size and not on ``N``.

    Parameters
    ----------
    posterior : LogitPosterior
        The zero-shot posterior or a refit head.
    features : Tensor, shape (N, p)
        Image features ``φ`` of the pool.
    strategy : Strategy or str
        One of :class:`Strategy`.
    offsets : Tensor, shape (N, D), optional
        Fixed per-image terms added after the image projection.
    target_features : Tensor, shape (M, p), optional
        EPIG target set. When None, ``num_targets`` pool images are drawn with
        ``generator``, without replacement.
    target_offsets : Tensor, shape (M, D), optional
        Offsets of the target set.
    num_samples : int
        Monte Carlo samples ``S`` for the sampled strategies and EPIG.
    generator : torch.Generator, optional
        Source of randomness, required for BALD, power-BALD, predictive entropy, EPIG and
        random.
    chunk_size : int
        Pool rows whose logit moments are computed at once. The sampled strategies and EPIG
        then work through each chunk in smaller groups, so that one (S, rows, C) tensor of
        samples, or one (rows, M, C, C) EPIG joint, has at most
        :data:`~annotator.bayes.posterior.ELEMENT_BUDGET` entries. The samples depend on
        this grouping, so fix ``chunk_size`` to reproduce scores exactly.
    sampling : LogitSampling or str
        How BALD, power-BALD and predictive entropy draw logits. EPIG always uses weight
        draws, because independent draws make its joint predictive factorise.
    num_targets : int
        Size of the EPIG target set drawn from the pool when ``target_features`` is None.
    sampled_classes : int, optional
        With independent sampling and more classes than this, each image samples only the
        classes with the largest upper bounds ``mean + 3·sd``, plus one class that stands for
        all others (see :func:`truncate_logit_moments`). None samples every class. Merging
        classes can only lower the mutual information, and classes far below the top carry
        almost no probability, so BALD changes little while the sampling cost falls from
        ``S·C`` to ``S·(sampled_classes + 1)`` per image.

    Returns
    -------
    Tensor, shape (N,)
        Scores on the device of ``features``.

    Raises
    ------
    InputError
        For an unknown strategy or sampling, a missing generator, or mismatched shapes.
    """
    strategy = _parse_enum(Strategy, strategy, "strategy")
    sampling = _parse_enum(LogitSampling, sampling, "sampling")
    check_tensor("features", features, ndim=2)
    check_positive_int("num_samples", num_samples)
    if strategy in _RANDOMISED and generator is None:
        raise InputError(
            f"strategy {strategy.value!r} is random and needs a torch.Generator. Pass "
            "generator=torch.Generator().manual_seed(...)"
        )
    if (
        strategy in _SAMPLED
        and sampling is LogitSampling.EMBEDDING
        and not hasattr(posterior, "sampled_embedding_logits")
    ):
        raise InputError(
            f"{type(posterior).__name__} cannot sample embeddings. Use sampling='independent' "
            "or 'weights'"
        )
    num_pool = features.shape[0]
    check_positive_int("chunk_size", chunk_size)

    if strategy is Strategy.RANDOM:
        return torch.rand(
            num_pool, generator=generator, dtype=compute_dtype(features), device=generator.device
        ).to(features.device)

    draws = None
    targets = None
    if strategy is Strategy.EPIG or (strategy in _SAMPLED and sampling is LogitSampling.WEIGHTS):
        draws = posterior.sample_weights(num_samples, generator)
    if strategy is Strategy.EPIG:
        targets = _target_probabilities(
            posterior,
            draws,
            features,
            offsets,
            target_features,
            target_offsets,
            num_targets,
            generator,
        )

    # The scores go into one tensor allocated up front. A list of small per-chunk results, kept
    # alive between the large temporaries of later chunks, fragmented the CPU heap, and the
    # process grew by about 2 GiB over a 1,000,000-image pool.
    scores = None
    for start in range(0, num_pool, chunk_size):
        chunk = features[start : start + chunk_size]
        chunk_offsets = None if offsets is None else offsets[start : start + chunk_size]
        chunk_scores = _score_chunk(
            posterior,
            chunk,
            chunk_offsets,
            strategy,
            sampling=sampling,
            num_samples=num_samples,
            generator=generator,
            draws=draws,
            targets=targets,
            sampled_classes=sampled_classes,
        )
        if scores is None:
            scores = chunk_scores.new_empty(num_pool)
        scores[start : start + chunk.shape[0]] = chunk_scores
    if scores is None:
        scores = features.new_zeros(0)
    finite = torch.isfinite(scores)
    if scores.numel():
        logger.info(
            "Scored %d images with %s: mean %.4g, std %.4g, median %.4g, %d non-finite",
            num_pool,
            strategy.value,
            float(scores[finite].mean()) if finite.any() else float("nan"),
            float(scores[finite].std()) if int(finite.sum()) > 1 else 0.0,
            float(scores[finite].median()) if finite.any() else float("nan"),
            int((~finite).sum()),
        )
    return scores


def select_batch(
    scores: Tensor,
    k: int,
    *,
    method: str = "top-k",
    beta: float = 1.0,
    exclude: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Select up to ``k`` pool indices from acquisition scores.

    ``"top-k"`` takes the ``k`` largest scores, ties broken by the lower index.
    ``"power"`` samples ``k`` indices without replacement with probability proportional to
    ``score^β``, as the top-k of ``β·log(score) + Gumbel noise``. Negative scores count as 0
    and are chosen only after every positive score.

    Excluded indices (labelled, evaluation split, in open batches) are never returned, and
    no index is returned twice. Non-finite scores never win: they are chosen only after
    every finite score, by ascending index. When fewer than ``k`` indices are selectable,
    all of them are returned, so the result can be shorter than ``k`` as the pool runs dry.

    Parameters
    ----------
    scores : Tensor, shape (N,)
        Acquisition scores, higher is more informative.
    k : int
        Batch size, at least 0.
    method : str
        ``"top-k"`` or ``"power"``.
    beta : float
        Exponent ``β > 0`` of power selection.
    exclude : Tensor, shape (N,), bool, optional
        True for indices that must not be selected.
    generator : torch.Generator, optional
        Source of the Gumbel noise, required for ``"power"``.

    Returns
    -------
    Tensor, shape (k',), int64
        Selected indices in selection order, ``k' = min(k, selectable)``, on the device of
        ``scores``.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise InputError(f"scores must be a 1-D floating-point tensor, got {shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputError(f"k must be an integer of at least 0, got {k!r}")
    if method not in ("top-k", "power"):
        raise InputError(f"unknown selection method {method!r}. Expected 'top-k' or 'power'")
    beta = check_positive("beta", beta)
    selectable = torch.ones_like(scores, dtype=torch.bool)
    if exclude is not None:
        if not isinstance(exclude, Tensor) or exclude.dtype != torch.bool:
            raise InputError("exclude must be a bool tensor with one entry per score")
        if exclude.shape != scores.shape:
            raise InputError(
                f"exclude has shape {tuple(exclude.shape)} but scores have {tuple(scores.shape)}"
            )
        selectable = ~exclude.to(scores.device)

    finite = torch.isfinite(scores) & selectable
    non_finite = ~torch.isfinite(scores) & selectable
    if bool(non_finite.any()):
        logger.warning(
            "%d selectable scores are not finite, so they rank after all finite scores",
            int(non_finite.sum()),
        )

    candidates = torch.nonzero(finite).flatten()  # ascending index
    keys = scores[candidates].to(torch.float64)
    if method == "power":
        if generator is None:
            raise InputError(
                "power selection needs a torch.Generator for its Gumbel noise. Pass "
                "generator=torch.Generator().manual_seed(...)"
            )
        uniform = torch.rand(
            keys.shape, generator=generator, dtype=torch.float64, device=generator.device
        ).to(keys.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0 - 1e-16)))
        keys = beta * torch.log(keys.clamp_min(0.0)) + gumbel
    # A stable descending sort keeps ascending index order among equal keys.
    order = torch.sort(keys, descending=True, stable=True).indices
    ranked = candidates[order]
    ranked = torch.cat([ranked, torch.nonzero(non_finite).flatten()])
    selected = ranked[:k]
    if selected.numel() < k:
        logger.info("Selected %d of %d requested images: the pool is exhausted", len(selected), k)
    return selected


def _score_chunk(
    posterior: LogitPosterior,
    features: Tensor,
    offsets: Tensor | None,
    strategy: Strategy,
    *,
    sampling: LogitSampling,
    num_samples: int,
    generator: torch.Generator | None,
    draws: WeightDraws | None,
    targets: Tensor | None,
    sampled_classes: int | None = None,
) -> Tensor:
    if strategy is Strategy.ENTROPY:
        return entropy(torch.softmax(posterior.map_logits(features, offsets), dim=-1))
    if strategy is Strategy.MARGIN:
        return margin(torch.softmax(posterior.map_logits(features, offsets), dim=-1))
    if strategy is Strategy.VARIANCE:
        _, variance = posterior.logit_moments(features, offsets, chunk_size=features.shape[0])
        return variance.sum(-1)

    num_classes = posterior.num_classes
    moments = None
    if strategy in _SAMPLED and sampling is LogitSampling.INDEPENDENT:
        moments = posterior.logit_moments(features, offsets, chunk_size=features.shape[0])
        if sampled_classes is not None and num_classes > sampled_classes + 1:
            moments = truncate_logit_moments(*moments, sampled_classes)
            num_classes = sampled_classes + 1
    group = max(1, ELEMENT_BUDGET // (num_samples * num_classes))
    if strategy is Strategy.EPIG and targets is not None:
        # The (rows, M, C, C) joint must fit the budget too.
        group = max(1, min(group, ELEMENT_BUDGET // (targets.shape[1] * num_classes**2)))

    parts = []
    for start in range(0, features.shape[0], group):
        rows = slice(start, start + group)
        rows_offsets = None if offsets is None else offsets[rows]
        if moments is not None:
            logits = sample_logits(moments[0][rows], moments[1][rows], num_samples, generator)
        elif sampling is LogitSampling.EMBEDDING and strategy is not Strategy.EPIG:
            logits = posterior.sampled_embedding_logits(  # type: ignore[attr-defined]
                features[rows], num_samples, generator, rows_offsets
            )
        else:
            logits = posterior.sampled_logits(features[rows], draws, rows_offsets)
        if strategy is Strategy.EPIG:
            parts.append(epig(torch.softmax(logits, dim=-1), targets))
        elif strategy is Strategy.PREDICTIVE_ENTROPY:
            parts.append(predictive_entropy(torch.softmax(logits, dim=-1)))
        else:
            parts.append(bald_from_logits(logits))
    return torch.cat(parts)


def truncate_logit_moments(mean: Tensor, variance: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """Keep each row's ``kept`` most plausible classes and merge the others into one.

    The kept classes are those with the largest upper bound ``mean + 3·sd``. The merged class
    gets the logit ``logsumexp`` of the other classes' means, which gives it their total
    softmax mass at the mean, and variance 0. Merging classes is a function of the label,
    so BALD of the merged label is at most BALD of the original one.

    Parameters
    ----------
    mean, variance : Tensor, shape (N, C)
        Marginal logit moments.
    kept : int
        Classes kept per row, less than ``C - 1``.

    Returns
    -------
    tuple of Tensor, each shape (N, kept + 1)
        Moments of the kept classes, then of the merged class.
    """
    check_positive_int("kept", kept)
    upper = mean + 3.0 * variance.clamp_min(0.0).sqrt()
    top = upper.topk(kept, dim=-1).indices  # (N, kept)
    others = torch.ones_like(mean, dtype=torch.bool).scatter_(-1, top, False)
    merged = torch.logsumexp(mean.masked_fill(~others, float("-inf")), dim=-1, keepdim=True)
    truncated_mean = torch.cat([mean.gather(-1, top), merged], dim=-1)
    truncated_variance = torch.cat([variance.gather(-1, top), torch.zeros_like(merged)], dim=-1)
    return truncated_mean, truncated_variance


def _target_probabilities(
    posterior: LogitPosterior,
    draws: WeightDraws,
    features: Tensor,
    offsets: Tensor | None,
    target_features: Tensor | None,
    target_offsets: Tensor | None,
    num_targets: int,
    generator: torch.Generator,
) -> Tensor:
    """Return the target set's probabilities (S, M, C) under the shared draws."""
    if target_features is None:
        check_positive_int("num_targets", num_targets)
        count = min(num_targets, features.shape[0])
        order = torch.randperm(features.shape[0], generator=generator, device=generator.device)
        index = order[:count].to(features.device)
        target_features = features[index]
        target_offsets = None if offsets is None else offsets[index]
    else:
        check_tensor("target_features", target_features, ndim=2)
        if target_features.shape[1] != features.shape[1]:
            raise InputError(
                f"target_features have width {target_features.shape[1]} but the pool has "
                f"{features.shape[1]}"
            )
        if (target_offsets is None) != (offsets is None):
            raise InputError("pass target_offsets exactly when the pool has offsets")
    logits = posterior.sampled_logits(target_features, draws, target_offsets)
    return torch.softmax(logits, dim=-1)


def _parse_enum(kind: type[_Option], value: object, name: str) -> _Option:
    try:
        return kind(value)
    except ValueError as error:
        options = ", ".join(repr(member.value) for member in kind)
        raise InputError(f"unknown {name} {value!r}. Expected one of {options}") from error

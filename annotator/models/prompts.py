"""Class prompts: templates filled with class names, averaged into one text feature per class.

CLIP zero-shot classification represents a class by the mean of the normalised embeddings of
several prompts ("a photo of a {}.", ...). The Bayesian core needs the text side as features
``ψ`` that enter the random text projection ``W_txt`` linearly, so the average is taken over
features scaled by their embedding norms:

    ψ̄_c = mean_t  ψ_ct / ‖W_txt ψ_ct‖        so that        W_txt ψ̄_c = mean_t  h_ct / ‖h_ct‖

for the prompts ``t`` of class ``c`` and ``h_ct = W_txt ψ_ct``. With a folded projection bias
the last entry of ``ψ̄_c`` is ``mean_t 1/‖h_ct‖`` rather than 1; the identity still holds.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

from annotator.config import DEFAULT_TEMPLATES
from annotator.errors import ConfigError, InputError, NumericalError
from annotator.models.towers import VisionLanguageModel

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEMPLATES",
    "check_templates",
    "class_text_features",
    "fill_templates",
]

PLACEHOLDER = "{}"


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Validate prompt templates: at least one, each with exactly one ``{}`` for the class name.

    Raises
    ------
    ConfigError
        For an empty list or a template without exactly one ``{}``.
    """
    if isinstance(templates, str):
        raise ConfigError(f"templates must be a list of strings, got the string {templates!r}")
    checked = tuple(templates)
    if not checked:
        raise ConfigError("no prompt templates given; use e.g. ['a photo of a {}.']")
    for template in checked:
        if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
            raise ConfigError(
                f"prompt template {template!r} must contain exactly one {PLACEHOLDER} where the "
                "class name goes, e.g. 'a photo of a {}.'"
            )
    return checked


def fill_templates(
    class_names: Sequence[str], templates: Sequence[str] | None = None
) -> list[tuple[str, ...]]:
    """Fill each template with each class name; ``DEFAULT_TEMPLATES`` when None.

    Returns
    -------
    list of tuple of str
        One tuple of prompts per class, in template order.
    """
    checked = check_templates(DEFAULT_TEMPLATES if templates is None else templates)
    names = _check_class_names(class_names)
    # str.replace leaves other braces alone, where str.format would reject them.
    return [tuple(template.replace(PLACEHOLDER, name) for template in checked) for name in names]


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise InputError(f"class names must be a list of strings, got the string {class_names!r}")
    names = list(class_names)
    if not names:
        raise InputError("no class names given; a project needs at least one class")
    blank = [repr(name) for name in names if not isinstance(name, str) or not name.strip()]
    if blank:
        raise InputError(f"class names must be non-empty strings, got {', '.join(blank)}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"duplicate class names: {', '.join(map(repr, duplicates))}")
    return names


def _warn_truncated(model: VisionLanguageModel, name: str, prompts: Sequence[str]) -> None:
    limit = model.context_length
    counts = [model.count_tokens(prompt) for prompt in prompts]
    too_long = [
        (count, prompt) for count, prompt in zip(counts, prompts, strict=True) if count > limit
    ]
    if not too_long:
        return
    longest_count, longest = max(too_long)
    message = (
        f"class {name!r}: {len(too_long)} of {len(prompts)} prompts exceed the context length "
        f"of {limit} tokens and are truncated; the longest has {longest_count} tokens: {longest!r}"
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def class_text_features(
    model: VisionLanguageModel,
    class_names: Sequence[str],
    prompts: Sequence[Sequence[str]] | None = None,
    *,
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Compute averaged class text features ``ψ̄`` with ``W_txt ψ̄_c`` the mean normalised prompt embedding.

    Parameters
    ----------
    model
        The wrapped vision–language model.
    class_names
        The ``C`` class names, distinct and non-empty.
    prompts
        One sequence of full prompts per class. When None, ``templates`` are filled with the
        class names.
    templates
        Templates with ``{}`` for the class name; ``DEFAULT_TEMPLATES`` when None. Only used
        when ``prompts`` is None.
    batch_size
        Prompts per forward pass of the text tower.

    Returns
    -------
    torch.Tensor
        ``(C, q)`` float32 on the model's device: ``ψ̄_c = mean_t ψ_ct / ‖W_txt ψ_ct‖``,
        computed in float64.

    Warns
    -----
    UserWarning
        For each class with prompts longer than the context length, naming the class and
        the token count; those prompts are truncated.
    """
    names = _check_class_names(class_names)
    if prompts is None:
        per_class = fill_templates(names, templates)
    else:
        if templates is not None:
            raise ConfigError("pass either prompts or templates, not both")
        per_class = [tuple(p) if not isinstance(p, str) else (p,) for p in prompts]
        if len(per_class) != len(names):
            raise InputError(
                f"got prompts for {len(per_class)} classes but {len(names)} class names"
            )
    for name, class_prompts in zip(names, per_class, strict=True):
        if not class_prompts or not all(isinstance(p, str) and p.strip() for p in class_prompts):
            raise InputError(
                f"class {name!r} needs at least one non-empty prompt, got {list(class_prompts)!r}"
            )
        _warn_truncated(model, name, class_prompts)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")

    # 1. Features ψ of every prompt, (T_total, q).
    flat = [prompt for class_prompts in per_class for prompt in class_prompts]
    chunks = []
    for start in range(0, len(flat), batch_size):
        tokens = model.tokenize(flat[start : start + batch_size])
        chunks.append(model.text_features(tokens).double())
    psi = torch.cat(chunks)

    # 2. Scale each by 1/‖W_txt ψ‖ and average per class, in float64.
    weight = model.text_projection.to(device=psi.device, dtype=torch.float64)
    norms = torch.linalg.vector_norm(psi @ weight.T, dim=1, keepdim=True)  # (T_total, 1)
    if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
        raise NumericalError(f"a prompt of {model.name} has a zero or non-finite text embedding")
    scaled = psi / norms
    owner = torch.repeat_interleave(
        torch.arange(len(names), device=psi.device),
        torch.tensor([len(p) for p in per_class], device=psi.device),
    )
    sums = torch.zeros(len(names), psi.shape[1], dtype=torch.float64, device=psi.device)
    sums.index_add_(0, owner, scaled)
    counts = torch.bincount(owner, minlength=len(names)).to(torch.float64)[:, None]
    logger.info("computed text features for %d classes from %d prompts", len(names), len(flat))
    return (sums / counts).float()

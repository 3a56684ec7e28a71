"""The interface that the services rank with, shared by the zero-shot and the head posterior."""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from annotator.errors import InputError


@dataclasses.dataclass(frozen=True)
class WeightDraws:
    """Weights drawn once from a posterior and reused across calls to ``sampled_logits``.

    Evaluating two feature sets under the same draws gives logits under shared weights,
    which EPIG needs. Each posterior fills the fields it uses.

    Attributes
    ----------
    image_weights : Tensor, shape (S, D, p), optional
        Draws of the image projection (zero-shot posterior).
    class_embeddings : Tensor, shape (S, C, D), optional
        Class embeddings under draws of the text projection, or the fixed class embeddings
        repeated when the text side is not random (zero-shot posterior).
    head_weights : Tensor, shape (S, C, p), optional
        Draws of the linear head (head posterior).
    """

    image_weights: Tensor | None = None
    class_embeddings: Tensor | None = None
    head_weights: Tensor | None = None

    def __post_init__(self) -> None:
        counts = {
            int(value.shape[0])
            for value in (self.image_weights, self.class_embeddings, self.head_weights)
            if value is not None
        }
        if not counts:
            raise InputError("WeightDraws needs at least one tensor of draws")
        if len(counts) > 1:
            raise InputError(f"the tensors of WeightDraws disagree on the sample count: {counts}")

    @property
    def num_samples(self) -> int:
        """Number of draws ``S``."""
        present = [
            value
            for value in (self.image_weights, self.class_embeddings, self.head_weights)
            if value is not None
        ]
        return int(present[0].shape[0])


@runtime_checkable
class LogitPosterior(Protocol):
    """A Gaussian posterior over the class logits of an image.

    ``features`` are the image features ``φ`` (N, p) that enter the image projection, with
    any projection bias folded in as a trailing constant 1. ``offsets`` (N, D) are per-image
    terms added after the projection and held fixed (SigLIP's residual), None for CLIP.
    """

    num_classes: int

    def logit_moments(
        self, features: Tensor, offsets: Tensor | None = None, *, chunk_size: int = ...
    ) -> tuple[Tensor, Tensor]:
        """Compute the mean and marginal variance of the logits, both (N, C)."""
        ...

    def map_logits(self, features: Tensor, offsets: Tensor | None = None) -> Tensor:
        """Compute the logits (N, C) at the posterior mode."""
        ...

    def sample_weights(self, num_samples: int, generator: torch.Generator) -> WeightDraws:
        """Draw ``num_samples`` weight settings from the posterior."""
        ...

    def sampled_logits(
        self, features: Tensor, draws: WeightDraws, offsets: Tensor | None = None
    ) -> Tensor:
        """Compute the logits (S, N, C) under each draw."""
        ...

"""Estimate the KFAC posterior factors of a model's projections and save them.

Two sources of curvature:

- image–caption pairs (a CSV of ``path,caption``, or the demo model's training pairs): each
  batch is the InfoNCE (or SigLIP) set, as in pretraining, so both projections get factors;
- a project's unlabelled pool with the class prompts as the text set: only the image
  projection gets factors, and the text side stays fixed.

The prior precision of each side is then chosen by maximising the Laplace evidence, and
the result is written in the BayesVLM directory format.

The effective number of data points ``n`` scales the curvature against the prior. It
defaults to the number of samples the factors were estimated from, the textbook Laplace
choice since ``A`` and ``B`` are means of per-sample terms. The factors that the BayesVLM
authors publish use ``n = 1`` with a larger ``λ``. On the demo, the sample count gave a
better calibrated zero-shot predictive than ``n = 1`` (docs/benchmarks.md). The head's own
prior scale is tuned by the evidence of the labels after each batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from annotator.bayes import (
    FactorEstimator,
    KroneckerFactors,
    ProjectionFactors,
    save_factors,
    with_optimized_prior_precision,
)
from annotator.data.datasets import read_caption_pairs
from annotator.data.images import load_rgb
from annotator.errors import InputError
from annotator.models.loading import load_model
from annotator.models.specs import ModelSpec
from annotator.models.towers import VisionLanguageModel
from annotator.services.inference import (
    ESTIMATED_FACTORS_DIRNAME,
    load_snapshot,
    open_feature_cache,
)
from annotator.services.project import Project
from annotator.services.ranking import compute_device

logger = logging.getLogger(__name__)

DEFAULT_NUM_DATA: float | None = None
"""Effective number of data points ``n`` of estimated factors; None uses the sample count."""


def estimate_pair_factors(
    *,
    spec: str,
    output: Path,
    pairs: Path | None = None,
    arch: str | None = None,
    batch_size: int = 64,
    num_data: float | None = DEFAULT_NUM_DATA,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Estimate both projections' factors from image–caption pairs and save them to ``output``.

    ``pairs`` is a CSV of ``path,caption``; for the ``demo`` model it may be None, and the
    pairs the demo model was trained on are used. The pairs are shuffled with ``seed``
    because each batch is the contrastive set of its members.
    """
    if batch_size < 2:
        raise InputError(
            f"batch size {batch_size} is too small; the contrastive set needs at least 2 pairs"
        )
    model_spec = ModelSpec.parse(spec, arch=arch)
    model = load_model(model_spec)
    estimator = FactorEstimator(
        model.kind, logit_scale=model.logit_scale, logit_bias=model.logit_bias
    )

    batches, total = _pair_batches(model, model_spec, pairs, batch_size, seed)
    for pixels, captions in tqdm(
        batches, total=total, desc="estimating factors", unit="batch", disable=not progress
    ):
        image = model.image_features(pixels.to(model.device, model.dtype))
        features = image.features.double()
        embeddings = _embed(features, model.image_projection, image.offsets)
        text_features = model.text_features(model.tokenize(captions).to(model.device)).double()
        text_embeddings = _embed(text_features, model.text_projection, None)
        estimator.update(
            features, embeddings, text_features=text_features, text_embeddings=text_embeddings
        )

    factors = estimator.finalize(num_data=num_data)
    factors = ProjectionFactors(
        image=_with_evidence_prior(factors.image, model.image_projection),
        text=None
        if factors.text is None
        else _with_evidence_prior(factors.text, model.text_projection),
    )
    save_factors(factors, output)
    logger.info(
        "saved factors from %d pairs to %s (λ_img %.4g)",
        estimator.num_image_samples,
        output,
        factors.image.prior_precision,
    )
    return output


def estimate_project_factors(
    project: Project,
    *,
    output: Path | None = None,
    progress: bool = True,
    num_data: float | None = DEFAULT_NUM_DATA,
) -> Path:
    """Estimate the image projection's factors from the project's pool with its class prompts."""
    snapshot = load_snapshot(project)
    cache = open_feature_cache(project)
    device = compute_device(project)
    estimator = FactorEstimator(
        snapshot.kind, logit_scale=snapshot.logit_scale, logit_bias=snapshot.logit_bias
    )
    weight = snapshot.image_projection.to(device, torch.float64)
    class_embeddings = (
        snapshot.class_features.to(device, torch.float64)
        @ snapshot.text_projection.to(device, torch.float64).T
    )

    usable = project.store.images_frame(project.project_id, status="ok").sort_values("feature_row")
    rows = usable["feature_row"].to_numpy(dtype=np.int64)
    chunk = 4096
    for start in tqdm(range(0, rows.size, chunk), desc="estimating factors", disable=not progress):
        block = rows[start : start + chunk]
        features = torch.from_numpy(np.asarray(cache.features[block], dtype=np.float64)).to(device)
        offsets = None
        if cache.offsets is not None:
            offsets = torch.from_numpy(np.asarray(cache.offsets[block], dtype=np.float64)).to(
                device
            )
        estimator.update(
            features, _embed(features, weight, offsets), class_embeddings=class_embeddings
        )

    factors = estimator.finalize(num_data=num_data)
    factors = ProjectionFactors(
        image=_with_evidence_prior(factors.image, snapshot.image_projection), text=None
    )
    directory = output or project.model_cache_dir / ESTIMATED_FACTORS_DIRNAME
    save_factors(factors, directory)
    logger.info("estimated image factors from %d pool images into %s", rows.size, directory)
    return directory


def _embed(
    features: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None
) -> torch.Tensor:
    """Embeddings ``g = W φ (+ offset)`` in the dtype and device of ``features``."""
    embeddings = features @ weight.to(features.device, features.dtype).T
    if offsets is not None:
        embeddings = embeddings + offsets.to(features.device, features.dtype)
    return embeddings


def _with_evidence_prior(factors: KroneckerFactors, weight: torch.Tensor) -> KroneckerFactors:
    return with_optimized_prior_precision(factors, weight.double())


def _pair_batches(
    model: VisionLanguageModel,
    spec: ModelSpec,
    pairs: Path | None,
    batch_size: int,
    seed: int,
) -> tuple[Iterator[tuple[torch.Tensor, list[str]]], int]:
    """Shuffled batches of (preprocessed images, captions) and their count."""
    rng = np.random.default_rng(seed)
    if pairs is None:
        if spec.kind != "demo":
            raise InputError(f"model {spec} needs --pairs CSV of path,caption to estimate factors")
        from annotator.models.demo import demo_training_pairs

        images, captions = demo_training_pairs(seed)
        order = rng.permutation(len(captions))
        starts = range(0, len(order), batch_size)
        batches = (
            (images[order[i : i + batch_size]], [captions[j] for j in order[i : i + batch_size]])
            for i in starts
        )
        return batches, len(starts)
    dataset = read_caption_pairs(pairs)
    order = rng.permutation(len(dataset.paths))
    paths = [dataset.paths[i] for i in order]
    captions = [dataset.captions[i] for i in order]
    starts = range(0, len(paths), batch_size)
    return _decoded_batches(model, paths, captions, batch_size), len(starts)


def _decoded_batches(
    model: VisionLanguageModel, paths: list[Path], captions: list[str], batch_size: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Decode one batch at a time; an image that fails to decode is skipped with a warning."""
    for start in range(0, len(paths), batch_size):
        pixels, kept = [], []
        for path, caption in zip(
            paths[start : start + batch_size], captions[start : start + batch_size], strict=True
        ):
            try:
                pixels.append(model.preprocess(load_rgb(path)))
            except (OSError, ValueError) as error:
                logger.warning("skipped pair image %s: %s", path, error)
                continue
            kept.append(caption)
        if len(kept) >= 2:
            yield torch.stack(pixels), kept

"""The project's model state between rounds: projections, class text features, posteriors.

Ranking and refitting never load the vision–language model. Ingestion saves what they need
(the projection weights, the logit scale and the averaged class text features) as a
snapshot in the project's model cache, and the posterior factors beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from annotator.bayes import (
    KroneckerFactors,
    LogitPosterior,
    ProjectionFactors,
    ProjectionPosterior,
    ZeroShotPosterior,
    fit_head,
    load_factors,
    with_optimized_prior_precision,
)
from annotator.data.features import FeatureCache
from annotator.errors import ConfigError, FactorFormatError
from annotator.files import write_atomic
from annotator.services.project import Project

logger = logging.getLogger(__name__)

SNAPSHOT_FILENAME = "snapshot.pt"
ESTIMATED_FACTORS_DIRNAME = "factors"


@dataclass(frozen=True)
class ModelSnapshot:
    """Parts of the vision–language model that ranking needs, saved once at ingestion.

    Attributes
    ----------
    kind : "clip" or "siglip".
    image_projection : (D, p) image projection ``W_img`` (a bias folded in as the last column).
    text_projection : (D, q) text projection ``W_txt``.
    logit_scale : the exponentiated logit scale ``s``.
    logit_bias : SigLIP's logit bias ``b``, None for CLIP.
    class_features : (C, q) averaged class text features ``ψ̄``.
    prompts_digest : hash of the class prompts the class features were computed from.
    has_offsets : whether image features come with a per-image offset (SigLIP's residual).
    """

    kind: str
    image_projection: torch.Tensor
    text_projection: torch.Tensor
    logit_scale: float
    logit_bias: float | None
    class_features: torch.Tensor
    prompts_digest: str
    has_offsets: bool

    @property
    def image_dim(self) -> int:
        return int(self.image_projection.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text_projection.shape[1])

    @property
    def embed_dim(self) -> int:
        return int(self.image_projection.shape[0])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        snapshot = {
            "kind": self.kind,
            "image_projection": self.image_projection.cpu(),
            "text_projection": self.text_projection.cpu(),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "class_features": self.class_features.cpu(),
            "prompts_digest": self.prompts_digest,
            "has_offsets": self.has_offsets,
        }
        write_atomic(path, lambda file: torch.save(snapshot, file))

    @classmethod
    def load(cls, path: Path) -> ModelSnapshot:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**data)


def prompts_digest(prompts: list[tuple[str, ...]]) -> str:
    """Hash class prompts, so a changed prompt invalidates the cached class features."""
    return hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()[:16]


def snapshot_path(project: Project) -> Path:
    return project.model_cache_dir / SNAPSHOT_FILENAME


def load_snapshot(project: Project) -> ModelSnapshot:
    """Load the project's model snapshot, checking that it matches the configured prompts."""
    path = snapshot_path(project)
    if not path.is_file():
        raise ConfigError(
            f"project {project.config.name!r} has no model snapshot at {path}; "
            f"run `annotator ingest {project.directory}` first"
        )
    snapshot = ModelSnapshot.load(path)
    expected = prompts_digest(project.config.class_prompts())
    if snapshot.prompts_digest != expected:
        raise ConfigError(
            f"the class prompts in {project.directory / 'annotator.yaml'} changed since the "
            f"features were computed; run `annotator ingest {project.directory}` to update them"
        )
    return snapshot


def open_feature_cache(project: Project) -> FeatureCache:
    return FeatureCache.open(project.features_dir)


def factors_directory(project: Project) -> Path:
    """Return the folder that contains the project's posterior factors, per its config."""
    source = project.config.posterior.factors
    if source == "estimate":
        return project.model_cache_dir / ESTIMATED_FACTORS_DIRNAME
    if source == "demo":
        from annotator.models.demo import demo_model_dir

        return demo_model_dir() / "hessians"
    return project.config.resolve_path(project.directory, source)


def load_project_factors(project: Project, snapshot: ModelSnapshot) -> ProjectionFactors:
    """Load the posterior factors for the project's model and apply the config's overrides."""
    directory = factors_directory(project)
    if not directory.is_dir():
        hint = (
            f"run `annotator ingest {project.directory}` to estimate them"
            if project.config.posterior.factors == "estimate"
            else "set posterior.factors to a folder in the BayesVLM format, or to `estimate`"
        )
        raise FactorFormatError(f"posterior factor folder {directory} not found; {hint}")
    # Factors estimated from the pool have no text side; the text shape is then not required.
    has_text = (directory / "A_txt_analytic.pt").exists() or (
        directory / "B_txt_analytic.pt"
    ).exists()
    factors = load_factors(
        directory,
        image_shape=(snapshot.image_dim, snapshot.embed_dim),
        text_shape=(snapshot.text_dim, snapshot.embed_dim) if has_text else None,
    )
    settings = project.config.posterior
    image = _override(factors.image, settings.n_img, settings.lambda_img)
    text = factors.text
    if text is not None:
        text = _override(text, settings.n_txt, settings.lambda_txt)
    if settings.optimize_prior:
        image = _reoptimize(image, snapshot.image_projection)
        if text is not None:
            text = _reoptimize(text, snapshot.text_projection)
    return ProjectionFactors(image=image, text=text)


def _override(
    factors: KroneckerFactors, n: float | None, prior_precision: float | None
) -> KroneckerFactors:
    return KroneckerFactors(
        A=factors.A,
        B=factors.B,
        n=factors.n if n is None else n,
        prior_precision=factors.prior_precision if prior_precision is None else prior_precision,
    )


def _reoptimize(factors: KroneckerFactors, weight: torch.Tensor) -> KroneckerFactors:
    optimized = with_optimized_prior_precision(factors, weight.double())
    logger.info(
        "re-optimised prior precision %.4g -> %.4g",
        factors.prior_precision,
        optimized.prior_precision,
    )
    return optimized


def zero_shot_posterior(
    snapshot: ModelSnapshot, factors: ProjectionFactors, device: torch.device | str = "cpu"
) -> ZeroShotPosterior:
    """Build the zero-shot posterior: the image projection random, and the text one too when
    its factors are known."""
    image = ProjectionPosterior(snapshot.image_projection.to(device), factors.image)
    if factors.text is None:
        class_embeddings = snapshot.class_features.to(device, torch.float64) @ (
            snapshot.text_projection.to(device, torch.float64).T
        )
        return ZeroShotPosterior(
            image,
            class_embeddings=class_embeddings,
            logit_scale=snapshot.logit_scale,
            logit_bias=snapshot.logit_bias,
        )
    return ZeroShotPosterior(
        image,
        class_features=snapshot.class_features.to(device),
        text=ProjectionPosterior(snapshot.text_projection.to(device), factors.text),
        logit_scale=snapshot.logit_scale,
        logit_bias=snapshot.logit_bias,
    )


@dataclass(frozen=True)
class LabelledSet:
    """Current labels of one split: image ids, feature rows and class indices, each (n,)."""

    image_ids: np.ndarray
    feature_rows: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def refit_posterior(
    project: Project,
    snapshot: ModelSnapshot,
    factors: ProjectionFactors,
    cache: FeatureCache,
    training: LabelledSet,
    device: torch.device | str = "cpu",
) -> LogitPosterior:
    """Return the posterior for the current labels: zero-shot with none, the refit head after."""
    zero_shot = zero_shot_posterior(snapshot, factors, device)
    if len(training) == 0:
        return zero_shot
    features, offsets = read_features(cache, training.feature_rows)
    return fit_head(
        zero_shot,
        features.to(device),
        torch.tensor(training.labels, dtype=torch.long, device=device),
        None if offsets is None else offsets.to(device),
        covariance=project.config.posterior.head_posterior,
        prior_scale=project.config.posterior.head_prior_scale,
    )


def read_features(
    cache: FeatureCache, rows: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read feature rows (and offsets) from the memory-mapped cache as float64 tensors."""
    order = np.asarray(rows, dtype=np.int64)
    features = torch.from_numpy(np.asarray(cache.features[order], dtype=np.float64))
    offsets = None
    if cache.offsets is not None:
        offsets = torch.from_numpy(np.asarray(cache.offsets[order], dtype=np.float64))
    return features, offsets

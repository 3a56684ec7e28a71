"""Bayesian core: KFAC Laplace posteriors of the CLIP projections, similarity moments,
the refit linear head and acquisition scores. Tensors in, tensors out."""

from annotator.bayes.acquisition import LogitSampling, Strategy, score_pool, select_batch
from annotator.bayes.factors import (
    FactorEstimator,
    KroneckerFactors,
    ProjectionFactors,
    load_factors,
    save_factors,
)
from annotator.bayes.head import HeadCovariance, HeadPosterior, fit_head
from annotator.bayes.hessians import (
    ContrastiveLoss,
    clip_embedding_hessian,
    siglip_embedding_hessian,
)
from annotator.bayes.interface import LogitPosterior, WeightDraws
from annotator.bayes.moments import (
    cosine_moments,
    dot_product_moments,
    separable_cosine_moments,
)
from annotator.bayes.posterior import ProjectionPosterior
from annotator.bayes.prior import (
    kron_logdet,
    log_evidence,
    optimize_prior_precision,
    with_optimized_prior_precision,
)
from annotator.bayes.zeroshot import ZeroShotPosterior

__all__ = [
    "ContrastiveLoss",
    "FactorEstimator",
    "HeadCovariance",
    "HeadPosterior",
    "KroneckerFactors",
    "LogitPosterior",
    "LogitSampling",
    "ProjectionFactors",
    "ProjectionPosterior",
    "Strategy",
    "WeightDraws",
    "ZeroShotPosterior",
    "clip_embedding_hessian",
    "cosine_moments",
    "dot_product_moments",
    "fit_head",
    "kron_logdet",
    "load_factors",
    "log_evidence",
    "optimize_prior_precision",
    "save_factors",
    "score_pool",
    "select_batch",
    "separable_cosine_moments",
    "siglip_embedding_hessian",
    "with_optimized_prior_precision",
]

"""Zero-shot CLIP or SigLIP classification with Laplace posteriors over the projections.

The logit of image ``n`` for class ``c`` is ``z_nc = s cos(g_n, h_c) + b`` with the image
embedding ``g_n = W_img φ_n + offset_n`` and the class embedding ``h_c = W_txt ψ̄_c``. Under
the matrix-normal posteriors of ``W_img`` (and optionally ``W_txt``) both embeddings are
Gaussian with separable diagonal variances, and the logit moments follow from
:func:`annotator.bayes.moments.separable_cosine_moments`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from annotator.bayes._checks import (
    check_finite_number,
    check_offsets,
    check_positive,
    check_positive_int,
    check_shape,
    check_tensor,
    compute_dtype,
)
from annotator.bayes.interface import WeightDraws
from annotator.bayes.moments import _separable_cosine_moments
from annotator.bayes.posterior import DEFAULT_CHUNK_SIZE, ELEMENT_BUDGET, ProjectionPosterior
from annotator.errors import InputError

logger = logging.getLogger(__name__)


class ZeroShotPosterior:
    """Logit posterior of zero-shot classification against fixed class prompts.

    Pass either ``class_embeddings`` (the text side is held fixed) or ``class_features``
    with the ``text`` posterior (the text projection is random too).

    Parameters
    ----------
    image : ProjectionPosterior
        Posterior of the image projection, ``W_img`` (D, p).
    class_embeddings : Tensor, shape (C, D), optional
        Fixed class embeddings ``h_c``.
    class_features : Tensor, shape (C, q), optional
        Class text features ``ψ̄_c`` entering the text projection; requires ``text``.
    text : ProjectionPosterior, optional
        Posterior of the text projection, ``W_txt`` (D, q).
    logit_scale : float
        Scale ``s``, already exponentiated.
    logit_bias : float, optional
        Bias ``b`` for SigLIP, None for CLIP.

    Attributes
    ----------
    num_classes : int
        Number of classes ``C``.
    class_embeddings : Tensor, shape (C, D)
        Mean class embeddings in float64, unnormalised.
    """

    def __init__(
        self,
        image: ProjectionPosterior,
        *,
        class_embeddings: Tensor | None = None,
        class_features: Tensor | None = None,
        text: ProjectionPosterior | None = None,
        logit_scale: float,
        logit_bias: float | None = None,
    ) -> None:
        self.image = image
        self.text = text
        self.logit_scale = check_positive("logit_scale", logit_scale)
        self.logit_bias = (
            None if logit_bias is None else check_finite_number("logit_bias", logit_bias)
        )
        device = image.weight.device

        if (class_embeddings is None) == (class_features is None):
            raise InputError(
                "pass exactly one of class_embeddings (fixed text side) and class_features "
                "(random text side, with the text posterior)"
            )
        if class_features is not None:
            if text is None:
                raise InputError(
                    "class_features need the text projection posterior. Pass text=, or pass "
                    "class_embeddings to hold the text side fixed"
                )
            check_tensor("class_features", class_features, ndim=2)
            check_shape("class_features", class_features, (None, text.input_dim))
            if text.output_dim != image.output_dim:
                raise InputError(
                    f"the text projection outputs {text.output_dim} dimensions but the image "
                    f"projection outputs {image.output_dim}. Use posteriors of one model"
                )
            self.class_features: Tensor | None = class_features.to(device, torch.float64)
            self.class_embeddings = self.class_features @ text.weight.to(device).T
            # σ_h,c² = (ψ̄_cᵀ A_txt'⁻¹ ψ̄_c) · diag(B_txt'⁻¹)
            self._text_scale: Tensor | None = text.input_variance(self.class_features).to(device)
            self._text_profile: Tensor | None = text.output_variance.to(device)
        else:
            if text is not None:
                raise InputError(
                    "text is only used with class_features. Drop text= or pass class_features"
                )
            check_tensor("class_embeddings", class_embeddings, ndim=2)
            check_shape("class_embeddings", class_embeddings, (None, image.output_dim))
            self.class_features = None
            self.class_embeddings = class_embeddings.to(device, torch.float64)
            self._text_scale = None
            self._text_profile = None

        if bool((self.class_embeddings.norm(dim=-1) == 0).any()):
            raise InputError("a class embedding is all zeros, so its cosine is undefined")
        self.num_classes = int(self.class_embeddings.shape[0])
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, Tensor | None]] = {}

    @property
    def text_is_random(self) -> bool:
        """Whether the text projection is random as well."""
        return self.text is not None

    def logit_moments(
        self,
        features: Tensor,
        offsets: Tensor | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> tuple[Tensor, Tensor]:
        """Compute the mean and marginal variance of the logits of a pool.

        Per chunk: ``μ_g = W* φ + offset``, ``v = φᵀ A'⁻¹ φ`` (one (chunk, p) × (p, p)
        product), then ``mean = s E[cos] + b`` and ``variance = s² Var[cos]`` from the
        separable cosine moments with ``σ_g² = v · diag(B'⁻¹)``.

        Parameters
        ----------
        features : Tensor, shape (N, p)
            Image features ``φ``.
        offsets : Tensor, shape (N, D), optional
            Fixed per-image terms added after the projection.
        chunk_size : int
            Rows per chunk. Memory is ``O(chunk · (p + D + C))``.

        Returns
        -------
        mean : Tensor, shape (N, C)
        variance : Tensor, shape (N, C)
            On the device of ``features``, float64 for float64 features and float32
            otherwise.
        """
        self._check_pool(features, offsets)
        check_positive_int("chunk_size", chunk_size)
        means, variances = [], []
        for start in range(0, features.shape[0], chunk_size):
            chunk_offsets = None if offsets is None else offsets[start : start + chunk_size]
            mean, variance = self._chunk_logit_moments(
                features[start : start + chunk_size], chunk_offsets
            )
            means.append(mean)
            variances.append(variance)
        if not means:
            empty = features.new_zeros(0, self.num_classes, dtype=compute_dtype(features))
            return empty, empty.clone()
        return torch.cat(means), torch.cat(variances)

    def map_logits(self, features: Tensor, offsets: Tensor | None = None) -> Tensor:
        """Compute the deterministic logits ``s cos(W* φ + offset, h_c) + b``, shape (N, C)."""
        self._check_pool(features, offsets)
        matrices = self._matrices(features)
        embeddings = features.to(matrices["weight_t"].dtype) @ matrices["weight_t"]
        if offsets is not None:
            embeddings = embeddings + offsets.to(embeddings.dtype)
        return self._cosine_logits(embeddings, matrices["unit_classes"])

    def sample_weights(
        self,
        num_samples: int,
        generator: torch.Generator,
        *,
        dtype: torch.dtype | None = None,
    ) -> WeightDraws:
        """Draw the image projection and the class embeddings under the text projection.

        Parameters
        ----------
        num_samples : int
            Number of draws ``S``.
        generator : torch.Generator
            Source of randomness. A CPU generator gives the same draws on every device.
        dtype : torch.dtype, optional
            Dtype of the stored draws, float64 when None. The image draws take
            ``S·D·p`` entries (about 315 MB for S=100, D=512, p=768 in float64), and a
            random text side adds ``S·C·D``. Float32 halves the memory, and its rounding is
            far below the sampling noise.

        Returns
        -------
        WeightDraws
            ``image_weights`` (S, D, p) and ``class_embeddings`` (S, C, D).
        """
        check_positive_int("num_samples", num_samples)
        dtype = torch.float64 if dtype is None else dtype
        image_weights = self.image.sample_weights(num_samples, generator, dtype=dtype)
        if self.text is not None and self.class_features is not None:
            classes = self.text.sample_projected(self.class_features, num_samples, generator)
            classes = classes.to(dtype)
        else:
            # A fixed text side repeats one (C, D) matrix as a view, without copies.
            classes = self.class_embeddings.to(dtype).expand(num_samples, -1, -1)
        return WeightDraws(image_weights=image_weights, class_embeddings=classes)

    def sampled_logits(
        self, features: Tensor, draws: WeightDraws, offsets: Tensor | None = None
    ) -> Tensor:
        """Compute the logits ``s cos(W_s φ + offset, h_s,c) + b`` under each draw.

        Parameters
        ----------
        features : Tensor, shape (N, p)
            Image features ``φ``.
        draws : WeightDraws
            Draws from :meth:`sample_weights`.
        offsets : Tensor, shape (N, D), optional
            Fixed per-image terms added after the projection.

        Returns
        -------
        Tensor, shape (S, N, C)
            On the device of ``features``.
        """
        self._check_pool(features, offsets)
        if draws.image_weights is None or draws.class_embeddings is None:
            raise InputError(
                "draws lack image_weights or class_embeddings. Use the draws from this "
                "posterior's sample_weights"
            )
        check_shape(
            "draws.image_weights",
            draws.image_weights,
            (None, self.image.output_dim, self.image.input_dim),
        )
        check_shape(
            "draws.class_embeddings",
            draws.class_embeddings,
            (None, self.num_classes, self.image.output_dim),
        )
        dtype = compute_dtype(features)
        features = features.to(dtype)
        num_samples = draws.num_samples
        logits = features.new_empty(num_samples, features.shape[0], self.num_classes)
        group = _draw_group_size(features.shape[0], self.image.output_dim, self.num_classes)
        for start in range(0, num_samples, group):
            stop = min(start + group, num_samples)
            weights = draws.image_weights[start:stop].to(device=features.device, dtype=dtype)
            embeddings = torch.matmul(features, weights.transpose(1, 2))  # (s, N, D)
            if offsets is not None:
                embeddings = embeddings + offsets.to(dtype)
            classes = draws.class_embeddings[start:stop].to(device=features.device, dtype=dtype)
            unit_classes = classes / classes.norm(dim=-1, keepdim=True)  # (s, C, D)
            logits[start:stop] = self._cosine_logits(embeddings, unit_classes)
        return logits

    def sampled_embedding_logits(
        self,
        features: Tensor,
        num_samples: int,
        generator: torch.Generator,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """Compute logits under draws of the embeddings from their diagonal Gaussians.

        Each draw samples ``g_n ~ N(μ_g,n, diag σ_g,n²)`` for every image and, when the text
        side is random, ``h_c ~ N(μ_h,c, diag σ_h,c²)`` for every class. All classes of an
        image share its embedding draw, so the logits stay correlated across classes, unlike
        independent draws from the marginal logit variances.

        Parameters
        ----------
        features : Tensor, shape (N, p)
            Image features ``φ``.
        num_samples : int
            Number of draws ``S``.
        generator : torch.Generator
            Source of randomness, drawn on the generator's device.
        offsets : Tensor, shape (N, D), optional
            Fixed per-image terms added after the projection.

        Returns
        -------
        Tensor, shape (S, N, C)
        """
        self._check_pool(features, offsets)
        check_positive_int("num_samples", num_samples)
        matrices = self._matrices(features)
        dtype = matrices["weight_t"].dtype
        features = features.to(dtype)
        mean = features @ matrices["weight_t"]  # (N, D)
        if offsets is not None:
            mean = mean + offsets.to(dtype)
        whitened = features @ matrices["whitener_t"]
        image_std = ((whitened * whitened).sum(-1)[:, None] * matrices["image_profile"]).sqrt()

        logits = features.new_empty(num_samples, features.shape[0], self.num_classes)
        group = _draw_group_size(features.shape[0], self.image.output_dim, self.num_classes)
        for start in range(0, num_samples, group):
            stop = min(start + group, num_samples)
            image_noise, class_noise = [], []
            # One generator call per draw, so the draws do not depend on the grouping.
            for _ in range(start, stop):
                image_noise.append(_standard_normal(mean.shape, generator, dtype))
                if matrices["class_std"] is not None:
                    class_noise.append(
                        _standard_normal(self.class_embeddings.shape, generator, dtype)
                    )
            embeddings = mean + image_std * torch.stack(image_noise).to(features.device)
            classes = matrices["classes"].expand(stop - start, -1, -1)
            if class_noise:
                classes = classes + matrices["class_std"] * torch.stack(class_noise).to(
                    features.device
                )
            unit_classes = classes / classes.norm(dim=-1, keepdim=True)
            logits[start:stop] = self._cosine_logits(embeddings, unit_classes)
        return logits

    def _chunk_logit_moments(self, chunk: Tensor, offsets: Tensor | None) -> tuple[Tensor, Tensor]:
        matrices = self._matrices(chunk)
        dtype = matrices["weight_t"].dtype
        chunk = chunk.to(dtype)
        # One product gives both W* φ and C_A⁻¹ φ: [W*ᵀ | C_A⁻ᵀ] is (p, D + p).
        projected = chunk @ matrices["projection_and_whitener"]
        embed_dim = self.image.output_dim
        mean_g = projected[:, :embed_dim]  # (n, D)
        if offsets is not None:
            mean_g = mean_g + offsets.to(dtype)
        whitened = projected[:, embed_dim:]  # (n, p)
        scale_g = torch.linalg.vector_norm(whitened, dim=-1).square()  # φᵀ A'⁻¹ φ, (n,)

        mean_cos, variance_cos = _separable_cosine_moments(
            mean_g,
            scale_g,
            matrices["image_profile"],
            matrices["classes"],
            matrices["class_scale"],
            matrices["class_profile"],
            chunk_size=chunk.shape[0] or 1,
        )
        mean = self.logit_scale * mean_cos
        if self.logit_bias is not None:
            mean = mean + self.logit_bias
        return mean, self.logit_scale**2 * variance_cos

    def _cosine_logits(self, embeddings: Tensor, unit_classes: Tensor) -> Tensor:
        """Compute ``s ĝ·ĥ + b`` for embeddings (..., N, D) and unit classes (..., C, D)."""
        unit = embeddings / embeddings.norm(dim=-1, keepdim=True)
        logits = self.logit_scale * torch.matmul(unit, unit_classes.transpose(-1, -2))
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    def _matrices(self, features: Tensor) -> dict[str, Tensor | None]:
        """Return the posterior's matrices on the features' device and compute dtype."""
        key = (features.device, compute_dtype(features))
        if key not in self._cache:
            device, dtype = key
            whitener_t, weight_t = self.image._matrices(features)
            classes = self.class_embeddings.to(device=device, dtype=dtype)
            class_scale = class_profile = class_std = None
            if self._text_scale is not None and self._text_profile is not None:
                class_scale = self._text_scale.to(device=device, dtype=dtype)
                class_profile = self._text_profile.to(device=device, dtype=dtype)
                class_std = (class_scale[:, None] * class_profile[None, :]).sqrt()
            self._cache[key] = {
                "whitener_t": whitener_t,
                "weight_t": weight_t,
                "projection_and_whitener": torch.cat([weight_t, whitener_t], dim=1),
                "image_profile": self.image.output_variance.to(device=device, dtype=dtype),
                "classes": classes,
                "unit_classes": classes / classes.norm(dim=-1, keepdim=True),
                "class_scale": class_scale,
                "class_profile": class_profile,
                "class_std": class_std,
            }
        return self._cache[key]

    def _check_pool(self, features: Tensor, offsets: Tensor | None) -> None:
        self.image._check_features(features)
        check_offsets(offsets, features, self.image.output_dim)


def _standard_normal(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)


def _draw_group_size(num_rows: int, embed_dim: int, num_classes: int) -> int:
    """Return how many draws to evaluate at once, so that the (s, N, D), (s, N, C) and
    (s, C, D) tensors of one group fit :data:`~annotator.bayes.posterior.ELEMENT_BUDGET`."""
    per_draw = max(num_rows * embed_dim, num_rows * num_classes, num_classes * embed_dim, 1)
    return max(1, ELEMENT_BUDGET // per_draw)

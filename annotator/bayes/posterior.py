"""Matrix-normal Laplace posterior of one projection.

For a projection ``g = W φ + offset`` with ``W`` (D, p) and damped factors ``A'`` (p, p) and
``B'`` (D, D), the posterior is ``W ~ MN(W*, row cov B'⁻¹, column cov A'⁻¹)``, that is
``Cov(vec W) = A'⁻¹ ⊗ B'⁻¹``. For one input the embedding is Gaussian,

    g ~ N(W* φ + offset, (φᵀ A'⁻¹ φ) · B'⁻¹),

and this module keeps its diagonal ``σ² = (φᵀ A'⁻¹ φ) · diag(B'⁻¹)``.

With Cholesky factors ``A' = C_A C_Aᵀ`` and ``B' = C_B C_Bᵀ``, the quadratic form is
``φᵀ A'⁻¹ φ = ‖C_A⁻¹ φ‖²`` (a sum of squares, so never negative), and weight draws are
``W = W* + C_B⁻ᵀ Z C_A⁻¹`` with ``Z`` standard normal (D, p).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from annotator.bayes._checks import (
    check_offsets,
    check_positive_int,
    check_shape,
    check_tensor,
    compute_dtype,
)
from annotator.bayes.factors import KroneckerFactors
from annotator.bayes.linalg import cholesky_with_jitter, inverse_lower_triangular
from annotator.errors import InputError

logger = logging.getLogger(__name__)

#: Default number of pool rows processed at once. Memory per chunk is ``O(chunk · (p + D))``.
DEFAULT_CHUNK_SIZE = 8192
#: Number of entries of one intermediate tensor of draws, 2**24 (128 MiB in float64).
ELEMENT_BUDGET = 2**24


class ProjectionPosterior:
    """Matrix-normal posterior ``MN(W*, B'⁻¹, A'⁻¹)`` of one projection.

    All matrices are kept in float64 on the device of ``weight``. Methods compute in float64
    for float64 inputs and in float32 otherwise, on the device of their inputs.

    Parameters
    ----------
    weight : Tensor, shape (D, p)
        Posterior mean ``W*`` in ``nn.Linear`` orientation (open_clip's ``proj.T``).
    factors : KroneckerFactors
        Factors with ``A`` (p, p) and ``B`` (D, D).

    Attributes
    ----------
    weight : Tensor, shape (D, p)
        ``W*`` in float64.
    output_variance : Tensor, shape (D,)
        ``diag(B'⁻¹)``, the per-dimension variance profile of every embedding.
    """

    def __init__(self, weight: Tensor, factors: KroneckerFactors) -> None:
        check_tensor("weight", weight, ndim=2)
        check_shape("weight", weight, (factors.output_dim, factors.input_dim))
        device = weight.device
        self.factors = factors.to(device)
        self.weight = weight.detach().to(torch.float64)

        A_damped, B_damped = self.factors.damped()
        cholesky_A = cholesky_with_jitter(A_damped, name="damped input factor A'")
        cholesky_B = cholesky_with_jitter(B_damped, name="damped output factor B'")
        # C_A⁻¹ (p, p) whitens inputs: φᵀ A'⁻¹ φ = ‖C_A⁻¹ φ‖².
        self._input_whitener = inverse_lower_triangular(cholesky_A)
        # C_B⁻ᵀ (D, D) colours draws: C_B⁻ᵀ C_B⁻¹ = B'⁻¹.
        self._output_colouring = inverse_lower_triangular(cholesky_B).T
        # diag(B'⁻¹)_k = Σ_i (C_B⁻¹)_ik².
        self.output_variance = (self._output_colouring**2).sum(dim=1)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @property
    def input_dim(self) -> int:
        """Width ``p`` of the features."""
        return int(self.weight.shape[1])

    @property
    def output_dim(self) -> int:
        """Width ``D`` of the embeddings."""
        return int(self.weight.shape[0])

    @property
    def input_covariance(self) -> Tensor:
        """Column covariance ``A'⁻¹`` (p, p) in float64."""
        return self._input_whitener.T @ self._input_whitener

    @property
    def output_covariance(self) -> Tensor:
        """Row covariance ``B'⁻¹`` (D, D) in float64."""
        return self._output_colouring @ self._output_colouring.T

    def input_variance(self, features: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
        """Compute ``φᵀ A'⁻¹ φ`` for every row of a pool.

        Each chunk costs one (chunk, p) × (p, p) product: ``rowsum((Φ C_A⁻ᵀ)²)``.

        Parameters
        ----------
        features : Tensor, shape (N, p)
            Features ``φ``.
        chunk_size : int
            Rows per chunk.

        Returns
        -------
        Tensor, shape (N,)
            Non-negative quadratic forms, on the device of ``features``.
        """
        self._check_features(features)
        check_positive_int("chunk_size", chunk_size)
        whitener_t, _ = self._matrices(features)
        parts = [
            self._chunk_input_variance(chunk, whitener_t) for chunk in features.split(chunk_size)
        ]
        return torch.cat(parts) if parts else features.new_zeros(0, dtype=whitener_t.dtype)

    def embedding_moments(
        self,
        features: Tensor,
        offsets: Tensor | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> tuple[Tensor, Tensor]:
        """Compute the mean and diagonal variance of the embeddings of a pool.

        Parameters
        ----------
        features : Tensor, shape (N, p)
            Features ``φ``.
        offsets : Tensor, shape (N, D), optional
            Fixed per-image terms added after the projection.
        chunk_size : int
            Rows per chunk.

        Returns
        -------
        mean : Tensor, shape (N, D)
            ``W* φ + offset``.
        variance : Tensor, shape (N, D)
            ``(φᵀ A'⁻¹ φ) · diag(B'⁻¹)``.
        """
        self._check_features(features)
        check_offsets(offsets, features, self.output_dim)
        check_positive_int("chunk_size", chunk_size)
        whitener_t, weight_t = self._matrices(features)
        profile = self.output_variance.to(device=features.device, dtype=weight_t.dtype)

        means, variances = [], []
        for start in range(0, features.shape[0], chunk_size):
            chunk = features[start : start + chunk_size].to(weight_t.dtype)
            mean = chunk @ weight_t  # (chunk, D)
            if offsets is not None:
                mean = mean + offsets[start : start + chunk_size].to(weight_t.dtype)
            scale = self._chunk_input_variance(chunk, whitener_t)  # (chunk,)
            means.append(mean)
            variances.append(scale[:, None] * profile[None, :])
        if not means:
            empty = features.new_zeros(0, self.output_dim, dtype=weight_t.dtype)
            return empty, empty.clone()
        return torch.cat(means), torch.cat(variances)

    def sample_weights(
        self,
        num_samples: int,
        generator: torch.Generator,
        *,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw weight matrices ``W = W* + C_B⁻ᵀ Z C_A⁻¹`` with ``Z`` standard normal.

        ``Z`` is drawn on the generator's device, so a CPU generator gives the same draws
        whatever the device of the posterior.

        Parameters
        ----------
        num_samples : int
            Number of draws ``S``.
        generator : torch.Generator
            Source of randomness.
        dtype : torch.dtype, optional
            Dtype of the result; float64 when None.

        Returns
        -------
        Tensor, shape (S, D, p)
            Draws on the device of ``weight``.
        """
        check_positive_int("num_samples", num_samples)
        dtype = torch.float64 if dtype is None else dtype
        draws = torch.empty(
            num_samples, self.output_dim, self.input_dim, dtype=dtype, device=self.weight.device
        )
        group = max(1, ELEMENT_BUDGET // (self.output_dim * self.input_dim))
        for start in range(0, num_samples, group):
            noise = self._standard_normal(min(group, num_samples - start), generator)
            coloured = self._output_colouring @ noise @ self._input_whitener  # (s, D, p)
            draws[start : start + noise.shape[0]] = self.weight + coloured
        return draws

    def sample_projected(
        self, features: Tensor, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        """Draw the embeddings ``W φ`` of a few inputs under weight draws, in float64.

        Equal to ``sample_weights(num_samples, generator) @ φᵀ`` for the same generator
        state, but never stores a (D, p) draw beyond the current one: each draw costs
        ``C_B⁻ᵀ Z (C_A⁻¹ Φᵀ)``.

        Parameters
        ----------
        features : Tensor, shape (M, p)
            Features ``φ``, such as the text features of the class prompts.
        num_samples : int
            Number of draws ``S``.
        generator : torch.Generator
            Source of randomness.

        Returns
        -------
        Tensor, shape (S, M, D)
            Embeddings under each draw, on the device of ``weight``.
        """
        self._check_features(features)
        check_positive_int("num_samples", num_samples)
        features = features.to(device=self.weight.device, dtype=torch.float64)
        mean = features @ self.weight.T  # (M, D)
        whitened = self._input_whitener @ features.T  # C_A⁻¹ Φᵀ, (p, M)
        draws = mean.new_empty(num_samples, *mean.shape)
        group = max(1, ELEMENT_BUDGET // (self.output_dim * self.input_dim))
        for start in range(0, num_samples, group):
            noise = self._standard_normal(min(group, num_samples - start), generator)
            coloured = self._output_colouring @ (noise @ whitened)  # (s, D, M)
            draws[start : start + noise.shape[0]] = mean + coloured.transpose(1, 2)
        return draws

    def _standard_normal(self, count: int, generator: torch.Generator) -> Tensor:
        """Draw ``count`` standard normal (D, p) matrices, one generator call per matrix.

        One call per matrix keeps the draws independent of how they are grouped, because
        the CPU generator fills a large tensor in a different order than several small ones.
        """
        noise = [
            torch.randn(
                self.output_dim,
                self.input_dim,
                generator=generator,
                dtype=torch.float64,
                device=generator.device,
            )
            for _ in range(count)
        ]
        return torch.stack(noise).to(self.weight.device)

    def _matrices(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``C_A⁻ᵀ`` (p, p) and ``W*ᵀ`` (p, D) on the features' device and dtype."""
        key = (features.device, compute_dtype(features))
        if key not in self._cache:
            self._cache[key] = (
                self._input_whitener.T.to(device=key[0], dtype=key[1]).contiguous(),
                self.weight.T.to(device=key[0], dtype=key[1]).contiguous(),
            )
        return self._cache[key]

    @staticmethod
    def _chunk_input_variance(chunk: Tensor, whitener_t: Tensor) -> Tensor:
        whitened = chunk.to(whitener_t.dtype) @ whitener_t  # (chunk, p)
        return (whitened * whitened).sum(dim=-1)

    def _check_features(self, features: Tensor) -> None:
        check_tensor("features", features, ndim=2)
        if features.shape[1] != self.input_dim:
            raise InputError(
                f"features have width {features.shape[1]} but the projection expects "
                f"{self.input_dim}. Pass the features that enter this projection"
            )

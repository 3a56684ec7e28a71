"""The linear head refit after each labelled batch, with its Laplace posterior.

The head maps ``x = φ/‖W*φ + offset‖`` to the logits ``z = V x + o`` with weights ``V``
(C, p) and the fixed per-image logit offset ``o = s T̂ offset/‖W*φ + offset‖ + b``. At
``V₀ = s T̂ W*`` it reproduces the zero-shot logits ``s cos(W*φ + offset, t̂_c) + b``
exactly. The matrix-normal posterior of the image projection,
``W ~ MN(W*, B'⁻¹, A'⁻¹)``, induces the prior

    V ~ MN(V₀, row cov R = s² T̂ B'⁻¹ T̂ᵀ, column cov A'⁻¹),

so with zero labels the head is zero-shot CLIP, and each label moves it only as far as the
data supports. ``R`` has rank at most ``D``, so ``R + ε·mean(diag R)·I`` is used, with
``ε = row_jitter``.

Computation happens in whitened coordinates ``U`` with ``V = V₀ + L_R U L_Aᵀ``,
``L_R L_Rᵀ = R`` and ``L_A L_Aᵀ = A'⁻¹``: the prior becomes ``N(0, I)`` and the negative
log posterior ``Σ_i CE(z_i, y_i) + ½‖U‖²``. The Laplace precision in these coordinates is

    P_U = I + Σ_i (L_Rᵀ H_i L_R) ⊗ (x̃_i x̃_iᵀ),    H_i = diag p_i − p_i p_iᵀ,  x̃_i = L_Aᵀ x_i,

stored densely for small heads, or in the KFAC form ``I + G̃ ⊗ X̃`` with
``G̃ = L_Rᵀ (mean_i H_i) L_R`` and ``X̃ = Σ_i x̃_i x̃_iᵀ``. The KFAC form is inverted exactly
through the eigendecompositions ``G̃ = M diag(γ) Mᵀ`` and ``X̃ = N diag(ξ) Nᵀ``:
``P_U⁻¹ = (M ⊗ N) diag(1/(1 + γ_a ξ_j)) (M ⊗ N)ᵀ``. This equals the inverse of
``R⁻¹ ⊗ A' + G ⊗ X`` through the generalised eigendecompositions of the pairs
``(R⁻¹, G)`` and ``(A', X)``.

The prior precision in whitened coordinates is ``τ I``: ``τ = 1`` is the prior that the
projection factors induce, and ``fit_head(prior_scale="evidence")`` chooses ``τ`` by the
Laplace evidence of the labels (MacKay's evidence framework, as in Immer et al. 2021),

    log p(y | τ) ≈ −Σ_i CE(z_i, y_i) − ½ τ ‖U*‖² + ½ C p log τ − ½ log det(τ I + GGN),

with the MAP ``U*`` refit for each ``τ``. The factors' effective number of data points sets
how confident the zero-shot posterior is; ``τ`` lets the labels decide how far the head may
move from it. Every ``P_U`` above reads ``τ I + …``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from annotator.bayes._checks import (
    check_offsets,
    check_positive,
    check_positive_int,
    compute_dtype,
)
from annotator.bayes.interface import WeightDraws
from annotator.bayes.linalg import cholesky_with_jitter
from annotator.bayes.posterior import DEFAULT_CHUNK_SIZE, ELEMENT_BUDGET
from annotator.bayes.zeroshot import ZeroShotPosterior
from annotator.errors import InputError

logger = logging.getLogger(__name__)

#: The ``"auto"`` covariance is dense up to this many head parameters ``C·p``: the dense
#: precision then takes at most 4096² float64 entries (128 MiB).
DENSE_MAX_PARAMETERS = 4096

#: Search range of the evidence-tuned prior precision ``τ`` (whitened coordinates).
PRIOR_SCALE_BOUNDS = (1e-3, 1e3)

#: L-BFGS tolerance of the candidate fits during the evidence search.
SEARCH_GRADIENT_TOLERANCE = 1e-5


class HeadCovariance(enum.StrEnum):
    """Form of the head's Laplace posterior covariance."""

    AUTO = "auto"
    """Dense when ``C·p <= DENSE_MAX_PARAMETERS``, KFAC otherwise."""

    DENSE = "dense"
    """The full (C·p, C·p) precision with the exact Gauss–Newton term of every label."""

    KFAC = "kfac"
    """``I + G̃ ⊗ X̃``: the data term as one Kronecker product, inverted exactly."""


@dataclasses.dataclass(frozen=True)
class _DenseCovariance:
    """Dense posterior: ``Var z_c = xᵀ S_c x`` and the Cholesky factor ``C_P`` of ``P_U``."""

    row_blocks: Tensor  # S_c, (C, p, p)
    precision_factor: Tensor  # C_P, (C·p, C·p)


@dataclasses.dataclass(frozen=True)
class _KroneckerCovariance:
    """KFAC posterior ``P_U = τ I + G̃ ⊗ X̃`` in the eigenbases ``G̃ = M diag(γ) Mᵀ``,
    ``X̃ = N diag(ξ) Nᵀ``."""

    class_basis: Tensor  # K = L_R M, (C, C)
    input_basis: Tensor  # Q = C_A⁻ᵀ N, (p, p)
    inverse_eigenvalues: Tensor  # 1/(τ + γ_a ξ_j), (p, C)
    class_eigenvectors: Tensor  # M, (C, C)
    input_eigenvectors: Tensor  # N, (p, p)


class HeadPosterior:
    """Laplace posterior of the linear head, built by :func:`fit_head`.

    Attributes
    ----------
    num_classes : int
        Number of classes ``C``.
    weight : Tensor, shape (C, p)
        MAP head ``V*`` in float64.
    prior_mean : Tensor, shape (C, p)
        Zero-shot head ``V₀ = s T̂ W*``.
    prior_row_covariance : Tensor, shape (C, C)
        ``R = s² T̂ B'⁻¹ T̂ᵀ`` with its jitter.
    covariance : HeadCovariance
        ``DENSE`` or ``KFAC``.
    num_labels : int
        Number of labelled images the head was fit on.
    prior_scale : float
        ``τ``, the prior precision in whitened coordinates (1 is the factors' own prior).
    log_evidence : float or None
        Laplace log evidence of the labels at ``τ``, None without labels.
    """

    def __init__(
        self,
        *,
        zero_shot: ZeroShotPosterior,
        weight: Tensor,
        prior_mean: Tensor,
        row_factor: Tensor,
        num_labels: int,
        state: _DenseCovariance | _KroneckerCovariance,
        prior_scale: float = 1.0,
        log_evidence: float | None = None,
    ) -> None:
        self._zero_shot = zero_shot
        self.prior_scale = prior_scale
        self.log_evidence = log_evidence
        self.weight = weight
        self.prior_mean = prior_mean
        self._row_factor = row_factor  # L_R, (C, C)
        self.prior_row_covariance = row_factor @ row_factor.T
        self._state = state
        self.covariance = (
            HeadCovariance.DENSE if isinstance(state, _DenseCovariance) else HeadCovariance.KFAC
        )
        self.num_labels = num_labels
        self.num_classes = int(weight.shape[0])
        self.logit_scale = zero_shot.logit_scale
        self.logit_bias = zero_shot.logit_bias
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    @property
    def input_dim(self) -> int:
        """Width ``p`` of the features."""
        return int(self.weight.shape[1])

    def logit_moments(
        self,
        features: Tensor,
        offsets: Tensor | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> tuple[Tensor, Tensor]:
        """Compute the mean and marginal variance of the head's logits for a pool.

        With ``r = 1/‖W*φ + offset‖`` the logits are ``r V φ + o``, so the variance of logit
        ``c`` is ``r² φᵀ Cov(V_c) φ``. The KFAC form costs one (chunk, p) × (p, p) product,
        one (chunk, p) × (p, C) and one (chunk, C) × (C, C) product per chunk. The dense
        form costs ``O(chunk · C · p²)``.

        Parameters
        ----------
        features : Tensor, shape (N, p)
            Image features ``φ``.
        offsets : Tensor, shape (N, D), optional
            Fixed per-image terms added after the image projection.
        chunk_size : int
            Rows per chunk.

        Returns
        -------
        mean : Tensor, shape (N, C)
        variance : Tensor, shape (N, C)
        """
        self._check_pool(features, offsets)
        check_positive_int("chunk_size", chunk_size)
        if self.covariance is HeadCovariance.DENSE:
            # The dense form builds a (chunk, C, p) intermediate.
            chunk_size = min(
                chunk_size, max(1, ELEMENT_BUDGET // (self.num_classes * self.input_dim))
            )
        means, variances = [], []
        for start in range(0, features.shape[0], chunk_size):
            chunk_offsets = None if offsets is None else offsets[start : start + chunk_size]
            mean, variance = self._chunk_moments(
                features[start : start + chunk_size], chunk_offsets
            )
            means.append(mean)
            variances.append(variance)
        if not means:
            empty = features.new_zeros(0, self.num_classes, dtype=compute_dtype(features))
            return empty, empty.clone()
        return torch.cat(means), torch.cat(variances)

    def map_logits(self, features: Tensor, offsets: Tensor | None = None) -> Tensor:
        """Compute the logits ``V* x + o`` (N, C) of the MAP head."""
        self._check_pool(features, offsets)
        matrices = self._matrices(features)
        inputs, logit_offsets = self._head_inputs(features, offsets, matrices)
        return inputs @ matrices["weight_t"] + logit_offsets

    def sample_weights(
        self,
        num_samples: int,
        generator: torch.Generator,
        *,
        dtype: torch.dtype | None = None,
    ) -> WeightDraws:
        """Draw head weights ``V_s`` from the Laplace posterior.

        Dense: ``vec U_s = C_P⁻ᵀ ε`` with ``P_U = C_P C_Pᵀ``. KFAC:
        ``U_s = M (E ∘ (τ + γ ξᵀ)^{-1/2}) Nᵀ``. Then ``V_s = V* + L_R U_s L_Aᵀ``.

        Parameters
        ----------
        num_samples : int
            Number of draws ``S``.
        generator : torch.Generator
            Source of randomness, drawn on the generator's device.
        dtype : torch.dtype, optional
            Dtype of the draws, float64 when None.

        Returns
        -------
        WeightDraws
            ``head_weights`` of shape (S, C, p).
        """
        check_positive_int("num_samples", num_samples)
        dtype = torch.float64 if dtype is None else dtype
        device = self.weight.device
        C, p = self.num_classes, self.input_dim
        whitener = self._zero_shot.image._input_whitener  # C_A⁻¹ = L_Aᵀ, (p, p)
        draws = torch.empty(num_samples, C, p, dtype=dtype, device=device)
        for index in range(num_samples):
            noise = torch.randn(
                C, p, generator=generator, dtype=torch.float64, device=generator.device
            ).to(device)
            state = self._state
            if isinstance(state, _DenseCovariance):
                whitened = torch.linalg.solve_triangular(
                    state.precision_factor.T, noise.reshape(-1, 1), upper=True
                ).reshape(C, p)
            else:
                scaled = noise * state.inverse_eigenvalues.T.sqrt()  # (C, p)
                whitened = state.class_eigenvectors @ scaled @ state.input_eigenvectors.T
            draws[index] = self.weight + self._row_factor @ whitened @ whitener
        return WeightDraws(head_weights=draws)

    def sampled_logits(
        self, features: Tensor, draws: WeightDraws, offsets: Tensor | None = None
    ) -> Tensor:
        """Compute the logits ``V_s x + o`` (S, N, C) under each head draw."""
        self._check_pool(features, offsets)
        if draws.head_weights is None:
            raise InputError(
                "draws lack head_weights. Use the draws from this head's sample_weights"
            )
        if tuple(draws.head_weights.shape[1:]) != (self.num_classes, self.input_dim):
            raise InputError(
                f"draws.head_weights have shape {tuple(draws.head_weights.shape)}, expected "
                f"(S, {self.num_classes}, {self.input_dim})"
            )
        matrices = self._matrices(features)
        inputs, logit_offsets = self._head_inputs(features, offsets, matrices)
        dtype = inputs.dtype
        logits = inputs.new_empty(draws.num_samples, inputs.shape[0], self.num_classes)
        group = max(1, ELEMENT_BUDGET // max(1, inputs.shape[0] * self.num_classes))
        for start in range(0, draws.num_samples, group):
            stop = min(start + group, draws.num_samples)
            weights = draws.head_weights[start:stop].to(device=inputs.device, dtype=dtype)
            logits[start:stop] = torch.matmul(inputs, weights.transpose(1, 2)) + logit_offsets
        return logits

    def _chunk_moments(self, chunk: Tensor, offsets: Tensor | None) -> tuple[Tensor, Tensor]:
        matrices = self._matrices(chunk)
        inputs, logit_offsets = self._head_inputs(chunk, offsets, matrices)
        mean = inputs @ matrices["weight_t"] + logit_offsets
        if self.covariance is HeadCovariance.DENSE:
            # Var z_c = xᵀ S_c x, (n, C)
            projected = torch.einsum("np,cpq->ncq", inputs, matrices["row_blocks"])
            variance = (projected * inputs[:, None, :]).sum(-1)
        else:
            # Var z_c = Σ_a K_ca² Σ_j u_j² / (τ + γ_a ξ_j) with u = Qᵀ x
            rotated = inputs @ matrices["input_basis"]  # (n, p)
            variance = (rotated * rotated) @ matrices["inverse_eigenvalues"]  # (n, C)
            variance = variance @ matrices["class_basis_sq_t"]
        return mean, variance.clamp_min(0.0)

    def _head_inputs(
        self, features: Tensor, offsets: Tensor | None, matrices: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Return ``x = φ/‖g‖`` (N, p) and ``o = s T̂ offset/‖g‖ + b`` (N, C)."""
        dtype = matrices["weight_t"].dtype
        features = features.to(dtype)
        embeddings = features @ matrices["image_weight_t"]  # (N, D)
        if offsets is not None:
            embeddings = embeddings + offsets.to(dtype)
        inverse_norm = 1.0 / embeddings.norm(dim=-1, keepdim=True)
        inputs = features * inverse_norm
        logit_offsets = embeddings.new_zeros(features.shape[0], self.num_classes)
        if offsets is not None:
            logit_offsets = self.logit_scale * (offsets.to(dtype) @ matrices["unit_classes_t"])
            logit_offsets = logit_offsets * inverse_norm
        if self.logit_bias is not None:
            logit_offsets = logit_offsets + self.logit_bias
        return inputs, logit_offsets

    def _matrices(self, features: Tensor) -> dict[str, Tensor]:
        key = (features.device, compute_dtype(features))
        if key not in self._cache:
            device, dtype = key

            def cast(tensor: Tensor) -> Tensor:
                return tensor.to(device=device, dtype=dtype).contiguous()

            zero_shot = self._zero_shot
            unit_classes = F.normalize(zero_shot.class_embeddings, dim=-1)
            matrices = {
                "weight_t": cast(self.weight.T),
                "image_weight_t": cast(zero_shot.image.weight.T),
                "unit_classes_t": cast(unit_classes.T),
            }
            state = self._state
            if isinstance(state, _DenseCovariance):
                matrices["row_blocks"] = cast(state.row_blocks)
            else:
                matrices["input_basis"] = cast(state.input_basis)
                matrices["inverse_eigenvalues"] = cast(state.inverse_eigenvalues)
                matrices["class_basis_sq_t"] = cast((state.class_basis**2).T)
            self._cache[key] = matrices
        return self._cache[key]

    def _check_pool(self, features: Tensor, offsets: Tensor | None) -> None:
        self._zero_shot.image._check_features(features)
        check_offsets(offsets, features, self._zero_shot.image.output_dim)


def fit_head(
    zero_shot: ZeroShotPosterior,
    features: Tensor,
    labels: Tensor,
    offsets: Tensor | None = None,
    *,
    covariance: HeadCovariance | str = HeadCovariance.AUTO,
    prior_scale: float | str = 1.0,
    row_jitter: float = 1e-6,
    max_iterations: int = 500,
    gradient_tolerance: float = 1e-9,
) -> HeadPosterior:
    """Fit the linear head by MAP and build its Laplace posterior.

    The MAP minimises ``Σ_i CE(V x_i + o_i, y_i) + ½ tr(ΔVᵀ R⁻¹ ΔV A')`` with
    ``ΔV = V − V₀``, by L-BFGS with a strong Wolfe line search in float64 in the whitened
    coordinates ``U``, where the prior term is ``½‖U‖²``. With zero labels the MAP is
    ``V₀`` and the posterior is the prior.

    Parameters
    ----------
    zero_shot : ZeroShotPosterior
        Supplies ``W*``, ``A'``, ``B'``, the mean class embeddings, ``s`` and ``b``. A random
        text side is held at its mean.
    features : Tensor, shape (n, p)
        Image features ``φ`` of the labelled images.
    labels : Tensor, shape (n,), int64
        Class indices in ``[0, C)``.
    offsets : Tensor, shape (n, D), optional
        Fixed per-image terms added after the image projection.
    covariance : HeadCovariance or str
        ``"auto"``, ``"dense"`` or ``"kfac"``. ``"auto"`` is dense when
        ``C·p <= DENSE_MAX_PARAMETERS`` and KFAC otherwise.
    prior_scale : float or "evidence"
        ``τ``, the multiplier of the prior precision; ``"evidence"`` maximises the Laplace
        evidence of the labels over ``log τ`` in :data:`PRIOR_SCALE_BOUNDS`, refitting the
        MAP for each candidate.
    row_jitter : float
        ``ε`` in ``R + ε·mean(diag R)·I``.
    max_iterations : int
        Maximum number of L-BFGS iterations.
    gradient_tolerance : float
        L-BFGS stops when the largest gradient entry in ``U`` falls below this.

    Returns
    -------
    HeadPosterior

    Raises
    ------
    InputError
        When shapes, dtypes or label values are invalid.
    """
    covariance = _parse_covariance(covariance)
    tune_prior = prior_scale == "evidence"
    if not tune_prior:
        if isinstance(prior_scale, str):
            raise InputError(
                f"prior_scale must be a positive number or 'evidence', got {prior_scale!r}"
            )
        prior_scale = check_positive("prior_scale", prior_scale)
    row_jitter = check_positive("row_jitter", row_jitter)
    check_positive_int("max_iterations", max_iterations)
    check_positive("gradient_tolerance", gradient_tolerance)
    image = zero_shot.image
    image._check_features(features)
    check_offsets(offsets, features, image.output_dim)
    _check_labels(labels, features.shape[0], zero_shot.num_classes)

    device = image.weight.device
    C, p = zero_shot.num_classes, image.input_dim
    if covariance is HeadCovariance.AUTO:
        covariance = HeadCovariance.DENSE if C * p <= DENSE_MAX_PARAMETERS else HeadCovariance.KFAC
        logger.info("Head covariance: %s for C*p = %d parameters", covariance.value, C * p)

    # 1. Prior: V₀ = s T̂ W*, R = s² T̂ B'⁻¹ T̂ᵀ + ε·mean(diag R)·I, L_R L_Rᵀ = R.
    scale = zero_shot.logit_scale
    unit_classes = F.normalize(zero_shot.class_embeddings, dim=-1)  # T̂, (C, D)
    prior_mean = scale * unit_classes @ image.weight  # (C, p)
    coloured = unit_classes @ image._output_colouring  # T̂ C_B⁻ᵀ, (C, D)
    row_covariance = scale**2 * coloured @ coloured.T
    jitter = row_jitter * float(row_covariance.diagonal().mean())
    row_covariance = row_covariance + jitter * torch.eye(C, dtype=torch.float64, device=device)
    row_factor = cholesky_with_jitter(row_covariance, name="head prior row covariance R")
    whitener = image._input_whitener  # C_A⁻¹, (p, p)

    # 2. Labelled inputs x = φ/‖g‖, logit offsets o and whitened inputs x̃ = C_A⁻¹ x.
    features = features.to(device=device, dtype=torch.float64)
    labels = labels.to(device)
    embeddings = features @ image.weight.T
    if offsets is not None:
        embeddings = embeddings + offsets.to(device=device, dtype=torch.float64)
    inverse_norm = 1.0 / embeddings.norm(dim=-1, keepdim=True)
    inputs = features * inverse_norm  # (n, p)
    logit_offsets = torch.zeros(features.shape[0], C, dtype=torch.float64, device=device)
    if offsets is not None:
        logit_offsets = scale * (offsets.to(device, torch.float64) @ unit_classes.T) * inverse_norm
    if zero_shot.logit_bias is not None:
        logit_offsets = logit_offsets + zero_shot.logit_bias
    whitened_inputs = inputs @ whitener.T  # (n, p)
    prior_logits = inputs @ prior_mean.T + logit_offsets  # zero-shot logits, (n, C)

    # 3. MAP in whitened coordinates, z = z₀ + x̃ Uᵀ L_Rᵀ, and the Laplace posterior at it.
    def fit(tau: float, start: Tensor | None, *, tolerance: float = gradient_tolerance) -> _HeadFit:
        whitened_weight = _fit_map(
            whitened_inputs,
            labels,
            prior_logits,
            row_factor,
            prior_scale=tau,
            initial=start,
            max_iterations=max_iterations,
            gradient_tolerance=tolerance,
        )
        logits = prior_logits + whitened_inputs @ whitened_weight.T @ row_factor.T
        probabilities = torch.softmax(logits, dim=-1)
        if covariance is HeadCovariance.DENSE:
            state: _DenseCovariance | _KroneckerCovariance = _dense_posterior(
                whitened_inputs, probabilities, row_factor, whitener, tau
            )
        else:
            state = _kfac_posterior(whitened_inputs, probabilities, row_factor, whitener, tau)
        evidence = None
        if labels.numel():
            fit_term = -F.cross_entropy(logits, labels, reduction="sum")
            evidence = float(
                fit_term
                - 0.5 * tau * (whitened_weight**2).sum()
                + 0.5 * C * p * math.log(tau)
                - 0.5 * _precision_logdet(state)
            )
        return _HeadFit(tau, whitened_weight, state, evidence)

    if tune_prior and labels.numel():
        # The search compares candidates fitted to a looser tolerance, which moves the
        # evidence far less than the differences between candidates; the chosen τ is refit.
        def search_fit(tau: float, start: Tensor | None) -> _HeadFit:
            return fit(tau, start, tolerance=max(gradient_tolerance, SEARCH_GRADIENT_TOLERANCE))

        chosen = _maximise_evidence(search_fit)
        result = fit(chosen.prior_scale, chosen.whitened_weight)
    else:
        result = fit(1.0 if tune_prior else float(prior_scale), None)
    weight = prior_mean + row_factor @ result.whitened_weight @ whitener

    return HeadPosterior(
        zero_shot=zero_shot,
        weight=weight,
        prior_mean=prior_mean,
        row_factor=row_factor,
        num_labels=int(features.shape[0]),
        state=result.state,
        prior_scale=result.prior_scale,
        log_evidence=result.log_evidence,
    )


def _fit_map(
    whitened_inputs: Tensor,
    labels: Tensor,
    prior_logits: Tensor,
    row_factor: Tensor,
    *,
    prior_scale: float,
    initial: Tensor | None,
    max_iterations: int,
    gradient_tolerance: float,
) -> Tensor:
    """Minimise ``Σ_i CE(z₀_i + L_R U x̃_i, y_i) + ½ τ ‖U‖²`` over ``U`` (C, p)."""
    C, p = row_factor.shape[0], whitened_inputs.shape[1]
    if initial is None:
        whitened_weight = torch.zeros(C, p, dtype=torch.float64, device=whitened_inputs.device)
    else:
        whitened_weight = initial.detach().clone()
    if labels.numel() == 0:
        return whitened_weight
    whitened_weight.requires_grad_(True)

    def objective() -> Tensor:
        logits = prior_logits + whitened_inputs @ whitened_weight.T @ row_factor.T
        return (
            F.cross_entropy(logits, labels, reduction="sum")
            + 0.5 * prior_scale * (whitened_weight * whitened_weight).sum()
        )

    optimizer = torch.optim.LBFGS(
        [whitened_weight],
        lr=1.0,
        max_iter=max_iterations,
        tolerance_grad=gradient_tolerance,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    optimizer.step(closure)
    value = objective()
    (gradient,) = torch.autograd.grad(value, whitened_weight)
    value = value.detach()
    largest_gradient = float(gradient.abs().max())
    iterations = int(optimizer.state[whitened_weight].get("n_iter", 0))
    if not math.isfinite(float(value)):
        raise InputError(
            "the head objective became non-finite. Check the features and the logit scale"
        )
    if largest_gradient > 1e3 * gradient_tolerance:
        logger.warning(
            "Head MAP stopped after %d L-BFGS iterations with largest gradient entry %.3g. "
            "Raise max_iterations for a tighter fit",
            iterations,
            largest_gradient,
        )
    logger.info(
        "Fit head on %d labels: objective %.6g, %d iterations, largest gradient %.3g",
        labels.numel(),
        float(value),
        iterations,
        largest_gradient,
    )
    return whitened_weight.detach()


def _dense_posterior(
    whitened_inputs: Tensor,
    probabilities: Tensor,
    row_factor: Tensor,
    whitener: Tensor,
    prior_scale: float = 1.0,
) -> _DenseCovariance:
    """Build ``P_U = τ I + Σ_i (L_Rᵀ H_i L_R) ⊗ (x̃_i x̃_iᵀ)`` and the blocks ``S_c``."""
    n, p = whitened_inputs.shape
    C = row_factor.shape[0]
    size = C * p
    precision = prior_scale * torch.eye(size, dtype=torch.float64, device=whitened_inputs.device)

    # Σ_i (L_Rᵀ H_i L_R) ⊗ (x̃_i x̃_iᵀ), accumulated in chunks of labels to bound memory.
    chunk = max(1, ELEMENT_BUDGET // max(1, p * p + C * C))
    for start in range(0, n, chunk):
        probs = probabilities[start : start + chunk]
        inputs = whitened_inputs[start : start + chunk]
        hessians = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        class_terms = row_factor.T @ hessians @ row_factor  # (m, C, C)
        outer_inputs = inputs[:, :, None] * inputs[:, None, :]  # (m, p, p)
        term = torch.einsum("mab,mjk->ajbk", class_terms, outer_inputs).reshape(size, size)
        precision = precision + term

    precision_factor = cholesky_with_jitter(precision, name="dense head precision P_U")
    covariance = torch.cholesky_inverse(precision_factor).reshape(C, p, C, p)
    # S_c = C_A⁻ᵀ (Σ_ab ℓ_ca ℓ_cb Σ_ab) C_A⁻¹, so that Var z_c = xᵀ S_c x.
    whitened_blocks = torch.einsum("ca,ajbk,cb->cjk", row_factor, covariance, row_factor)
    row_blocks = whitener.T @ whitened_blocks @ whitener
    return _DenseCovariance(
        row_blocks=0.5 * (row_blocks + row_blocks.transpose(1, 2)),
        precision_factor=precision_factor,
    )


def _kfac_posterior(
    whitened_inputs: Tensor,
    probabilities: Tensor,
    row_factor: Tensor,
    whitener: Tensor,
    prior_scale: float = 1.0,
) -> _KroneckerCovariance:
    """Eigendecompose the two factors of ``P_U = τ I + G̃ ⊗ X̃``."""
    n, p = whitened_inputs.shape
    C = row_factor.shape[0]
    device = whitened_inputs.device
    if n == 0:
        class_gram = torch.zeros(C, C, dtype=torch.float64, device=device)
    else:
        hessian_mean = torch.diag(probabilities.mean(0)) - probabilities.T @ probabilities / n
        class_gram = row_factor.T @ hessian_mean @ row_factor  # G̃
    input_gram = whitened_inputs.T @ whitened_inputs  # X̃

    class_eigenvalues, class_eigenvectors = torch.linalg.eigh(0.5 * (class_gram + class_gram.T))
    input_eigenvalues, input_eigenvectors = torch.linalg.eigh(0.5 * (input_gram + input_gram.T))
    # Both Grams are positive semidefinite, but rounding can leave tiny negative eigenvalues.
    class_eigenvalues = class_eigenvalues.clamp_min(0.0)
    input_eigenvalues = input_eigenvalues.clamp_min(0.0)
    return _KroneckerCovariance(
        class_basis=row_factor @ class_eigenvectors,
        input_basis=whitener.T @ input_eigenvectors,
        inverse_eigenvalues=1.0
        / (prior_scale + input_eigenvalues[:, None] * class_eigenvalues[None, :]),
        class_eigenvectors=class_eigenvectors,
        input_eigenvectors=input_eigenvectors,
    )


@dataclasses.dataclass(frozen=True)
class _HeadFit:
    prior_scale: float
    whitened_weight: Tensor  # U*, (C, p)
    state: _DenseCovariance | _KroneckerCovariance
    log_evidence: float | None


def _precision_logdet(state: _DenseCovariance | _KroneckerCovariance) -> Tensor:
    """``log det P_U`` from the Cholesky factor (dense) or the eigenvalues (KFAC)."""
    if isinstance(state, _DenseCovariance):
        return 2.0 * state.precision_factor.diagonal().log().sum()
    return -state.inverse_eigenvalues.log().sum()


def _maximise_evidence(fit: Callable[[float, Tensor | None], _HeadFit]) -> _HeadFit:
    """Maximise the evidence over ``log τ``: a coarse grid, then golden-section refinement.

    Each candidate refits the MAP, warm-started from the nearest candidate so far.
    """
    low, high = (math.log(bound) for bound in PRIOR_SCALE_BOUNDS)
    grid = [low + (high - low) * i / 6 for i in range(7)]
    fits: dict[float, _HeadFit] = {}
    previous = None
    for log_tau in grid:
        fits[log_tau] = fit(math.exp(log_tau), previous)
        previous = fits[log_tau].whitened_weight
    best = max(grid, key=lambda t: fits[t].log_evidence)
    index = grid.index(best)
    left, right = grid[max(index - 1, 0)], grid[min(index + 1, len(grid) - 1)]

    # Golden-section search on the bracket around the best grid point.
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(6):
        inner_left = right - ratio * (right - left)
        inner_right = left + ratio * (right - left)
        for log_tau in (inner_left, inner_right):
            if log_tau not in fits:
                nearest = min(fits, key=lambda t: abs(t - log_tau))
                fits[log_tau] = fit(math.exp(log_tau), fits[nearest].whitened_weight)
        if fits[inner_left].log_evidence >= fits[inner_right].log_evidence:
            right = inner_right
        else:
            left = inner_left
    chosen = max(fits.values(), key=lambda f: f.log_evidence)
    logger.info(
        "Head prior precision scale τ = %.4g by the Laplace evidence (log evidence %.6g)",
        chosen.prior_scale,
        chosen.log_evidence,
    )
    return chosen


def _parse_covariance(covariance: HeadCovariance | str) -> HeadCovariance:
    try:
        return HeadCovariance(covariance)
    except ValueError as error:
        options = ", ".join(repr(member.value) for member in HeadCovariance)
        raise InputError(
            f"unknown head covariance {covariance!r}. Expected one of {options}"
        ) from error


def _check_labels(labels: Tensor, num_rows: int, num_classes: int) -> None:
    if not isinstance(labels, Tensor):
        raise InputError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64 or labels.ndim != 1:
        raise InputError(
            f"labels must be a 1-D int64 tensor of class indices, got dtype {labels.dtype} "
            f"and shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != num_rows:
        raise InputError(f"got {labels.shape[0]} labels for {num_rows} feature rows")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(
            f"labels must lie in [0, {num_classes}), got values from {int(labels.min())} "
            f"to {int(labels.max())}"
        )


__all__ = ["DENSE_MAX_PARAMETERS", "HeadCovariance", "HeadPosterior", "fit_head"]

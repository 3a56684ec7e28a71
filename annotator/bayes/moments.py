"""Moments of dot products and cosine similarities of independent diagonal Gaussians.

For ``g ~ N(μ_g, diag σ_g²)`` and ``h ~ N(μ_h, diag σ_h²)`` independent, the dot product has
the exact moments

    E[g·h]   = μ_g·μ_h
    Var[g·h] = Σ_k [(μ_g,k² + σ_g,k²) σ_h,k² + σ_g,k² μ_h,k²].

The cosine similarity replaces the norms by the root expected squared norms
``E‖g‖² = Σ_k (μ_g,k² + σ_g,k²)`` (Baumann et al., "Post-hoc Probabilistic Vision-Language
Models"), an approximation:

    E[cos]   ≈ μ_g·μ_h / √(E‖g‖² E‖h‖²)
    Var[cos] ≈ Var[g·h] / (E‖g‖² E‖h‖²).

Logits are ``s·cos + b`` with mean ``s E[cos] + b`` and variance ``s² Var[cos]``.

A Laplace posterior over a projection gives separable variances
``σ_g,nk² = v_n β_k``: one scale per input times one profile per dimension. For these,
:func:`separable_cosine_moments` needs no (N, D) × (D, C) product beyond the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from annotator.bayes._checks import check_positive_int, check_shape, check_tensor
from annotator.errors import InputError

#: Default number of pool rows per chunk. Memory is ``O(chunk · (D + C))``.
DEFAULT_CHUNK_SIZE = 8192


def dot_product_moments(
    mean_g: Tensor,
    variance_g: Tensor | None,
    mean_h: Tensor,
    variance_h: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Compute the exact mean and variance of ``g·h`` for every pair of rows.

    Parameters
    ----------
    mean_g, variance_g : Tensor, shape (N, D)
        Mean and diagonal variance of ``g``. With ``variance_g=None``, ``g`` is fixed.
    mean_h, variance_h : Tensor, shape (C, D)
        Mean and diagonal variance of ``h``. With ``variance_h=None``, ``h`` is fixed.

    Returns
    -------
    mean : Tensor, shape (N, C)
        ``μ_g·μ_h``.
    variance : Tensor, shape (N, C)
        ``Σ_k (μ_g,k² + σ_g,k²) σ_h,k² + σ_g,k² μ_h,k²``.
    """
    _check_side("g", mean_g, variance_g)
    _check_side("h", mean_h, variance_h, width=mean_g.shape[1])
    return _dot_product_moments(mean_g, variance_g, mean_h, variance_h)


def cosine_moments(
    mean_g: Tensor,
    variance_g: Tensor | None,
    mean_h: Tensor,
    variance_h: Tensor | None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Approximate the mean and variance of ``cos(g, h)`` for every pair of rows.

    ``E[cos] ≈ μ_g·μ_h / √(E‖g‖² E‖h‖²)`` and ``Var[cos] ≈ Var[g·h] / (E‖g‖² E‖h‖²)`` with
    ``E‖g‖² = Σ_k (μ_g,k² + σ_g,k²)``. Rows of ``g`` are processed ``chunk_size`` at a time,
    so intermediate memory does not grow with ``N``.

    Parameters
    ----------
    mean_g, variance_g : Tensor, shape (N, D)
        Mean and diagonal variance of ``g``. With ``variance_g=None``, ``g`` is fixed.
    mean_h, variance_h : Tensor, shape (C, D)
        Mean and diagonal variance of ``h``. With ``variance_h=None``, ``h`` is fixed.
    chunk_size : int
        Rows of ``g`` per chunk.

    Returns
    -------
    mean : Tensor, shape (N, C)
        Approximate ``E[cos]``.
    variance : Tensor, shape (N, C)
        Approximate ``Var[cos]``.
    """
    _check_side("g", mean_g, variance_g)
    _check_side("h", mean_h, variance_h, width=mean_g.shape[1])
    check_positive_int("chunk_size", chunk_size)

    norm_sq_h = _expected_norm_sq(mean_h, variance_h)  # (C,)
    means, variances = [], []
    for start in range(0, mean_g.shape[0], chunk_size):
        chunk_mean = mean_g[start : start + chunk_size]
        chunk_variance = None if variance_g is None else variance_g[start : start + chunk_size]
        dot_mean, dot_variance = _dot_product_moments(
            chunk_mean, chunk_variance, mean_h, variance_h
        )
        norm_product = _expected_norm_sq(chunk_mean, chunk_variance)[:, None] * norm_sq_h[None, :]
        means.append(dot_mean / norm_product.sqrt())
        variances.append(dot_variance / norm_product)
    return _concatenate(means, variances, mean_g, mean_h)


def separable_cosine_moments(
    mean_g: Tensor,
    scale_g: Tensor | None,
    profile_g: Tensor | None,
    mean_h: Tensor,
    scale_h: Tensor | None = None,
    profile_h: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Approximate cosine moments when the variances are separable, ``σ_nk² = v_n β_k``.

    With ``σ_g² = v_g β_gᵀ`` and ``σ_h² = v_h β_hᵀ`` the variance numerator of
    :func:`cosine_moments` becomes

        Var[g_n·h_c] = v_h,c ((μ_g,n² · β_h) + v_g,n (β_g · β_h)) + v_g,n (μ_h,c² · β_g),

    which costs ``O(N (D + C))``, and ``E‖g_n‖² = ‖μ_g,n‖² + v_g,n Σ_k β_g,k``. Only the mean
    ``μ_g μ_hᵀ`` needs an (N, D) × (D, C) product.

    Parameters
    ----------
    mean_g : Tensor, shape (N, D)
        Mean of ``g``.
    scale_g : Tensor, shape (N,), optional
        Per-row scale ``v_g``, or None for a fixed ``g``.
    profile_g : Tensor, shape (D,), optional
        Per-dimension profile ``β_g``; required with ``scale_g``.
    mean_h : Tensor, shape (C, D)
        Mean of ``h``.
    scale_h : Tensor, shape (C,), optional
        Per-row scale ``v_h``, or None for a fixed ``h``.
    profile_h : Tensor, shape (D,), optional
        Per-dimension profile ``β_h``; required with ``scale_h``.
    chunk_size : int
        Rows of ``g`` per chunk.

    Returns
    -------
    mean : Tensor, shape (N, C)
        Approximate ``E[cos]``.
    variance : Tensor, shape (N, C)
        Approximate ``Var[cos]``.
    """
    check_tensor("mean_g", mean_g, ndim=2)
    check_tensor("mean_h", mean_h, ndim=2)
    check_shape("mean_h", mean_h, (None, mean_g.shape[1]))
    _check_separable("g", scale_g, profile_g, mean_g)
    _check_separable("h", scale_h, profile_h, mean_h)
    check_positive_int("chunk_size", chunk_size)
    return _separable_cosine_moments(
        mean_g, scale_g, profile_g, mean_h, scale_h, profile_h, chunk_size=chunk_size
    )


def cosine_to_logit_moments(
    mean_cosine: Tensor,
    variance_cosine: Tensor,
    logit_scale: float,
    logit_bias: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Map cosine moments to logit moments: mean ``s E[cos] + b``, variance ``s² Var[cos]``."""
    mean = logit_scale * mean_cosine
    if logit_bias is not None:
        mean = mean + logit_bias
    return mean, logit_scale**2 * variance_cosine


def _separable_cosine_moments(
    mean_g: Tensor,
    scale_g: Tensor | None,
    profile_g: Tensor | None,
    mean_h: Tensor,
    scale_h: Tensor | None,
    profile_h: Tensor | None,
    *,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Unchecked twin of :func:`separable_cosine_moments`."""
    dtype = mean_g.dtype
    mean_h = mean_h.to(dtype)
    mean_h_sq = mean_h * mean_h  # (C, D)
    norm_sq_h = mean_h_sq.sum(-1)  # (C,)
    random_g = scale_g is not None and profile_g is not None
    random_h = scale_h is not None and profile_h is not None
    if random_h:
        scale_h = scale_h.to(dtype)
        profile_h = profile_h.to(dtype)
        norm_sq_h = norm_sq_h + scale_h * profile_h.sum()
    if random_g:
        profile_g = profile_g.to(dtype)
        mean_h_along_g = mean_h_sq @ profile_g  # Σ_k μ_h,ck² β_g,k, (C,)
        profile_g_total = profile_g.sum()
        if random_h:
            profile_overlap = (profile_g * profile_h).sum()  # β_g · β_h

    means, variances = [], []
    for start in range(0, mean_g.shape[0], chunk_size):
        chunk = mean_g[start : start + chunk_size]
        norm_sq_g = torch.linalg.vector_norm(chunk, dim=-1).square()  # (n,)
        variance = None
        if random_g:
            chunk_scale = scale_g[start : start + chunk_size].to(dtype)  # v_g, (n,)
            norm_sq_g = norm_sq_g + chunk_scale * profile_g_total
            variance = chunk_scale[:, None] * mean_h_along_g[None, :]
        if random_h:
            # (μ_g,n² + σ_g,n²) · β_h, (n,)
            second_moment_along_h = (chunk * chunk) @ profile_h
            if random_g:
                second_moment_along_h = second_moment_along_h + chunk_scale * profile_overlap
            text_term = second_moment_along_h[:, None] * scale_h[None, :]
            variance = text_term if variance is None else variance + text_term
        if variance is None:
            variance = chunk.new_zeros(chunk.shape[0], mean_h.shape[0])

        norm_product = norm_sq_g[:, None] * norm_sq_h[None, :]
        means.append((chunk @ mean_h.T) * torch.rsqrt(norm_product))
        variances.append(variance / norm_product)
    return _concatenate(means, variances, mean_g, mean_h)


def _dot_product_moments(
    mean_g: Tensor,
    variance_g: Tensor | None,
    mean_h: Tensor,
    variance_h: Tensor | None,
) -> tuple[Tensor, Tensor]:
    mean_h = mean_h.to(mean_g.dtype)
    mean = mean_g @ mean_h.T
    variance = mean.new_zeros(mean.shape)
    if variance_h is not None:
        second_moment_g = mean_g * mean_g
        if variance_g is not None:
            second_moment_g = second_moment_g + variance_g
        variance = variance + second_moment_g @ variance_h.to(mean_g.dtype).T
    if variance_g is not None:
        variance = variance + variance_g @ (mean_h * mean_h).T
    return mean, variance


def _expected_norm_sq(mean: Tensor, variance: Tensor | None) -> Tensor:
    norm_sq = (mean * mean).sum(-1)
    if variance is not None:
        norm_sq = norm_sq + variance.sum(-1)
    return norm_sq


def _concatenate(
    means: list[Tensor], variances: list[Tensor], mean_g: Tensor, mean_h: Tensor
) -> tuple[Tensor, Tensor]:
    if not means:
        empty = mean_g.new_zeros(0, mean_h.shape[0])
        return empty, empty.clone()
    return _cat(means), _cat(variances)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_side(name: str, mean: Tensor, variance: Tensor | None, width: int | None = None) -> None:
    check_tensor(f"mean_{name}", mean, ndim=2)
    if width is not None:
        check_shape(f"mean_{name}", mean, (None, width))
    if variance is not None:
        check_tensor(f"variance_{name}", variance, ndim=2)
        check_shape(f"variance_{name}", variance, tuple(mean.shape))
        if bool((variance < 0).any()):
            raise InputError(f"variance_{name} has negative entries. Variances must be >= 0")


def _check_separable(name: str, scale: Tensor | None, profile: Tensor | None, mean: Tensor) -> None:
    if (scale is None) != (profile is None):
        raise InputError(
            f"scale_{name} and profile_{name} must be given together. Pass both, or neither "
            f"to hold {name} fixed"
        )
    if scale is None or profile is None:
        return
    check_tensor(f"scale_{name}", scale, ndim=1)
    check_shape(f"scale_{name}", scale, (mean.shape[0],))
    check_tensor(f"profile_{name}", profile, ndim=1)
    check_shape(f"profile_{name}", profile, (mean.shape[1],))
    if bool((scale < 0).any()) or bool((profile < 0).any()):
        raise InputError(
            f"scale_{name} and profile_{name} must be >= 0 because their product is a variance"
        )

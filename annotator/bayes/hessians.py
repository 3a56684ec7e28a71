"""Analytic output-side Hessians of the CLIP and SigLIP losses with respect to an embedding.

For an unnormalised embedding ``g`` (D,) with ``ĝ = g/‖g‖`` and a set of target embeddings
``t_c`` normalised to ``t̂_c``, both losses are functions of the logits
``z_c = s ĝ·t̂_c (+ b)``. The Gauss–Newton Hessian with respect to ``ĝ`` is then exact, and
with respect to ``g`` it is ``H = J H_ĝ J`` with the normalisation Jacobian
``J = (I − ĝ ĝᵀ)/‖g‖`` (symmetric):

- CLIP (InfoNCE, softmax over the targets): ``H_ĝ = s² (Σ_c p_c t̂_c t̂_cᵀ − m mᵀ)`` with
  ``p = softmax(z)`` and ``m = Σ_c p_c t̂_c``.
- SigLIP (one sigmoid per target): ``H_ĝ = s² Σ_c σ(z_c)(1 − σ(z_c)) t̂_c t̂_cᵀ``.

Neither depends on the labels, so unlabelled images with class prompts as targets give a valid
estimate. Both are written here as ``H_ĝ = s² (T̂ᵀ diag(w) T̂ − m mᵀ)`` with per-target
weights ``w`` and ``m = 0`` for SigLIP.
"""

from __future__ import annotations

import enum
import logging

import torch
from torch import Tensor

from annotator.bayes._checks import check_finite_number, check_positive, check_tensor
from annotator.errors import InputError

logger = logging.getLogger(__name__)


class ContrastiveLoss(enum.StrEnum):
    """Pretraining loss whose curvature the output-side factor ``B`` approximates."""

    CLIP = "clip"
    """InfoNCE: a softmax over the targets with logits ``s ĝ·t̂_c``."""

    SIGLIP = "siglip"
    """Sigmoid loss: one binary logistic term per target with logit ``s ĝ·t̂_c + b``."""


def clip_embedding_hessian(embeddings: Tensor, targets: Tensor, logit_scale: float) -> Tensor:
    """Compute the per-sample Gauss–Newton Hessian of the InfoNCE loss with respect to ``g``.

    Parameters
    ----------
    embeddings : Tensor, shape (N, D)
        Unnormalised embeddings ``g``.
    targets : Tensor, shape (C, D)
        Target embeddings ``t_c`` (normalised inside).
    logit_scale : float
        Scale ``s``, already exponentiated.

    Returns
    -------
    Tensor, shape (N, D, D)
        ``H = J H_ĝ J`` with ``H_ĝ = s² (T̂ᵀ diag(p) T̂ − m mᵀ)``, ``p = softmax(s Ĝ T̂ᵀ)`` and
        ``m = T̂ᵀ p``, in the dtype of ``embeddings``.
    """
    _check_inputs(embeddings, targets, logit_scale, None)
    # The InfoNCE softmax is invariant to a shared bias, so 0.0 stands for none.
    return _per_sample_hessian(embeddings, targets, logit_scale, 0.0, ContrastiveLoss.CLIP)


def siglip_embedding_hessian(
    embeddings: Tensor, targets: Tensor, logit_scale: float, logit_bias: float
) -> Tensor:
    """Compute the per-sample Hessian of the SigLIP loss with respect to ``g``.

    Parameters
    ----------
    embeddings : Tensor, shape (N, D)
        Unnormalised embeddings ``g``.
    targets : Tensor, shape (C, D)
        Target embeddings ``t_c`` (normalised inside).
    logit_scale : float
        Scale ``s``, already exponentiated.
    logit_bias : float
        Bias ``b`` of the sigmoid logits.

    Returns
    -------
    Tensor, shape (N, D, D)
        ``H = J H_ĝ J`` with ``H_ĝ = s² T̂ᵀ diag(σ(z)(1 − σ(z))) T̂`` and
        ``z = s Ĝ T̂ᵀ + b``.
    """
    _check_inputs(embeddings, targets, logit_scale, logit_bias)
    return _per_sample_hessian(embeddings, targets, logit_scale, logit_bias, ContrastiveLoss.SIGLIP)


def embedding_hessian_sum(
    embeddings: Tensor,
    targets: Tensor,
    loss: ContrastiveLoss | str,
    logit_scale: float,
    logit_bias: float | None = None,
) -> Tensor:
    """Compute ``Σ_n H_n`` over a batch without forming the (N, D, D) per-sample Hessians.

    With ``r_n = 1/‖g_n‖`` and ``u_n = H_ĝ,n ĝ_n``, expanding ``J H_ĝ J`` gives

        Σ_n H_n = Σ_n r_n² (H_ĝ,n − ĝ_n u_nᵀ − u_n ĝ_nᵀ + (ĝ_n·u_n) ĝ_n ĝ_nᵀ)

    and every term is a product of (N, C), (N, D) and (C, D) matrices, so the cost is
    ``O(N C D + C D² + N D²)`` and the memory ``O(N (C + D) + D²)``.

    Parameters
    ----------
    embeddings : Tensor, shape (N, D)
        Unnormalised embeddings ``g``.
    targets : Tensor, shape (C, D)
        Target embeddings (normalised inside).
    loss : ContrastiveLoss or str
        ``"clip"`` or ``"siglip"``.
    logit_scale : float
        Scale ``s``, already exponentiated.
    logit_bias : float, optional
        Bias ``b``, required for SigLIP and ignored for CLIP.

    Returns
    -------
    Tensor, shape (D, D)
        The sum of the per-sample Hessians, in the dtype of ``embeddings``.
    """
    loss = parse_loss(loss)
    bias = 0.0
    if loss is ContrastiveLoss.SIGLIP:
        if logit_bias is None:
            raise InputError("logit_bias is required for the SigLIP loss. Pass the model's bias")
        bias = check_finite_number("logit_bias", logit_bias)
    _check_inputs(embeddings, targets, logit_scale, None)

    unit, inverse_norm, unit_targets, weights, mean_target = _curvature_terms(
        embeddings, targets, logit_scale, bias, loss
    )
    scale_sq = logit_scale**2
    inverse_norm_sq = inverse_norm**2  # (N,)

    # Σ_n r_n² H_ĝ,n = s² (T̂ᵀ diag(Σ_n r_n² w_n) T̂ − Mᵀ diag(r²) M)
    target_weights = inverse_norm_sq @ weights  # (C,)
    summed = scale_sq * (unit_targets.T * target_weights) @ unit_targets  # (D, D)

    # u_n = H_ĝ,n ĝ_n = s² (T̂ᵀ (w_n ∘ T̂ ĝ_n) − m_n (m_n·ĝ_n))
    cosines = unit @ unit_targets.T  # (N, C)
    projected = scale_sq * (weights * cosines) @ unit_targets  # (N, D)
    if mean_target is not None:
        summed = summed - scale_sq * (mean_target.T * inverse_norm_sq) @ mean_target
        projected = projected - scale_sq * mean_target * (mean_target * unit).sum(-1, keepdim=True)

    cross = (unit.T * inverse_norm_sq) @ projected  # Σ_n r_n² ĝ_n u_nᵀ, (D, D)
    curvature_along_unit = (unit * projected).sum(-1)  # ĝ_n·u_n, (N,)
    radial = (unit.T * (inverse_norm_sq * curvature_along_unit)) @ unit  # (D, D)
    return summed - cross - cross.T + radial


def _per_sample_hessian(
    embeddings: Tensor,
    targets: Tensor,
    logit_scale: float,
    logit_bias: float,
    loss: ContrastiveLoss,
) -> Tensor:
    unit, inverse_norm, unit_targets, weights, mean_target = _curvature_terms(
        embeddings, targets, logit_scale, logit_bias, loss
    )
    # H_ĝ = s² (T̂ᵀ diag(w) T̂ − m mᵀ), (N, D, D)
    hessian_unit = torch.einsum("nc,cd,ce->nde", weights, unit_targets, unit_targets)
    if mean_target is not None:
        hessian_unit = hessian_unit - mean_target[:, :, None] * mean_target[:, None, :]
    hessian_unit = logit_scale**2 * hessian_unit

    # J = (I − ĝ ĝᵀ)/‖g‖, (N, D, D)
    identity = torch.eye(embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    jacobian = (identity - unit[:, :, None] * unit[:, None, :]) * inverse_norm[:, None, None]
    return jacobian @ hessian_unit @ jacobian


def _curvature_terms(
    embeddings: Tensor,
    targets: Tensor,
    logit_scale: float,
    logit_bias: float,
    loss: ContrastiveLoss,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Return ``ĝ`` (N, D), ``1/‖g‖`` (N,), ``T̂`` (C, D), weights ``w`` (N, C) and ``m`` (N, D)."""
    norms = embeddings.norm(dim=-1)
    if bool((norms == 0).any()):
        raise InputError(
            "embeddings contain an all-zero row, whose direction is undefined. "
            "Drop it before estimating curvature"
        )
    target_norms = targets.norm(dim=-1, keepdim=True)
    if bool((target_norms == 0).any()):
        raise InputError("targets contain an all-zero row. Drop it before estimating curvature")

    unit = embeddings / norms[:, None]
    unit_targets = targets.to(embeddings.dtype) / target_norms.to(embeddings.dtype)
    logits = logit_scale * unit @ unit_targets.T  # (N, C)

    if loss is ContrastiveLoss.CLIP:
        weights = torch.softmax(logits, dim=-1)
        mean_target = weights @ unit_targets  # (N, D)
        return unit, 1.0 / norms, unit_targets, weights, mean_target

    sigmoid = torch.sigmoid(logits + logit_bias)
    return unit, 1.0 / norms, unit_targets, sigmoid * (1.0 - sigmoid), None


def _check_inputs(
    embeddings: Tensor, targets: Tensor, logit_scale: float, logit_bias: float | None
) -> None:
    check_tensor("embeddings", embeddings, ndim=2)
    check_tensor("targets", targets, ndim=2)
    if targets.shape[1] != embeddings.shape[1]:
        raise InputError(
            f"targets have width {targets.shape[1]} but embeddings have width "
            f"{embeddings.shape[1]}. Both must be embeddings of the same model"
        )
    if targets.device != embeddings.device:
        raise InputError(
            f"targets are on {targets.device} but embeddings are on {embeddings.device}. "
            "Move both to the same device"
        )
    check_positive("logit_scale", logit_scale)
    if logit_bias is not None:
        check_finite_number("logit_bias", logit_bias)


def parse_loss(loss: ContrastiveLoss | str) -> ContrastiveLoss:
    """Convert ``loss`` to a :class:`ContrastiveLoss`, raising ``InputError`` when unknown."""
    try:
        return ContrastiveLoss(loss)
    except ValueError as error:
        options = ", ".join(repr(member.value) for member in ContrastiveLoss)
        raise InputError(f"unknown loss {loss!r}. Expected one of {options}") from error


__all__ = [
    "ContrastiveLoss",
    "clip_embedding_hessian",
    "embedding_hessian_sum",
    "parse_loss",
    "siglip_embedding_hessian",
]

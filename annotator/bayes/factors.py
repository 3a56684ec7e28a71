"""Kronecker curvature factors of the image and text projections.

A projection ``g = W φ`` with ``W`` of shape (D, p) gets the KFAC Laplace posterior

    A' = √n A + √λ I        B' = √n B + √λ I        W ~ MN(W*, row cov B'⁻¹, column cov A'⁻¹)

with ``A = mean φ φᵀ`` (p, p), ``B = mean H`` (D, D), ``H`` the loss Hessian with respect to
the embedding ``g``, ``n`` the effective number of data points and ``λ`` the prior precision
(Baumann et al., "Post-hoc Probabilistic Vision-Language Models").

This module contains the factor containers, a streaming estimator in float64 and the directory
format in which the BayesVLM authors publish their factors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from annotator.bayes._checks import check_positive, check_shape, check_tensor
from annotator.bayes.hessians import (
    ContrastiveLoss,
    clip_embedding_hessian,
    embedding_hessian_sum,
    parse_loss,
    siglip_embedding_hessian,
)
from annotator.bayes.linalg import symmetrize
from annotator.errors import FactorFormatError, InputError

logger = logging.getLogger(__name__)

#: File names of the published BayesVLM factor format, by tower and factor.
FACTOR_FILES = {
    ("image", "A"): "A_img_analytic.pt",
    ("image", "B"): "B_img_analytic.pt",
    ("text", "A"): "A_txt_analytic.pt",
    ("text", "B"): "B_txt_analytic.pt",
}
#: JSON file with ``n_img``, ``lambda_img``, ``n_txt`` and ``lambda_txt``.
PRIOR_FILE = "prior_precision_analytic.json"


@dataclasses.dataclass(frozen=True)
class KroneckerFactors:
    """Kronecker-factored curvature of one projection with weight ``W`` of shape (D, p).

    Attributes
    ----------
    A : Tensor, shape (p, p)
        Input-side factor ``mean φ φᵀ``.
    B : Tensor, shape (D, D)
        Output-side factor ``mean H``, the loss Hessian with respect to the embedding.
    n : float
        Effective number of data points, a scale on the curvature.
    prior_precision : float
        Precision ``λ`` of the isotropic Gaussian prior on ``W``.
    """

    A: Tensor
    B: Tensor
    n: float
    prior_precision: float

    def __post_init__(self) -> None:
        check_tensor("A", self.A, ndim=2)
        check_tensor("B", self.B, ndim=2)
        check_shape("A", self.A, (self.A.shape[0], self.A.shape[0]))
        check_shape("B", self.B, (self.B.shape[0], self.B.shape[0]))
        if self.A.device != self.B.device:
            raise InputError(
                f"A is on {self.A.device} but B is on {self.B.device}. Move both to one device"
            )
        object.__setattr__(self, "n", check_positive("n", self.n))
        object.__setattr__(
            self, "prior_precision", check_positive("prior_precision", self.prior_precision)
        )

    @property
    def input_dim(self) -> int:
        """Width ``p`` of the projection's input."""
        return int(self.A.shape[0])

    @property
    def output_dim(self) -> int:
        """Width ``D`` of the projection's output."""
        return int(self.B.shape[0])

    def damped(self) -> tuple[Tensor, Tensor]:
        """Compute the damped factors of the posterior precision in float64.

        Returns
        -------
        A_damped : Tensor, shape (p, p)
            ``A' = √n A + √λ I``.
        B_damped : Tensor, shape (D, D)
            ``B' = √n B + √λ I``.
        """
        sqrt_n = math.sqrt(self.n)
        sqrt_prior = math.sqrt(self.prior_precision)
        A = symmetrize(self.A.to(torch.float64))
        B = symmetrize(self.B.to(torch.float64))
        A_damped = sqrt_n * A + sqrt_prior * torch.eye(
            self.input_dim, dtype=torch.float64, device=A.device
        )
        B_damped = sqrt_n * B + sqrt_prior * torch.eye(
            self.output_dim, dtype=torch.float64, device=B.device
        )
        return A_damped, B_damped

    def with_prior_precision(self, prior_precision: float) -> KroneckerFactors:
        """Return a copy with ``λ`` replaced."""
        return dataclasses.replace(self, prior_precision=prior_precision)

    def to(self, device: torch.device | str) -> KroneckerFactors:
        """Return a copy with both factors on ``device``."""
        return dataclasses.replace(self, A=self.A.to(device), B=self.B.to(device))


@dataclasses.dataclass(frozen=True)
class ProjectionFactors:
    """Factors of the image projection and, when estimated, of the text projection."""

    image: KroneckerFactors
    text: KroneckerFactors | None = None


class FactorEstimator:
    """Streaming estimator of the image and text factors, accumulated in float64.

    Feed batches with :meth:`update` and read the result with :meth:`finalize`. Two kinds of
    batch are accepted:

    - image–caption pairs (``text_features`` and ``text_embeddings`` given): the captions of
      the batch are the targets of the image side and the images of the batch are the targets
      of the text side, as in symmetric InfoNCE or SigLIP pretraining;
    - unlabelled images (``class_embeddings`` given): the class prompts are the targets of the
      image side, and the text side receives nothing.

    ``A = mean φ φᵀ`` and ``B = mean H`` are means over all samples of a side.

    Parameters
    ----------
    loss : ContrastiveLoss or str
        ``"clip"`` (InfoNCE) or ``"siglip"`` (sigmoid loss).
    logit_scale : float
        Scale ``s``, already exponentiated.
    logit_bias : float, optional
        Bias ``b`` of the SigLIP logits, required for SigLIP.
    device : torch.device or str, optional
        Device of the sums, or the device of the first batch when None.
    """

    def __init__(
        self,
        loss: ContrastiveLoss | str,
        *,
        logit_scale: float,
        logit_bias: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.loss = parse_loss(loss)
        self.logit_scale = check_positive("logit_scale", logit_scale)
        if self.loss is ContrastiveLoss.SIGLIP and logit_bias is None:
            raise InputError("logit_bias is required for the SigLIP loss. Pass the model's bias")
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self._device = None if device is None else torch.device(device)
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}
        self._counts: dict[str, int] = {"image": 0, "text": 0}

    @property
    def num_image_samples(self) -> int:
        """Number of images accumulated so far."""
        return self._counts["image"]

    @property
    def num_text_samples(self) -> int:
        """Number of captions accumulated so far."""
        return self._counts["text"]

    def update(
        self,
        image_features: Tensor,
        image_embeddings: Tensor,
        *,
        text_features: Tensor | None = None,
        text_embeddings: Tensor | None = None,
        class_embeddings: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Parameters
        ----------
        image_features : Tensor, shape (N, p)
            Features ``φ`` entering the image projection.
        image_embeddings : Tensor, shape (N, D)
            Image embeddings ``g`` (with any offset already added).
        text_features : Tensor, shape (N, q), optional
            Features ``ψ`` of the captions paired with the images.
        text_embeddings : Tensor, shape (N, D), optional
            Caption embeddings ``h``, row ``i`` paired with image ``i``.
        class_embeddings : Tensor, shape (C, D), optional
            Class prompt embeddings, the targets of unlabelled images.

        Raises
        ------
        InputError
            When neither or both kinds of batch are given, or shapes disagree.
        """
        check_tensor("image_features", image_features, ndim=2)
        check_tensor("image_embeddings", image_embeddings, ndim=2)
        num_images = image_features.shape[0]
        check_shape("image_embeddings", image_embeddings, (num_images, None))

        has_pairs = text_features is not None or text_embeddings is not None
        if has_pairs == (class_embeddings is not None):
            raise InputError(
                "pass either text_features and text_embeddings (image–caption pairs) or "
                "class_embeddings (unlabelled images), not both and not neither"
            )

        if class_embeddings is not None:
            check_tensor("class_embeddings", class_embeddings, ndim=2)
            self._accumulate("image", image_features, image_embeddings, class_embeddings)
            return

        if text_features is None or text_embeddings is None:
            raise InputError("image–caption pairs need both text_features and text_embeddings")
        check_tensor("text_features", text_features, ndim=2)
        check_tensor("text_embeddings", text_embeddings, ndim=2)
        check_shape("text_features", text_features, (num_images, None))
        check_shape("text_embeddings", text_embeddings, (num_images, image_embeddings.shape[1]))
        self._accumulate("image", image_features, image_embeddings, text_embeddings)
        self._accumulate("text", text_features, text_embeddings, image_embeddings)

    def finalize(
        self,
        *,
        num_data: float | None = None,
        image_prior_precision: float = 1.0,
        text_prior_precision: float = 1.0,
    ) -> ProjectionFactors:
        """Return the mean factors.

        Parameters
        ----------
        num_data : float, optional
            Effective number of data points ``n`` of both sides. When None, each side uses
            its own sample count.
        image_prior_precision, text_prior_precision : float
            ``λ`` of each side. :func:`annotator.bayes.prior.optimize_prior_precision`
            chooses it by the Laplace evidence once the projection weights are known.

        Returns
        -------
        ProjectionFactors
            ``text`` is None when no image–caption pairs were seen.

        Raises
        ------
        InputError
            When no image has been accumulated.
        """
        if self._counts["image"] == 0:
            raise InputError("no batches were added. Call update() before finalize()")
        image = self._mean_factors("image", num_data, image_prior_precision)
        text = None
        if self._counts["text"] > 0:
            text = self._mean_factors("text", num_data, text_prior_precision)
        logger.info(
            "Estimated factors from %d images and %d captions (loss=%s)",
            self._counts["image"],
            self._counts["text"],
            self.loss.value,
        )
        return ProjectionFactors(image=image, text=text)

    def _mean_factors(
        self, side: str, num_data: float | None, prior_precision: float
    ) -> KroneckerFactors:
        count = self._counts[side]
        input_sum, hessian_sum = self._sums[side]
        return KroneckerFactors(
            A=symmetrize(input_sum / count),
            B=symmetrize(hessian_sum / count),
            n=float(count) if num_data is None else num_data,
            prior_precision=prior_precision,
        )

    def _accumulate(self, side: str, features: Tensor, embeddings: Tensor, targets: Tensor) -> None:
        if targets.shape[1] != embeddings.shape[1]:
            raise InputError(
                f"{side} targets have width {targets.shape[1]} but the {side} embeddings have "
                f"width {embeddings.shape[1]}"
            )
        device = self._device if self._device is not None else features.device
        self._device = device
        features = features.to(device=device, dtype=torch.float64)
        embeddings = embeddings.to(device=device, dtype=torch.float64)
        targets = targets.to(device=device, dtype=torch.float64)

        input_sum = features.T @ features  # Σ φ φᵀ, (p, p)
        hessian_sum = embedding_hessian_sum(
            embeddings, targets, self.loss, self.logit_scale, self.logit_bias
        )
        if side in self._sums:
            previous_input, previous_hessian = self._sums[side]
            if (
                previous_input.shape != input_sum.shape
                or previous_hessian.shape != hessian_sum.shape
            ):
                raise InputError(
                    f"{side} batch has features of width {features.shape[1]} and embeddings of "
                    f"width {embeddings.shape[1]}, but earlier batches had "
                    f"{previous_input.shape[0]} and {previous_hessian.shape[0]}"
                )
            input_sum = previous_input + input_sum
            hessian_sum = previous_hessian + hessian_sum
        self._sums[side] = (input_sum, hessian_sum)
        self._counts[side] += features.shape[0]


def load_factors(
    directory: str | Path,
    *,
    image_shape: tuple[int, int] | None = None,
    text_shape: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> ProjectionFactors:
    """Load factors saved in the published BayesVLM directory format.

    The directory contains ``A_img_analytic.pt``, ``B_img_analytic.pt``, ``A_txt_analytic.pt``,
    ``B_txt_analytic.pt`` (plain tensors) and ``prior_precision_analytic.json`` with keys
    ``n_img``, ``lambda_img``, ``n_txt`` and ``lambda_txt``. The text files may be absent
    together, and then ``text`` is None. Tensors are loaded with ``map_location=device``
    because the published ones were saved from a GPU. They are converted to float64 and
    symmetrised as ``(M + Mᵀ)/2``, because the published ViT-B-32 ``B`` factors are not
    exactly symmetric. Their eigenvalues go down to about −5e-4, which the damping
    ``√λ I`` absorbs.

    Parameters
    ----------
    directory : str or Path
        The factor directory.
    image_shape, text_shape : tuple of int, optional
        Expected ``(p, D)`` of the image projection and ``(q, D)`` of the text projection.
        A text shape also makes the text files required.
    device : torch.device or str
        Device to load onto.

    Returns
    -------
    ProjectionFactors
        Factors in float64 on ``device``.

    Raises
    ------
    FactorFormatError
        When a file is missing or malformed or a shape differs from the expected one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FactorFormatError(
            f"factor directory {directory} does not exist. Pass the folder that contains "
            f"{FACTOR_FILES['image', 'A']} and {PRIOR_FILE}"
        )
    prior = _read_prior_file(directory / PRIOR_FILE)

    image = _load_side(directory, "image", image_shape, prior, device)

    text_paths = [directory / FACTOR_FILES["text", kind] for kind in ("A", "B")]
    present = [path.exists() for path in text_paths]
    text = None
    if all(present) or text_shape is not None:
        text = _load_side(directory, "text", text_shape, prior, device)
    elif any(present):
        missing = text_paths[present.index(False)]
        raise FactorFormatError(
            f"{missing} is missing while the other text factor exists. "
            "Restore it or remove both text factor files"
        )
    logger.info(
        "Loaded factors from %s: image A %s, B %s, text %s",
        directory,
        tuple(image.A.shape),
        tuple(image.B.shape),
        "absent" if text is None else f"A {tuple(text.A.shape)}, B {tuple(text.B.shape)}",
    )
    return ProjectionFactors(image=image, text=text)


def save_factors(
    factors: ProjectionFactors, directory: str | Path, *, dtype: torch.dtype = torch.float32
) -> None:
    """Save factors in the published BayesVLM directory format.

    Tensors are written on the CPU in ``dtype`` (float32 by default, like the published
    files). The text files and the ``*_txt`` JSON keys are written only when ``factors.text``
    is not None.

    Parameters
    ----------
    factors : ProjectionFactors
        The factors to save.
    directory : str or Path
        Target folder, created with its parents when missing.
    dtype : torch.dtype
        Floating-point dtype of the saved tensors.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prior: dict[str, float] = {}
    sides = [("image", "img", factors.image), ("text", "txt", factors.text)]
    for side, suffix, side_factors in sides:
        if side_factors is None:
            continue
        torch.save(side_factors.A.detach().to("cpu", dtype), directory / FACTOR_FILES[side, "A"])
        torch.save(side_factors.B.detach().to("cpu", dtype), directory / FACTOR_FILES[side, "B"])
        prior[f"n_{suffix}"] = side_factors.n
        prior[f"lambda_{suffix}"] = side_factors.prior_precision
    (directory / PRIOR_FILE).write_text(json.dumps(prior, indent=4) + "\n", encoding="utf-8")
    logger.info("Saved factors to %s", directory)


def _read_prior_file(path: Path) -> dict[str, float]:
    if not path.exists():
        raise FactorFormatError(
            f"{path} is missing. It must contain n_img, lambda_img, n_txt and lambda_txt "
            "(save_factors writes it)"
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise FactorFormatError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise FactorFormatError(f"{path} must contain a JSON object, got {type(content).__name__}")
    return content


def _load_side(
    directory: Path,
    side: str,
    expected: tuple[int, int] | None,
    prior: dict[str, object],
    device: torch.device | str,
) -> KroneckerFactors:
    suffix = "img" if side == "image" else "txt"
    input_dim = None if expected is None else expected[0]
    output_dim = None if expected is None else expected[1]
    A = _load_factor(directory / FACTOR_FILES[side, "A"], input_dim, device)
    B = _load_factor(directory / FACTOR_FILES[side, "B"], output_dim, device)

    values = {}
    for key in (f"n_{suffix}", f"lambda_{suffix}"):
        if key not in prior:
            raise FactorFormatError(
                f"{directory / PRIOR_FILE} has no key {key!r}. Add it or re-save the factors"
            )
        value = prior[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FactorFormatError(
                f"{directory / PRIOR_FILE}: {key} must be a number, got {value!r}"
            )
        if not math.isfinite(value) or value <= 0:
            raise FactorFormatError(
                f"{directory / PRIOR_FILE}: {key} must be finite and greater than 0, got {value!r}"
            )
        values[key] = float(value)
    return KroneckerFactors(
        A=A, B=B, n=values[f"n_{suffix}"], prior_precision=values[f"lambda_{suffix}"]
    )


def _load_factor(path: Path, expected_dim: int | None, device: torch.device | str) -> Tensor:
    if not path.exists():
        raise FactorFormatError(
            f"{path} is missing. Restore it from the published factors or estimate new "
            "factors with FactorEstimator and save_factors"
        )
    try:
        tensor = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise FactorFormatError(f"{path} cannot be read as a torch tensor: {error}") from error
    if not isinstance(tensor, Tensor):
        raise FactorFormatError(f"{path} must contain a plain tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
        raise FactorFormatError(
            f"{path} must contain a square matrix, got shape {tuple(tensor.shape)}"
        )
    if expected_dim is not None and tensor.shape[0] != expected_dim:
        raise FactorFormatError(
            f"{path} has shape {tuple(tensor.shape)} but the model needs "
            f"({expected_dim}, {expected_dim}). Load the factors published for this model"
        )
    if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
        raise FactorFormatError(f"{path} must contain finite floating-point values")
    return symmetrize(tensor.to(torch.float64))


__all__ = [
    "FACTOR_FILES",
    "PRIOR_FILE",
    "ContrastiveLoss",
    "FactorEstimator",
    "KroneckerFactors",
    "ProjectionFactors",
    "clip_embedding_hessian",
    "load_factors",
    "save_factors",
    "siglip_embedding_hessian",
]

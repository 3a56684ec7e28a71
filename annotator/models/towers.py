"""Feature extraction up to the projections of an open_clip model.

The Bayesian core treats the last linear layer of each tower as random and everything below
it as fixed. This module runs an open_clip model and returns what enters those layers, the
*features*, together with the layers' weights, so that

    g = W_img φ + r        (image embedding, D wide; r = 0 except for SigLIP)
    h = W_txt ψ            (text embedding, D wide)

reproduce open_clip's ``encode_image`` and ``encode_text`` before normalisation. Weights are
returned in ``nn.Linear`` orientation ``(D, p)``. A projection bias ``b`` is folded into ``W``
as its last column, with a constant 1 appended to the features, so ``W φ`` includes it.

Supported towers (open_clip 3.3):

- CLIP ViT: ``VisionTransformer`` pools the tokens after ``ln_post`` and multiplies by
  ``proj`` (p × D), so ``W_img = proj.T`` and ``φ`` is the pooled ``ln_post`` output.
- SigLIP (timm ViT with ``global_pool="map"``): the image tower ends in timm's
  ``AttentionPoolLatent``, whose output is ``x + mlp.fc2(act(mlp.fc1(norm(x))))`` for the
  attention output ``x`` of its single latent token. ``W_img`` is ``fc2`` (with its bias),
  ``φ`` the activations entering ``fc2``, and the residual ``x`` is the per-image *offset*
  ``r``, held fixed. After the pool, timm's ``fc_norm`` and ``head`` and open_clip's adapter
  head are identities for these configs, which the wrapper checks.
- Text: open_clip's ``TextTransformer`` (or the text tower built into ``CLIP``), whose pooled
  ``ln_final`` output is multiplied by ``text_projection``, a matrix or an ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from PIL import Image
from torch import nn

from annotator.errors import InputError, ModelLoadError, NumericalError
from annotator.models.specs import supported_architectures

logger = logging.getLogger(__name__)

ModelKindName = Literal["clip", "siglip"]


@dataclass(frozen=True)
class ImageFeatures:
    """Image features ``φ`` and offsets ``r`` of a batch, both ``float32``.

    ``features`` is ``(B, p)`` and ``offsets`` is ``(B, D)``, or None for towers without an
    offset. The embedding is ``g = features @ W_img.T + offsets``.
    """

    features: torch.Tensor
    offsets: torch.Tensor | None


def _unsupported(reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"unsupported open_clip model: {reason}. annotator extracts features from open_clip's "
        f"ViT CLIP towers and its timm SigLIP towers; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )


def _is_identity(module: nn.Module) -> bool:
    """Return whether ``module`` is the identity in evaluation mode."""
    if isinstance(module, nn.Identity | nn.Dropout):
        return True
    return isinstance(module, nn.Sequential) and all(_is_identity(child) for child in module)


def _linear_with_bias(layer: nn.Linear) -> torch.Tensor:
    """Return ``[weight | bias]`` as float32, ``(out, in + 1)``, or ``weight`` without a bias."""
    weight = layer.weight.detach().float()
    if layer.bias is None:
        return weight.clone()
    return torch.cat([weight, layer.bias.detach().float()[:, None]], dim=1)


def _append_one(features: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
    return torch.cat([features, ones], dim=1)


@contextlib.contextmanager
def _capture(module: nn.Module, *, inputs: bool) -> Iterator[list[torch.Tensor]]:
    """Record the first input (``inputs=True``) or the output of each call of ``module``."""
    captured: list[torch.Tensor] = []
    if inputs:
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def _single_capture(captured: list[torch.Tensor], where: str) -> torch.Tensor:
    if len(captured) != 1:
        raise ModelLoadError(
            f"expected one call of {where} per forward pass, saw {len(captured)}; the model's "
            "structure differs from the open_clip 3.3 towers this wrapper supports"
        )
    return captured[0]


class _VitImageTower:
    """open_clip ``VisionTransformer``: ``g = proj.T @ pool(ln_post(tokens))``."""

    has_offset = False

    def __init__(self, visual: VisionTransformer) -> None:
        if getattr(visual, "attn_pool", None) is not None:
            raise _unsupported("the ViT image tower uses attentional pooling (CoCa)")
        if not isinstance(visual.proj, torch.Tensor) or visual.proj.ndim != 2:
            raise _unsupported("the ViT image tower has no projection matrix `proj`")
        if visual.pool_type not in ("tok", "avg"):
            raise _unsupported(f"the ViT image tower pools with {visual.pool_type!r}")
        if not hasattr(visual, "_global_pool"):
            raise _unsupported("open_clip's VisionTransformer lacks `_global_pool`")
        self.visual = visual

    def projection(self) -> torch.Tensor:
        return self.visual.proj.detach().float().T.contiguous()  # (D, p)

    def features(self, pixels: torch.Tensor) -> ImageFeatures:
        with _capture(self.visual.ln_post, inputs=False) as captured:
            self.visual(pixels)
        normed = _single_capture(captured, "visual.ln_post")
        # ln_post runs on all tokens, or on the pooled token when final_ln_after_pool is set.
        pooled = normed if normed.ndim == 2 else self.visual._global_pool(normed)[0]
        return ImageFeatures(features=pooled.float(), offsets=None)


class _AttentionPoolImageTower:
    """timm ViT with ``AttentionPoolLatent`` (SigLIP): ``g = W a + b + r``."""

    has_offset = True

    def __init__(self, visual: TimmModel) -> None:
        trunk = visual.trunk
        pool = getattr(trunk, "attn_pool", None)
        if pool is None or type(pool).__name__ != "AttentionPoolLatent":
            raise _unsupported(
                f"the timm image tower {type(trunk).__name__} has no latent attention pool"
            )
        if getattr(pool, "mlp", None) is None or not isinstance(
            getattr(pool.mlp, "fc2", None), nn.Linear
        ):
            raise _unsupported("the attention pool has no MLP ending in a linear layer `fc2`")
        if pool.latent_len != 1 or pool.pool not in ("token", "avg"):
            raise _unsupported(
                f"the attention pool has {pool.latent_len} latent tokens pooled by {pool.pool!r}"
            )
        after_pool = {
            "trunk.fc_norm": getattr(trunk, "fc_norm", nn.Identity()),
            "trunk.head_drop": getattr(trunk, "head_drop", nn.Identity()),
            "trunk.head": getattr(trunk, "head", nn.Identity()),
            "head": visual.head,
            "attn_pool.mlp.drop2": getattr(pool.mlp, "drop2", nn.Identity()),
        }
        for name, module in after_pool.items():
            if not _is_identity(module):
                raise _unsupported(
                    f"the SigLIP image tower applies {type(module).__name__} ({name}) after the "
                    "attention pool, so fc2 is not its last layer"
                )
        self.pool = pool
        self.fc2: nn.Linear = pool.mlp.fc2
        self.visual = visual

    def projection(self) -> torch.Tensor:
        return _linear_with_bias(self.fc2)  # (D, p) with p = fc2.in_features + 1

    def features(self, pixels: torch.Tensor) -> ImageFeatures:
        # The residual x enters pool.norm and the activations a enter fc2. Both are
        # (B, 1, width), with one latent token.
        with (
            _capture(self.pool.norm, inputs=True) as residuals,
            _capture(self.fc2, inputs=True) as activations,
        ):
            self.visual(pixels)
        residual = _single_capture(residuals, "attn_pool.norm")[:, 0]
        activation = _single_capture(activations, "attn_pool.mlp.fc2")[:, 0]
        features = activation.float()
        if self.fc2.bias is not None:
            features = _append_one(features)
        return ImageFeatures(features=features, offsets=residual.float())


class _TextTower:
    """open_clip ``TextTransformer`` or ``CLIP``'s built-in text tower: ``h = W pool(ln_final(x))``."""

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, CLIP):
            self.ln_final = model.ln_final
            self.projection_module = model.text_projection
            self.pool_type = model.text_pool_type
            self.eos_id = getattr(model, "text_eos_id", None)
        elif isinstance(model, CustomTextCLIP) and isinstance(model.text, TextTransformer):
            text = model.text
            if text.cls_emb is not None:
                raise _unsupported("the text tower appends a class token (CoCa)")
            self.ln_final = text.ln_final
            self.projection_module = text.text_projection
            self.pool_type = text.pool_type
            self.eos_id = getattr(text, "eos_id", None)
        else:
            text = getattr(model, "text", None)
            raise _unsupported(
                f"the text tower is {type(text).__name__}, not open_clip's TextTransformer"
            )
        if self.projection_module is None:
            raise _unsupported("the text tower has no text_projection")
        if self.pool_type == "none":
            raise _unsupported("the text tower does not pool its tokens")
        self.model = model

    def projection(self) -> torch.Tensor:
        if isinstance(self.projection_module, nn.Linear):
            return _linear_with_bias(self.projection_module)
        return self.projection_module.detach().float().T.contiguous()  # (D, q)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.projection_module, nn.Linear):
            with _capture(self.projection_module, inputs=True) as captured:
                self.model.encode_text(tokens)
            pooled = _single_capture(captured, "text_projection").float()
            if self.projection_module.bias is not None:
                pooled = _append_one(pooled)
            return pooled
        with _capture(self.ln_final, inputs=False) as captured:
            self.model.encode_text(tokens)
        normed = _single_capture(captured, "ln_final")
        pooled = text_global_pool(normed, tokens, self.pool_type, eos_token_id=self.eos_id)
        return pooled.float()


def _image_tower(model: nn.Module) -> _VitImageTower | _AttentionPoolImageTower:
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        return _VitImageTower(visual)
    if isinstance(visual, TimmModel):
        return _AttentionPoolImageTower(visual)
    raise _unsupported(f"the image tower is {type(visual).__name__}")


def _input_dtype(model: nn.Module) -> torch.dtype:
    """Return the dtype of the image patch embedding, which the pixels must match."""
    for parameter in model.visual.parameters():
        if parameter.ndim == 4:
            return parameter.dtype
    return next(model.parameters()).dtype


class VisionLanguageModel:
    """An open_clip model seen as fixed features followed by random projections.

    Parameters
    ----------
    model
        An open_clip ``CLIP`` or ``CustomTextCLIP`` with a supported image and text tower.
        It is put in evaluation mode with gradients off.
    preprocess
        PIL image → ``(3, H, W)`` tensor. Built from ``model.visual.preprocess_cfg`` when None.
    tokenizer
        open_clip tokenizer for the text tower, or None when it cannot be built; then
        :meth:`tokenize` raises ModelLoadError with ``tokenizer_error``.
    name
        Label for logs and messages, usually ``str(spec)``.
    cache_key
        Identity of the weights for feature caches (``ModelSpec.cache_key``), or None for
        weights without one, such as a randomly initialised model.

    Raises
    ------
    ModelLoadError
        If a tower is not supported; the message lists the supported architectures.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        tokenizer_error: str | None = None,
        name: str = "open_clip model",
        cache_key: str | None = None,
    ) -> None:
        if not isinstance(model, CLIP | CustomTextCLIP):
            raise _unsupported(f"{type(model).__name__} is not an open_clip CLIP or CustomTextCLIP")
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.name = name
        self.cache_key = cache_key
        self._image_tower = _image_tower(model)
        self._text_tower = _TextTower(model)
        # Hooks capture intermediate tensors, so one forward pass runs at a time per model.
        self._lock = threading.Lock()

        if preprocess is None:
            config = dict(getattr(model.visual, "preprocess_cfg", None) or {})
            config.setdefault("size", model.visual.image_size)
            preprocess = image_transform_v2(PreprocessCfg(**config), is_train=False)
        self.preprocess = preprocess
        self._tokenizer = tokenizer
        self._tokenizer_error = tokenizer_error

        self.device: torch.device = next(model.parameters()).device
        self.dtype: torch.dtype = _input_dtype(model)
        self.image_projection: torch.Tensor = self._image_tower.projection()
        self.text_projection: torch.Tensor = self._text_tower.projection()
        if self.image_projection.shape[0] != self.text_projection.shape[0]:
            raise _unsupported(
                f"the image projection has {self.image_projection.shape[0]} outputs but the text "
                f"projection {self.text_projection.shape[0]}"
            )
        self.logit_scale: float = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        bias = getattr(model, "logit_bias", None)
        self.logit_bias: float | None = (
            None if bias is None else float(bias.detach().float().reshape(-1)[0])
        )
        logger.info(
            "wrapped %s: kind=%s p=%d q=%d D=%d offset=%s device=%s dtype=%s",
            name,
            self.kind,
            self.image_dim,
            self.text_dim,
            self.embed_dim,
            self.has_image_offset,
            self.device,
            self.dtype,
        )

    @property
    def kind(self) -> ModelKindName:
        """``"siglip"`` for a model with a logit bias (sigmoid loss), else ``"clip"`` (softmax)."""
        return "siglip" if self.logit_bias is not None else "clip"

    @property
    def image_dim(self) -> int:
        """Width ``p`` of the image features, including the constant 1 of a folded bias."""
        return int(self.image_projection.shape[1])

    @property
    def text_dim(self) -> int:
        """Width ``q`` of the text features, including the constant 1 of a folded bias."""
        return int(self.text_projection.shape[1])

    @property
    def embed_dim(self) -> int:
        """Width ``D`` of the embeddings."""
        return int(self.image_projection.shape[0])

    @property
    def has_image_offset(self) -> bool:
        """Whether image embeddings add a fixed per-image offset ``r`` (SigLIP)."""
        return self._image_tower.has_offset

    @property
    def context_length(self) -> int:
        """Number of text tokens per prompt; longer prompts are truncated."""
        return int(self.model.context_length)

    @property
    def tokenizer(self) -> Callable[..., torch.Tensor]:
        """The open_clip tokenizer. Raises ModelLoadError when it could not be built."""
        if self._tokenizer is None:
            raise ModelLoadError(
                f"no tokenizer for {self.name}: {self._tokenizer_error or 'none was given'}"
            )
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize texts into ``(B, context_length)`` token ids (int64, on the CPU)."""
        if isinstance(texts, str):
            raise InputError(f"tokenize expects a list of texts, got the string {texts!r}")
        return self.tokenizer(list(texts), context_length=self.context_length)

    def count_tokens(self, text: str) -> int:
        """Count the tokens of ``text`` before truncation, start and end tokens included."""
        tokenizer = self.tokenizer
        if isinstance(tokenizer, SimpleTokenizer):
            return len(tokenizer.encode(text)) + 2
        if isinstance(tokenizer, HFTokenizer) or hasattr(tokenizer, "tokenizer"):
            clean = getattr(tokenizer, "clean_fn", lambda value: value)
            return len(tokenizer.tokenizer(clean(text))["input_ids"])
        raise ModelLoadError(
            f"cannot count tokens with a {type(tokenizer).__name__}; use an open_clip "
            "SimpleTokenizer or HFTokenizer"
        )

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            shape = (
                tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            )
            raise InputError(f"pixels must be a (B, 3, H, W) tensor, got {shape}")
        return pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
            shape = (
                tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            )
            raise InputError(f"tokens must be a (B, L) integer tensor, got {shape}")
        return tokens.to(device=self.device)

    def image_features(self, pixels: torch.Tensor) -> ImageFeatures:
        """Compute image features ``φ`` ``(B, p)`` and offsets ``r`` ``(B, D)`` as float32.

        Parameters
        ----------
        pixels
            ``(B, 3, H, W)`` preprocessed images, on any device.
        """
        pixels = self._check_pixels(pixels)
        if pixels.shape[0] == 0:
            empty = torch.zeros(0, self.image_dim, device=self.device)
            offsets = (
                torch.zeros(0, self.embed_dim, device=self.device)
                if self.has_image_offset
                else None
            )
            return ImageFeatures(features=empty, offsets=offsets)
        with self._lock, torch.inference_mode():
            result = self._image_tower.features(pixels)
        _check_finite(result.features, "image features", self.name)
        return result

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Compute text features ``ψ`` ``(B, q)`` as float32 from ``(B, L)`` token ids."""
        tokens = self._check_tokens(tokens)
        if tokens.shape[0] == 0:
            return torch.zeros(0, self.text_dim, device=self.device)
        with self._lock, torch.inference_mode():
            features = self._text_tower.features(tokens)
        _check_finite(features, "text features", self.name)
        return features

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Compute unnormalised image embeddings ``g = φ W_imgᵀ + r``, ``(B, D)`` float32."""
        result = self.image_features(pixels)
        embeddings = result.features @ self.image_projection.T
        if result.offsets is not None:
            embeddings = embeddings + result.offsets
        return embeddings

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Compute unnormalised text embeddings ``h = ψ W_txtᵀ``, ``(B, D)`` float32."""
        return self.text_features(tokens) @ self.text_projection.T

    def __repr__(self) -> str:
        return (
            f"VisionLanguageModel({self.name!r}, kind={self.kind!r}, p={self.image_dim}, "
            f"q={self.text_dim}, D={self.embed_dim}, device={self.device}, dtype={self.dtype})"
        )


def _check_finite(values: torch.Tensor, quantity: str, name: str) -> None:
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).any(dim=1).sum())
        raise NumericalError(
            f"{name} produced non-finite {quantity} for {bad} of {values.shape[0]} inputs. "
            "With fp16 weights, try precision='bf16' or 'fp32'"
        )


def describe(model: VisionLanguageModel) -> dict[str, Any]:
    """Summarise a wrapped model for logs and ``annotator models check``."""
    return {
        "name": model.name,
        "kind": model.kind,
        "image_dim": model.image_dim,
        "text_dim": model.text_dim,
        "embed_dim": model.embed_dim,
        "has_image_offset": model.has_image_offset,
        "logit_scale": model.logit_scale,
        "logit_bias": model.logit_bias,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "context_length": model.context_length,
    }

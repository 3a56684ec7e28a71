"""Features times projections reproduce open_clip's own embeddings, at real and tiny sizes."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch.testing import assert_close

from annotator.errors import InputError, ModelLoadError
from annotator.models.loading import build_tokenizer
from annotator.models.towers import ImageFeatures, VisionLanguageModel

from .helpers import tiny_config, wrap_tiny

PUBLISHED_FACTORS = Path(
    os.environ.get(
        "ANNOTATOR_BAYESVLM_FACTORS",
        "/work/shared/data/bayesvlm-hessians/CLIP-ViT-B-32-laion2B-s34B-b79K",
    )
)


def _pixels(model: VisionLanguageModel, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


def _tokens(model: VisionLanguageModel, batch: int = 3, seed: int = 0) -> torch.Tensor:
    # Random ids with a distinct last token, so argmax- and eos-pooling pick real positions.
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (batch, model.context_length), generator=generator)
    tokens[:, -1] = model.model.vocab_size - 1
    return tokens


@dataclass(frozen=True)
class Outputs:
    """open_clip's embeddings and the wrapper's features for one batch of inputs."""

    model: VisionLanguageModel
    expected_image: torch.Tensor
    expected_text: torch.Tensor
    image: ImageFeatures
    text: torch.Tensor

    def check_reproduces_open_clip(self) -> None:
        rebuilt_image = self.image.features @ self.model.image_projection.T
        if self.image.offsets is not None:
            rebuilt_image = rebuilt_image + self.image.offsets
        rebuilt_text = self.text @ self.model.text_projection.T
        assert_close(rebuilt_image, self.expected_image, rtol=1e-4, atol=1e-4)
        assert_close(rebuilt_text, self.expected_text, rtol=1e-4, atol=1e-4)


def compute_outputs(model: VisionLanguageModel, *, images: int = 2, texts: int = 2) -> Outputs:
    pixels = _pixels(model, images)
    tokens = _tokens(model, texts)
    with torch.no_grad():
        expected_image = model.model.encode_image(pixels)
        expected_text = model.model.encode_text(tokens)
    return Outputs(
        model=model,
        expected_image=expected_image,
        expected_text=expected_text,
        image=model.image_features(pixels),
        text=model.text_features(tokens),
    )


@pytest.fixture(scope="module")
def vit_outputs(vit_b32: VisionLanguageModel) -> Outputs:
    return compute_outputs(vit_b32)


@pytest.fixture(scope="module")
def siglip_outputs(siglip_b16: VisionLanguageModel) -> Outputs:
    return compute_outputs(siglip_b16)


def test_vit_b32_shapes(vit_b32: VisionLanguageModel) -> None:
    assert vit_b32.kind == "clip"
    assert vit_b32.image_dim == 768
    assert vit_b32.text_dim == 512
    assert vit_b32.embed_dim == 512
    assert vit_b32.image_projection.shape == (512, 768)
    assert vit_b32.text_projection.shape == (512, 512)
    assert vit_b32.has_image_offset is False
    assert vit_b32.logit_bias is None


def test_vit_b32_projection_orientation(vit_b32: VisionLanguageModel) -> None:
    assert torch.equal(vit_b32.image_projection, vit_b32.model.visual.proj.detach().T)
    assert torch.equal(vit_b32.text_projection, vit_b32.model.text_projection.detach().T)


def test_vit_b32_reproduces_open_clip(vit_outputs: Outputs) -> None:
    vit_outputs.check_reproduces_open_clip()


def test_vit_b32_features_float32(vit_outputs: Outputs) -> None:
    assert vit_outputs.image.features.dtype == torch.float32
    assert vit_outputs.image.features.shape == (2, 768)
    assert vit_outputs.image.offsets is None
    assert vit_outputs.text.dtype == torch.float32
    assert vit_outputs.text.shape == (2, 512)


def test_vit_b32_encode_matches_features(
    vit_b32: VisionLanguageModel, vit_outputs: Outputs
) -> None:
    tokens = _tokens(vit_b32, 2)
    assert_close(vit_b32.encode_text(tokens), vit_outputs.text @ vit_b32.text_projection.T)


def test_vit_b32_logit_scale(vit_b32: VisionLanguageModel) -> None:
    assert vit_b32.logit_scale == pytest.approx(float(vit_b32.model.logit_scale.exp()))


def test_vit_b32_tokenizer_pooling(vit_b32: VisionLanguageModel) -> None:
    tokens = vit_b32.tokenize(["a photo of a cat.", "a photo of a dog."])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        expected = vit_b32.model.encode_text(tokens)
    assert_close(vit_b32.encode_text(tokens), expected, rtol=1e-4, atol=1e-4)


def test_siglip_shapes(siglip_b16: VisionLanguageModel) -> None:
    fc2 = siglip_b16.model.visual.trunk.attn_pool.mlp.fc2
    assert siglip_b16.kind == "siglip"
    assert siglip_b16.has_image_offset is True
    assert fc2.in_features == 3072
    assert siglip_b16.image_dim == 3072 + 1
    assert siglip_b16.text_dim == 768 + 1
    assert siglip_b16.embed_dim == 768
    assert siglip_b16.logit_bias == pytest.approx(-10.0)


def test_siglip_projection_is_fc2(siglip_b16: VisionLanguageModel) -> None:
    fc2 = siglip_b16.model.visual.trunk.attn_pool.mlp.fc2
    assert torch.equal(siglip_b16.image_projection[:, :-1], fc2.weight.detach())
    assert torch.equal(siglip_b16.image_projection[:, -1], fc2.bias.detach())


def test_siglip_reproduces_open_clip(siglip_outputs: Outputs) -> None:
    siglip_outputs.check_reproduces_open_clip()


def test_siglip_offsets_matter(siglip_outputs: Outputs) -> None:
    image = siglip_outputs.image
    assert image.offsets is not None
    assert image.offsets.shape == (2, 768)
    assert image.offsets.dtype == torch.float32
    assert torch.all(image.features[:, -1] == 1.0)
    assert torch.all(siglip_outputs.text[:, -1] == 1.0)
    # Without the offset the embedding is wrong: r is a real part of g.
    projected = image.features @ siglip_outputs.model.image_projection.T
    assert float((siglip_outputs.expected_image - projected).abs().max()) > 1e-2


def test_siglip_tokenizer_needs_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers is a dependency, so hide it the way a minimal install would lack it.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "transformers" else real_find_spec(name, *args),
    )
    config = open_clip.get_model_config("ViT-B-16-SigLIP")

    with pytest.raises(ModelLoadError, match="needs the `transformers` package"):
        build_tokenizer(config, download=False)


def test_published_factors_fit_vit_b32(vit_b32: VisionLanguageModel) -> None:
    if not PUBLISHED_FACTORS.is_dir():
        pytest.skip(f"published ViT-B-32 factors not found at {PUBLISHED_FACTORS}")
    p, q, d = vit_b32.image_dim, vit_b32.text_dim, vit_b32.embed_dim
    expected = {"A_img": (p, p), "B_img": (d, d), "A_txt": (q, q), "B_txt": (d, d)}
    for name, shape in expected.items():
        tensor = torch.load(PUBLISHED_FACTORS / f"{name}_analytic.pt", map_location="cpu")
        assert tuple(tensor.shape) == shape, name

    load_factors = _find_load_factors()
    if load_factors is None:
        pytest.skip("annotator.bayes has no load_factors yet; shapes checked with torch.load")
    factors = load_factors(PUBLISHED_FACTORS, image_shape=(p, d), text_shape=(q, d))
    assert tuple(factors.image.A.shape) == (p, p)
    assert tuple(factors.image.B.shape) == (d, d)
    assert factors.text is not None
    assert tuple(factors.text.A.shape) == (q, q)
    assert tuple(factors.text.B.shape) == (d, d)


def _find_load_factors() -> Callable[..., Any] | None:
    try:
        from annotator.bayes import load_factors
    except ImportError:
        try:
            from annotator.bayes.factors import load_factors
        except ImportError:
            return None
    return load_factors


def _check_reproduces_open_clip(model: VisionLanguageModel) -> None:
    compute_outputs(model).check_reproduces_open_clip()


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(tiny_config(), id="tok-pool"),
        pytest.param(
            tiny_config(vision={"pool_type": "avg", "final_ln_after_pool": True}),
            id="avg-pool-ln-after",
        ),
        pytest.param(tiny_config(vision={"pool_type": "avg"}), id="avg-pool"),
        pytest.param(tiny_config(text={"proj_bias": True}), id="text-linear-bias"),
        pytest.param(
            tiny_config(text={"pool_type": "last", "no_causal_mask": True}), id="text-last"
        ),
        pytest.param(tiny_config(custom_text=True), id="custom-text"),
        pytest.param(
            tiny_config(text={"proj_bias": True}, custom_text=True), id="custom-text-bias"
        ),
    ],
)
def test_tiny_variants_reproduce_open_clip(config: dict) -> None:
    arguments = dict(config)
    custom = arguments.pop("custom_text", False)
    torch.manual_seed(0)
    model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**arguments)
    wrapped = VisionLanguageModel(model, tokenizer=SimpleTokenizer(context_length=16))
    if config["text_cfg"].get("proj_bias"):
        assert wrapped.text_dim == config["text_cfg"]["width"] + 1
    _check_reproduces_open_clip(wrapped)


def test_tiny_timm_attention_pool() -> None:
    # A timm ViT with SigLIP's "map" pooling at toy size: same code path as SigLIP.
    config = tiny_config(
        vision={
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_pool": "map",
            "timm_proj": "none",
            "image_size": 224,
        },
        text={"width": 32, "proj_bias": True},
        embed_dim=192,
        init_logit_bias=-10.0,
    )
    torch.manual_seed(0)
    arguments = dict(config)
    model = open_clip.CustomTextCLIP(**arguments)
    wrapped = VisionLanguageModel(model, tokenizer=SimpleTokenizer(context_length=16))
    assert wrapped.has_image_offset
    assert wrapped.image_dim == 192 * 4 + 1
    _check_reproduces_open_clip(wrapped)


def test_resnet_tower_rejected() -> None:
    config = tiny_config(vision={"layers": [1, 1, 1, 1], "width": 16, "image_size": 32})
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    with pytest.raises(ModelLoadError) as caught:
        VisionLanguageModel(model)
    assert "ModifiedResNet" in str(caught.value)
    assert "ViT-B-32" in str(caught.value)


def test_attentional_pool_rejected() -> None:
    config = tiny_config(
        vision={"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}
    )
    torch.manual_seed(0)
    with pytest.raises(ModelLoadError, match="attentional pooling"):
        VisionLanguageModel(open_clip.CLIP(**config))


def test_timm_without_attention_pool_rejected() -> None:
    config = tiny_config(
        vision={
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
    )
    torch.manual_seed(0)
    with pytest.raises(ModelLoadError, match="has no latent attention pool"):
        VisionLanguageModel(open_clip.CustomTextCLIP(**config))


def test_pixels_shape_checked(tiny_model: VisionLanguageModel) -> None:
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        tiny_model.image_features(torch.zeros(3, 32, 32))


def test_tokens_dtype_checked(tiny_model: VisionLanguageModel) -> None:
    with pytest.raises(InputError, match="integer tensor"):
        tiny_model.text_features(torch.zeros(2, 16))


def test_empty_batch(tiny_model: VisionLanguageModel) -> None:
    result = tiny_model.image_features(torch.zeros(0, 3, 32, 32))
    assert result.features.shape == (0, tiny_model.image_dim)
    assert tiny_model.text_features(torch.zeros(0, 16, dtype=torch.long)).shape == (
        0,
        tiny_model.text_dim,
    )


def test_model_left_unchanged(tiny_model: VisionLanguageModel) -> None:
    pixels = _pixels(tiny_model)
    tiny_model.image_features(pixels)
    assert not tiny_model.model.visual.ln_post._forward_hooks
    assert not tiny_model.model.visual.ln_post._forward_pre_hooks
    assert not any(p.requires_grad for p in tiny_model.model.parameters())


def test_tokenize_rejects_string(tiny_model: VisionLanguageModel) -> None:
    with pytest.raises(InputError, match="list of texts"):
        tiny_model.tokenize("a photo")


def test_count_tokens(tiny_model: VisionLanguageModel) -> None:
    # start and end tokens plus one token per common word
    assert tiny_model.count_tokens("a photo of a cat") == 7


def test_wrap_seeds_differ() -> None:
    first, second = wrap_tiny(seed=1), wrap_tiny(seed=2)
    assert not torch.equal(first.image_projection, second.image_projection)

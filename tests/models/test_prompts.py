"""Class prompt features: W_txt ψ̄_c is the mean normalised prompt embedding, exactly."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch.testing import assert_close

from annotator.errors import ConfigError, InputError
from annotator.models.prompts import DEFAULT_TEMPLATES, class_text_features, fill_templates
from annotator.models.towers import VisionLanguageModel

from .helpers import tiny_config


def _mean_normalised_embeddings(
    model: VisionLanguageModel, prompts: list[tuple[str, ...]]
) -> torch.Tensor:
    """Reference: CLIP zero-shot class embeddings from open_clip's own encode_text, in float64."""
    rows = []
    for class_prompts in prompts:
        with torch.no_grad():
            embeddings = model.model.encode_text(model.tokenize(list(class_prompts))).double()
        rows.append((embeddings / embeddings.norm(dim=1, keepdim=True)).mean(dim=0))
    return torch.stack(rows)


def test_vit_b32_prompt_average(vit_b32: VisionLanguageModel) -> None:
    names = ["cat", "dog"]
    templates = ["a photo of a {}.", "a drawing of a {}.", "a blurry photo of the {}."]
    features = class_text_features(vit_b32, names, templates=templates)

    assert features.shape == (2, 512)
    assert features.dtype == torch.float32
    expected = _mean_normalised_embeddings(vit_b32, fill_templates(names, templates))
    rebuilt = features.double() @ vit_b32.text_projection.double().T
    assert_close(rebuilt, expected, rtol=1e-4, atol=1e-5)


def test_bias_projection_prompt_average() -> None:
    # With a projection bias the constant 1 is scaled too; the identity must still hold.
    config = tiny_config(text={"proj_bias": True})
    torch.manual_seed(0)
    model = VisionLanguageModel(
        open_clip.CLIP(**config), tokenizer=SimpleTokenizer(context_length=16)
    )
    prompts = [("a photo of a cat.", "a cat."), ("a dog.",)]
    features = class_text_features(model, ["cat", "dog"], prompts)

    expected = _mean_normalised_embeddings(model, prompts)
    assert_close(
        features.double() @ model.text_projection.double().T, expected, rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(features[:, -1], torch.ones(2))


def test_uneven_prompt_counts(tiny_model: VisionLanguageModel) -> None:
    prompts = [("a cat.",), ("a dog.", "a puppy.", "a hound."), ("a bird.", "a sparrow.")]
    features = class_text_features(tiny_model, ["cat", "dog", "bird"], prompts, batch_size=2)
    expected = _mean_normalised_embeddings(tiny_model, prompts)
    assert_close(
        features.double() @ tiny_model.text_projection.double().T, expected, rtol=1e-4, atol=1e-5
    )


def test_default_templates_used(tiny_model: VisionLanguageModel) -> None:
    filled = fill_templates(["cat"])
    assert len(filled[0]) == len(DEFAULT_TEMPLATES)
    assert filled[0][0] == DEFAULT_TEMPLATES[0].replace("{}", "cat")
    default = class_text_features(tiny_model, ["cat"])
    explicit = class_text_features(tiny_model, ["cat"], templates=DEFAULT_TEMPLATES)
    assert torch.equal(default, explicit)


def test_braces_in_class_name(tiny_model: VisionLanguageModel) -> None:
    assert fill_templates(["set {x}"], ["a {} here"]) == [("a set {x} here",)]


def test_truncation_warns_with_class(tiny_model: VisionLanguageModel) -> None:
    long_name = " ".join(["very"] * 30) + " long label"
    with pytest.warns(UserWarning) as record:
        class_text_features(tiny_model, ["cat", long_name], templates=["a photo of a {}."])
    messages = [str(item.message) for item in record]
    assert len(messages) == 1
    assert f"class {long_name!r}" in messages[0]
    assert "context length of 16 tokens" in messages[0]
    expected_tokens = tiny_model.count_tokens(f"a photo of a {long_name}.")
    assert f"has {expected_tokens} tokens" in messages[0]


def test_short_prompts_do_not_warn(
    tiny_model: VisionLanguageModel, recwarn: pytest.WarningsRecorder
) -> None:
    class_text_features(tiny_model, ["cat"], templates=["a photo of a {}."])
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("templates", [[], ["a photo of a cat"], ["{} and {}"]])
def test_invalid_templates(templates: list[str]) -> None:
    with pytest.raises(ConfigError):
        fill_templates(["cat"], templates)


@pytest.mark.parametrize("names", [[], ["cat", "cat"], ["cat", ""]])
def test_invalid_class_names(tiny_model: VisionLanguageModel, names: list[str]) -> None:
    with pytest.raises(InputError):
        class_text_features(tiny_model, names)


def test_prompts_per_class_checked(tiny_model: VisionLanguageModel) -> None:
    with pytest.raises(InputError, match="prompts for 1 classes but 2 class names"):
        class_text_features(tiny_model, ["cat", "dog"], [("a cat",)])
    with pytest.raises(InputError, match="needs at least one non-empty prompt"):
        class_text_features(tiny_model, ["cat"], [()])
    with pytest.raises(ConfigError, match="either prompts or templates"):
        class_text_features(tiny_model, ["cat"], [("a cat",)], templates=["a {}"])


def test_features_independent_of_batching(tiny_model: VisionLanguageModel) -> None:
    names = ["cat", "dog", "bird"]
    whole = class_text_features(tiny_model, names, batch_size=256)
    pieces = class_text_features(tiny_model, names, batch_size=1)
    assert_close(whole, pieces, rtol=1e-5, atol=1e-6)

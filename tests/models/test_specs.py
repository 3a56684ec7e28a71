"""Model specs: parsing, round trips, cache keys and the errors users see."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annotator.errors import ConfigError, ModelLoadError
from annotator.models.specs import (
    ModelKind,
    ModelSpec,
    architecture_family,
    folder_safe,
    supported_architectures,
)

SUPPORTED_PAIRS = [
    (arch, tag) for arch, tag in open_clip.list_pretrained() if arch in supported_architectures()
]


def test_pretrained_spec_fields() -> None:
    spec = ModelSpec.parse("ViT-B-32:laion2b_s34b_b79k")
    assert spec.kind == ModelKind.PRETRAINED
    assert spec.arch == "ViT-B-32"
    assert spec.tag == "laion2b_s34b_b79k"
    assert str(spec) == "ViT-B-32:laion2b_s34b_b79k"


def test_tag_normalised_like_open_clip() -> None:
    spec = ModelSpec.parse("ViT-B-32:LAION2B-S34B-B79K")
    assert spec.tag == "laion2b_s34b_b79k"
    assert spec == ModelSpec.parse("ViT-B-32:laion2b_s34b_b79k")


@pytest.mark.parametrize(("arch", "tag"), SUPPORTED_PAIRS)
def test_every_published_tag_round_trips(arch: str, tag: str) -> None:
    spec = ModelSpec.parse(f"{arch}:{tag}")
    assert ModelSpec.parse(str(spec)) == spec
    assert spec.cache_key == folder_safe(spec.cache_key)


def test_hub_spec_round_trip() -> None:
    spec = ModelSpec.parse("hf-hub:timm/ViT-B-16-SigLIP")
    assert spec.kind == ModelKind.HF_HUB
    assert spec.hub_id == "timm/ViT-B-16-SigLIP"
    assert ModelSpec.parse(str(spec)) == spec
    assert spec.cache_key == "hf-hub--timm--ViT-B-16-SigLIP"


def test_demo_spec_round_trip() -> None:
    spec = ModelSpec.parse("demo")
    assert spec.kind == ModelKind.DEMO
    assert ModelSpec.parse(str(spec)) == spec


def test_checkpoint_spec_round_trip(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    spec = ModelSpec.parse(str(weights), arch="ViT-B-32")
    assert spec.kind == ModelKind.CHECKPOINT
    assert spec.path == weights.resolve()
    assert spec.arch == "ViT-B-32"
    assert ModelSpec.parse(str(spec), arch=spec.arch) == spec


def test_checkpoint_relative_path_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.pt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.parse("model.pt", arch="ViT-B-32")
    assert spec.path == (tmp_path / "model.pt").resolve()


def test_checkpoint_key_follows_content(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"first weights")
    first = ModelSpec.parse(str(weights), arch="ViT-B-32").cache_key
    assert ModelSpec.parse(str(weights), arch="ViT-B-32").cache_key == first
    moved = tmp_path / "copy.pt"
    moved.write_bytes(b"first weights")
    assert ModelSpec.parse(str(moved), arch="ViT-B-32").cache_key == first
    weights.write_bytes(b"other weights, longer")
    assert ModelSpec.parse(str(weights), arch="ViT-B-32").cache_key != first


def test_cache_keys_distinct_per_model() -> None:
    keys = {
        ModelSpec.parse("ViT-B-32:laion2b_s34b_b79k").cache_key,
        ModelSpec.parse("ViT-B-32:openai").cache_key,
        ModelSpec.parse("ViT-B-16:openai").cache_key,
        ModelSpec.parse("hf-hub:timm/ViT-B-16-SigLIP").cache_key,
    }
    assert len(keys) == 4


def test_unknown_architecture_lists_valid() -> None:
    with pytest.raises(ConfigError) as caught:
        ModelSpec.parse("ViT-Q-99:laion2b")
    message = str(caught.value)
    assert "unknown open_clip architecture 'ViT-Q-99'" in message
    assert "ViT-B-32" in message
    assert "ViT-B-16-SigLIP" in message


def test_unsupported_architecture_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        ModelSpec.parse("RN50:openai")
    assert "'RN50' is not supported" in str(caught.value)
    assert "ViT-B-32" in str(caught.value)


def test_unknown_tag_lists_tags() -> None:
    with pytest.raises(ConfigError) as caught:
        ModelSpec.parse("ViT-B-32:laion9b")
    message = str(caught.value)
    assert "unknown pretrained tag 'laion9b' for ViT-B-32" in message
    assert "laion2b_s34b_b79k" in message
    assert "openai" in message


def test_missing_tag_lists_tags() -> None:
    with pytest.raises(ConfigError) as caught:
        ModelSpec.parse("ViT-B-32")
    assert "names no pretrained tag" in str(caught.value)
    assert "laion2b_s34b_b79k" in str(caught.value)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint file .*missing.pt not found"):
        ModelSpec.parse(str(tmp_path / "missing.pt"), arch="ViT-B-32")


def test_checkpoint_without_arch(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    with pytest.raises(ConfigError, match="needs its open_clip architecture: pass --arch"):
        ModelSpec.parse(str(weights))


def test_checkpoint_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        ModelSpec.parse(str(tmp_path), arch="ViT-B-32")


def test_checkpoint_unknown_arch(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    with pytest.raises(ConfigError, match="unknown open_clip architecture 'ViT-Nope'"):
        ModelSpec.parse(str(weights), arch="ViT-Nope")


@pytest.mark.parametrize("text", ["hf-hub:", "hf-hub:no-slash", "hf-hub:a/b/c", "hf-hub:/name"])
def test_invalid_hub_id(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid Hugging Face model id"):
        ModelSpec.parse(text)


@pytest.mark.parametrize("text", ["hf-hub:timm/ViT-B-16-SigLIP", "demo"])
def test_arch_rejected_where_not_needed(text: str) -> None:
    with pytest.raises(ConfigError, match="drop --arch"):
        ModelSpec.parse(text, arch="ViT-B-32")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_spec(text: str) -> None:
    with pytest.raises(ConfigError, match="is empty"):
        ModelSpec.parse(text)


def test_inconsistent_fields_rejected() -> None:
    with pytest.raises(ConfigError, match="needs exactly the fields"):
        ModelSpec(kind=ModelKind.PRETRAINED, arch="ViT-B-32")


def test_demo_key_needs_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANNOTATOR_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="run `annotator demo`"):
        _ = ModelSpec.parse("demo").cache_key


def test_architecture_families() -> None:
    assert architecture_family(open_clip.get_model_config("ViT-B-32")) == "clip-vit"
    assert architecture_family(open_clip.get_model_config("ViT-B-16-SigLIP")) == "siglip"
    assert architecture_family(open_clip.get_model_config("RN50")) is None
    assert architecture_family(open_clip.get_model_config("coca_ViT-B-32")) is None
    assert architecture_family(open_clip.get_model_config("convnext_base")) is None


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_parse_raises_only_config_errors(text: str) -> None:
    try:
        spec = ModelSpec.parse(text)
    except ConfigError:
        return
    assert ModelSpec.parse(str(spec), arch=spec.arch) == spec

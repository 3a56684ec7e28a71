"""Tests of the demo model: its open_clip architecture, training, caching and zero-shot use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from annotator.data.demo_data import DIGIT_NAMES, load_digit_splits, render_digit, write_demo_pool
from annotator.errors import InputError, ModelLoadError
from annotator.models.demo import (
    CONFIG_FILENAME,
    DEMO_CONTEXT_LENGTH,
    DEMO_IMAGE_SIZE,
    DEMO_MODEL_VERSION,
    DEMO_TEMPLATES,
    TRAINING_FILENAME,
    WEIGHTS_FILENAME,
    DemoTrainingResult,
    create_demo_model,
    create_demo_tokenizer,
    demo_model_config,
    demo_model_dir,
    demo_preprocess,
    demo_training_pairs,
    load_demo_model,
    train_demo_model,
    zero_shot_accuracy,
)


@pytest.fixture(scope="session")
def trained(demo_model: Path) -> DemoTrainingResult:
    """The demo model trained once per test session with the default recipe.

    It is the session's shared demo model, so the services tests reuse the same training.
    """
    recorded = json.loads((demo_model / TRAINING_FILENAME).read_text())
    fields = {name: recorded[name] for name in DemoTrainingResult.__dataclass_fields__}
    fields["model_dir"] = Path(fields["model_dir"])
    return DemoTrainingResult(**fields)


def _heldout_images(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    splits = load_digit_splits(seed)
    preprocess = demo_preprocess()
    images = torch.stack([preprocess(render_digit(image)) for image in splits.heldout_images])
    return images, splits.heldout_labels


def test_config_builds_vit_clip() -> None:
    torch.manual_seed(0)
    model = create_demo_model()
    config = demo_model_config()

    assert isinstance(model, open_clip.CLIP)
    assert isinstance(model.visual, open_clip.transformer.VisionTransformer)
    assert model.visual.proj.shape == (config["vision_cfg"]["width"], config["embed_dim"])
    assert model.text_projection.shape == (config["text_cfg"]["width"], config["embed_dim"])
    assert model.token_embedding.num_embeddings == 49408
    assert model.context_length == DEMO_CONTEXT_LENGTH


def test_config_is_a_fresh_copy() -> None:
    config = demo_model_config()
    config["vision_cfg"]["width"] = 1

    assert demo_model_config()["vision_cfg"]["width"] != 1


def test_untrained_model_encodes_shapes() -> None:
    torch.manual_seed(0)
    model = create_demo_model().eval()
    images = torch.randn(3, 3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    tokens = create_demo_tokenizer()(["a handwritten seven.", "the number one."])

    with torch.no_grad():
        image_embeddings = model.encode_image(images)
        text_embeddings = model.encode_text(tokens)

    embed_dim = demo_model_config()["embed_dim"]
    assert image_embeddings.shape == (3, embed_dim)
    assert text_embeddings.shape == (2, embed_dim)


def test_captions_fit_context_length() -> None:
    tokenizer = create_demo_tokenizer()
    captions = [template.format(name) for template in DEMO_TEMPLATES for name in DIGIT_NAMES]
    tokens = tokenizer(captions)

    end_token = tokenizer.eot_token_id
    lengths = (tokens != 0).sum(dim=1)
    assert lengths.max() < DEMO_CONTEXT_LENGTH
    # Each caption ends with the end-of-text token, so none was truncated.
    assert torch.all(tokens[torch.arange(len(captions)), lengths - 1] == end_token)


def test_preprocess_handles_pool_png(tmp_path: Path) -> None:
    pool = write_demo_pool(tmp_path, seed=0, variants_per_digit=2)
    path = sorted(pool.pool_dir.iterdir())[0]

    with Image.open(path) as image:
        assert image.mode == "L"
        tensor = demo_preprocess()(image)

    assert tensor.shape == (3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    # Greyscale becomes RGB with three equal channels before per-channel normalisation.
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    unnormalised = tensor * std + mean
    torch.testing.assert_close(unnormalised[0], unnormalised[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(unnormalised[0], unnormalised[2], atol=1e-5, rtol=0)


def test_training_pairs_use_training_digits() -> None:
    images, captions = demo_training_pairs(seed=0)
    splits = load_digit_splits(0)

    assert images.shape == (len(splits.train_labels), 3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    assert len(captions) == len(splits.train_labels)
    for caption, label in zip(captions, splits.train_labels, strict=True):
        named = [name for name in DIGIT_NAMES if f" {name}" in caption]
        assert named == [DIGIT_NAMES[label]], caption
    assert len(set(captions)) == len(DEMO_TEMPLATES) * len(DIGIT_NAMES)

    # The first image is the first training digit, preprocessed as at inference.
    expected = demo_preprocess()(render_digit(splits.train_images[0]))
    torch.testing.assert_close(images[0], expected, atol=0, rtol=0)


def test_training_pairs_deterministic() -> None:
    first_images, first_captions = demo_training_pairs(seed=1)
    second_images, second_captions = demo_training_pairs(seed=1)

    assert torch.equal(first_images, second_images)
    assert first_captions == second_captions


def test_zero_shot_matches_reference_loop() -> None:
    torch.manual_seed(0)
    model = create_demo_model().eval()
    images, labels = _heldout_images()
    images, labels = images[:24], labels[:24]
    tokenizer = create_demo_tokenizer()

    correct = 0
    with torch.no_grad():
        class_embeddings = []
        for name in DIGIT_NAMES:
            prompts = []
            for template in DEMO_TEMPLATES:
                embedding = model.encode_text(tokenizer([template.format(name)]))[0]
                prompts.append(embedding / embedding.norm())
            mean = torch.stack(prompts).mean(dim=0)
            class_embeddings.append(mean / mean.norm())
        for image, label in zip(images, labels, strict=True):
            embedding = F.normalize(model.encode_image(image[None])[0], dim=0)
            scores = torch.stack([embedding @ text for text in class_embeddings])
            correct += int(scores.argmax()) == int(label)

    assert zero_shot_accuracy(model, images, labels, batch_size=7) == pytest.approx(correct / 24)


def test_zero_shot_rejects_mismatched_inputs() -> None:
    torch.manual_seed(0)
    model = create_demo_model()
    images = torch.zeros(4, 3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)

    with pytest.raises(InputError, match="shape"):
        zero_shot_accuracy(model, images, [0, 1, 2])
    with pytest.raises(InputError, match="Labels"):
        zero_shot_accuracy(model, images, [0, 1, 2, 10])
    with pytest.raises(InputError, match="template"):
        zero_shot_accuracy(model, images, [0, 1, 2, 3], templates=["a digit"])
    with pytest.raises(InputError, match="zero images"):
        zero_shot_accuracy(model, images[:0], [])


def test_zero_shot_keeps_training_mode() -> None:
    torch.manual_seed(0)
    model = create_demo_model().train()
    images, labels = _heldout_images()

    zero_shot_accuracy(model, images[:4], labels[:4])

    assert model.training


def test_model_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANNOTATOR_CACHE_DIR", str(tmp_path))
    assert demo_model_dir() == tmp_path / "demo-model" / DEMO_MODEL_VERSION

    monkeypatch.delenv("ANNOTATOR_CACHE_DIR")
    expected = Path.home() / ".cache" / "annotator" / "demo-model" / DEMO_MODEL_VERSION
    assert demo_model_dir() == expected
    assert (
        demo_model_dir(tmp_path / "other") == tmp_path / "other" / "demo-model" / DEMO_MODEL_VERSION
    )


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("seed", -1),
        ("epochs", 0),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("learning_rate", "fast"),
        ("cpu_threads", 0),
    ],
)
def test_training_rejects_invalid_argument(tmp_path: Path, argument: str, value: object) -> None:
    with pytest.raises(InputError, match=argument):
        train_demo_model(tmp_path, progress=False, **{argument: value})  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_short_training_bit_identical(tmp_path: Path) -> None:
    # Three steps of 300 pairs, twice with one seed and once with another.
    runs = {}
    for name, seed in (("first", 0), ("second", 0), ("other", 1)):
        result = train_demo_model(
            tmp_path / name, seed=seed, epochs=1, batch_size=300, progress=False
        )
        assert result.steps == 3
        runs[name] = torch.load(tmp_path / name / WEIGHTS_FILENAME, weights_only=True)

    assert runs["first"].keys() == runs["second"].keys()
    for key, value in runs["first"].items():
        assert torch.equal(value, runs["second"][key]), key
    assert not torch.equal(runs["first"]["visual.proj"], runs["other"]["visual.proj"])


def test_training_restores_global_state(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()

    train_demo_model(tmp_path, seed=0, epochs=1, batch_size=450, progress=False)

    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_trained_model_clean_accuracy(trained: DemoTrainingResult) -> None:
    model = load_demo_model(trained.model_dir)
    images, labels = _heldout_images()

    accuracy = zero_shot_accuracy(model, images, labels)

    assert accuracy >= 0.75
    assert accuracy == pytest.approx(trained.heldout_accuracy)


@pytest.mark.slow
def test_trained_model_worse_on_pool(trained: DemoTrainingResult) -> None:
    assert trained.pool_accuracy < trained.heldout_accuracy - 0.2
    # Far above the 0.1 of guessing, so the pool digits are still recognisable.
    assert trained.pool_accuracy > 0.3


@pytest.mark.slow
def test_pool_png_accuracy_matches_record(trained: DemoTrainingResult, tmp_path: Path) -> None:
    pool = write_demo_pool(tmp_path, seed=0)
    preprocess = demo_preprocess()
    images, labels = [], []
    for line in pool.ground_truth_csv.read_text(encoding="utf-8").splitlines()[1:]:
        path, label = line.split(",")
        with Image.open(pool.ground_truth_csv.parent / path) as image:
            images.append(preprocess(image))
        labels.append(DIGIT_NAMES.index(label))

    accuracy = zero_shot_accuracy(load_demo_model(trained.model_dir), torch.stack(images), labels)

    assert accuracy == pytest.approx(trained.pool_accuracy)


@pytest.mark.slow
def test_trained_model_files(trained: DemoTrainingResult) -> None:
    model_dir = trained.model_dir
    record = json.loads((model_dir / TRAINING_FILENAME).read_text(encoding="utf-8"))

    # ensure_demo_model writes the KFAC factors into hessians/ the first time a project needs them.
    names = {path.name for path in model_dir.iterdir()}
    assert names - {"hessians"} == {WEIGHTS_FILENAME, CONFIG_FILENAME, TRAINING_FILENAME}
    assert (
        json.loads((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8")) == demo_model_config()
    )
    assert record["seed"] == 0
    assert record["parameters"] == trained.parameters
    assert record["heldout_accuracy"] == trained.heldout_accuracy
    assert record["pool_accuracy"] == trained.pool_accuracy
    assert record["version"] == DEMO_MODEL_VERSION
    assert trained.parameters == sum(p.numel() for p in create_demo_model().parameters())


def test_load_rejects_incomplete_dir(tmp_path: Path) -> None:
    torch.save(create_demo_model().state_dict(), tmp_path / WEIGHTS_FILENAME)

    with pytest.raises(ModelLoadError, match="training.json"):
        load_demo_model(tmp_path)


def test_load_rejects_other_config(tmp_path: Path) -> None:
    train_demo_model(tmp_path, seed=0, epochs=1, batch_size=450, progress=False)
    config = demo_model_config()
    config["embed_dim"] = 32
    (tmp_path / CONFIG_FILENAME).write_text(json.dumps(config), encoding="utf-8")

    with pytest.raises(ModelLoadError, match="another config"):
        load_demo_model(tmp_path)


def test_load_rejects_damaged_weights(tmp_path: Path) -> None:
    train_demo_model(tmp_path, seed=0, epochs=1, batch_size=450, progress=False)
    (tmp_path / WEIGHTS_FILENAME).write_bytes(b"not a checkpoint")

    with pytest.raises(ModelLoadError, match="weights"):
        load_demo_model(tmp_path)

"""The demo model: a small open_clip CLIP that the project trains itself on the demo digits.

The demo must run offline, so it cannot download pretrained weights. Instead it trains a
small CLIP (a ViT image tower and open_clip's text transformer with its standard BPE
tokenizer) on the training part of scikit-learn's digits (see
:mod:`annotator.data.demo_data`), with one templated caption per image such as
"a photo of the digit seven.". Training is deterministic for a seed and takes about a minute
of one CPU core. The trained weights are cached on disk, never committed.

The model is an ordinary open_clip ``CLIP`` with a ViT image tower, the architecture of the
published ViT CLIP models, built from a config dict instead of a named config.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from PIL import Image
from tqdm.auto import tqdm

from annotator.data.demo_data import (
    DEFAULT_IMAGE_SIZE,
    DIGIT_NAMES,
    load_digit_splits,
    render_deployment_pool,
    render_digit,
)
from annotator.errors import InputError, ModelLoadError
from annotator.files import write_atomic

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "annotator-demo"
DEMO_MODEL_VERSION = "v2"
"""Version of the demo model's architecture, data and training recipe. Change it whenever
any of them changes, so that a cache trained by an older recipe is not reused."""

DEMO_TEMPLATES: tuple[str, ...] = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a drawing of the digit {}.",
    "a scan of a handwritten {}.",
    "the digit {}, written by hand.",
    "a black and white image of the number {}.",
    "a small picture of a {}.",
)
"""Caption templates for training and prompt templates for zero-shot classification; ``{}``
is a name from ``DIGIT_NAMES``."""

DEMO_IMAGE_SIZE = 32
"""Side in pixels of the images that enter the demo model's ViT, after preprocessing."""
DEMO_CONTEXT_LENGTH = 16
"""Text tokens per caption, start and end tokens included. The maximum length of a caption
built from ``DEMO_TEMPLATES`` and ``DIGIT_NAMES`` is 12 tokens."""

WEIGHTS_FILENAME = "weights.pt"
CONFIG_FILENAME = "config.json"
TRAINING_FILENAME = "training.json"

_DEMO_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": DEMO_IMAGE_SIZE,
        "patch_size": 8,
        "width": 64,
        "layers": 3,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": DEMO_CONTEXT_LENGTH,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
}


@dataclass(frozen=True)
class DemoTrainingResult:
    """Files and measurements of one training run of the demo model.

    ``seconds`` is wall-clock time and ``cpu_seconds`` the process CPU time of the training
    loop, both without the accuracy evaluation.
    """

    model_dir: Path
    seed: int
    epochs: int
    steps: int
    seconds: float
    cpu_seconds: float
    parameters: int
    device: str
    cpu_threads: int
    heldout_accuracy: float
    """Zero-shot accuracy on the clean held-out digits."""
    pool_accuracy: float
    """Zero-shot accuracy on the shifted deployment pool rendered with the same seed."""


def demo_model_config() -> dict[str, Any]:
    """Return the open_clip model config of the demo model.

    Returns
    -------
    dict
        ``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}`` in the format of
        open_clip's ``model_configs/*.json``, so ``open_clip.CLIP(**config)`` builds the model.
        The dict is a fresh copy that the caller may change.
    """
    return copy.deepcopy(_DEMO_MODEL_CONFIG)


def create_demo_model() -> open_clip.CLIP:
    """Build the untrained demo model from :func:`demo_model_config`.

    The weights come from torch's global random generator; seed it first for a reproducible
    initialisation.
    """
    return open_clip.CLIP(**demo_model_config())


def create_demo_tokenizer() -> SimpleTokenizer:
    """Return open_clip's standard BPE tokenizer with the demo model's context length."""
    return SimpleTokenizer(context_length=DEMO_CONTEXT_LENGTH)


def demo_preprocess() -> Callable[[Image.Image], torch.Tensor]:
    """Return the demo model's image preprocessing for evaluation and inference.

    It is open_clip's ``image_transform`` for a ``DEMO_IMAGE_SIZE`` image: bicubic resize,
    centre crop, conversion to RGB (so greyscale pool PNGs work), and normalisation with the
    OpenAI CLIP mean and standard deviation. It maps a PIL image to a ``float32`` tensor of
    shape ``(3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)``.
    """
    return image_transform(DEMO_IMAGE_SIZE, is_train=False)


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Return the folder of the cached demo model for the current ``DEMO_MODEL_VERSION``.

    Parameters
    ----------
    cache_dir
        Root of annotator's cache. When None, ``$ANNOTATOR_CACHE_DIR`` if set, else
        ``~/.cache/annotator``.

    Returns
    -------
    Path
        ``cache_dir/demo-model/DEMO_MODEL_VERSION``. It may not exist yet.
    """
    if cache_dir is None:
        from_environment = os.environ.get("ANNOTATOR_CACHE_DIR")
        cache_dir = (
            Path(from_environment) if from_environment else Path.home() / ".cache" / "annotator"
        )
    return Path(cache_dir).expanduser() / "demo-model" / DEMO_MODEL_VERSION


def demo_training_pairs(seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Return the training images of the demo model, preprocessed, with one caption each.

    Image ``i`` gets the template ``DEMO_TEMPLATES[k_i]`` with ``k_i`` drawn uniformly for the
    seed. Training pairs image ``i`` in epoch ``e`` with template ``(k_i + e) mod T``, so these
    are exactly the pairs of the first epoch, and later epochs show every template in turn.
    Augmentation (small random shifts and rescaling) happens during training only.

    Parameters
    ----------
    seed
        Seed of the digit split and of the caption draw.

    Returns
    -------
    images
        ``float32`` tensor of shape ``(N, 3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)`` on the CPU.
    captions
        ``N`` captions, ``captions[i]`` describing ``images[i]``.
    """
    splits = load_digit_splits(seed)
    images = _preprocess_digits(splits.train_images)
    template_indices = _first_template_indices(len(splits.train_labels), seed)
    captions = [
        DEMO_TEMPLATES[template].format(DIGIT_NAMES[label])
        for template, label in zip(template_indices, splits.train_labels, strict=True)
    ]
    return images, captions


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    templates: Sequence[str] = DEMO_TEMPLATES,
    *,
    batch_size: int = 256,
) -> float:
    """Measure the zero-shot accuracy of a CLIP model on the digits.

    Each class embedding is the normalised mean of the normalised text embeddings of its
    prompts, ``t_c = normalize(mean_k normalize(h(template_k(name_c))))``, and an image is
    assigned to ``argmax_c g·t_c`` with ``g`` its normalised image embedding.

    Parameters
    ----------
    model
        An open_clip ``CLIP`` with the demo model's tokenizer and context length.
    images
        Preprocessed images, ``(N, 3, H, W)``; moved to the model's device in batches.
    labels
        ``(N,)`` integer labels indexing ``DIGIT_NAMES``.
    templates
        Prompt templates with ``{}`` for the digit name.
    batch_size
        Images per forward pass.

    Returns
    -------
    float
        Fraction of images whose predicted class equals the label.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise InputError(
            f"Expected images of shape (N, 3, H, W) and labels of shape (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}."
        )
    if images.shape[0] == 0:
        raise InputError("Cannot measure accuracy on zero images; pass at least one.")
    if len(templates) == 0 or any("{}" not in template for template in templates):
        raise InputError(
            f"Every template needs a '{{}}' for the class name, got {list(templates)!r}."
        )
    if labels.min() < 0 or labels.max() >= len(DIGIT_NAMES):
        raise InputError(
            f"Labels must index DIGIT_NAMES (0 to {len(DIGIT_NAMES) - 1}), got values from "
            f"{int(labels.min())} to {int(labels.max())}."
        )

    was_training = model.training
    model.eval()
    try:
        class_embeddings = _class_embeddings(model, templates)  # (C, D)
        predictions = []
        device = class_embeddings.device
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            image_embeddings = model.encode_image(batch, normalize=True)  # (B, D)
            predictions.append((image_embeddings @ class_embeddings.T).argmax(dim=1).cpu())
    finally:
        model.train(was_training)

    return float((torch.cat(predictions) == labels).double().mean())


def train_demo_model(
    out_dir: Path | None = None,
    *,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    device: str | torch.device | None = None,
    cpu_threads: int | None = 1,
    progress: bool = True,
) -> DemoTrainingResult:
    """Train the demo model on the training digits and write it to ``out_dir``.

    The loss is CLIP's symmetric contrastive loss over the image–caption pairs of a batch,
    except that every caption of the image's class counts as a positive: with ``S`` the scaled
    cosine similarities ``s ĝ_i·ĥ_j`` and ``M_ij = 1[y_i = y_j] / Σ_j' 1[y_i = y_j']``,
    ``loss = ½ (CE(S, M) + CE(Sᵀ, M))``. A batch of 128 digits from 10 classes has many
    captions of the same class, and plain InfoNCE would push those apart.

    Images get small random shifts (up to 2 pixels of 32) and rescaling (±8%), never the
    deployment shift of the pool. Training is deterministic for a seed on one machine and
    device: the initialisation, batch order, captions and augmentation all come from seeded
    generators, and it runs under ``torch.use_deterministic_algorithms(True)``.

    Files are written atomically: ``weights.pt`` (the state dict), ``config.json``
    (:func:`demo_model_config`) and, last, ``training.json`` (this result), so a folder with
    ``training.json`` always contains a complete model.

    Parameters
    ----------
    out_dir
        Folder for the model files; :func:`demo_model_dir` when None.
    seed
        Seed of the digit split, the initialisation and all training randomness.
    epochs
        Passes over the 898 training digits.
    batch_size
        Image–caption pairs per step.
    learning_rate
        Peak AdamW learning rate, reached after a linear warm-up and then cosine-decayed.
    device
        Where to train; CUDA when available and None is given, else the CPU.
        NOTE: only CPU training has been run; the CUDA path is untested.
    cpu_threads
        torch's intra-op CPU threads during training and evaluation, restored afterwards;
        None keeps the current setting. With one thread the weights do not depend on the
        machine's core count, because parallel reductions sum in an order that depends on
        the thread count. On a busy 2-core machine one thread also trained several times
        faster than two.
    progress
        Whether to show a progress bar.

    Returns
    -------
    DemoTrainingResult
        The paths, timing and zero-shot accuracies of the run.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"Invalid seed {seed!r}: expected a non-negative integer.")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"Invalid {name} {value!r}: expected a positive integer.")
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, int | float)
        or not learning_rate > 0
    ):
        raise InputError(f"Invalid learning_rate {learning_rate!r}: expected a positive number.")
    if cpu_threads is not None and (
        isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1
    ):
        raise InputError(
            f"Invalid cpu_threads {cpu_threads!r}: expected a positive integer, or None to keep "
            "torch's current setting."
        )
    model_dir = Path(out_dir) if out_dir is not None else demo_model_dir()
    device = _resolve_device(device)

    splits = load_digit_splits(seed)
    train_images, _ = demo_training_pairs(seed)

    logger.info(
        "Training the demo model on %d digits (seed %d, %d epochs, device %s)",
        len(splits.train_labels),
        seed,
        epochs,
        device,
    )
    with _cpu_threads(cpu_threads):
        threads_used = torch.get_num_threads()
        with _seeded_deterministic(seed, device):
            model, steps, seconds, cpu_seconds = _train(
                train_images,
                torch.as_tensor(splits.train_labels),
                seed=seed,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                device=device,
                progress=progress,
            )

        heldout_images, heldout_labels, pool_images, pool_labels = _evaluation_images(seed)
        heldout_accuracy = zero_shot_accuracy(model, heldout_images, heldout_labels)
        pool_accuracy = zero_shot_accuracy(model, pool_images, pool_labels)

    result = DemoTrainingResult(
        model_dir=model_dir,
        seed=seed,
        epochs=epochs,
        steps=steps,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        device=str(device),
        cpu_threads=threads_used,
        heldout_accuracy=heldout_accuracy,
        pool_accuracy=pool_accuracy,
    )
    _write_model_files(model, result)
    logger.info(
        "Trained the demo model in %.1f s (%.1f CPU s): zero-shot accuracy %.3f on clean "
        "held-out digits, %.3f on the pool; written to %s",
        seconds,
        cpu_seconds,
        heldout_accuracy,
        pool_accuracy,
        model_dir,
    )
    return result


def load_demo_model(
    model_dir: Path | None = None, *, device: str | torch.device = "cpu"
) -> open_clip.CLIP:
    """Load a trained demo model in evaluation mode.

    Parameters
    ----------
    model_dir
        Folder written by :func:`train_demo_model`; :func:`demo_model_dir` when None.
    device
        Where to put the weights.

    Raises
    ------
    ModelLoadError
        If the folder contains no complete model, or one built from another config.
    """
    model_dir = Path(model_dir) if model_dir is not None else demo_model_dir()
    if not (model_dir / TRAINING_FILENAME).is_file():
        raise ModelLoadError(
            f"No trained demo model in {model_dir} ({TRAINING_FILENAME} is missing). "
            "Train it with train_demo_model or `annotator demo`."
        )
    try:
        config = json.loads((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(
            f"Failed to read the demo model's config {model_dir / CONFIG_FILENAME}: {error}. "
            "Delete the folder and train the model again."
        ) from error
    if config != demo_model_config():
        raise ModelLoadError(
            f"The demo model in {model_dir} was built from another config than this version "
            f"of annotator uses ({config!r}). Delete the folder and train it again."
        )

    model = create_demo_model()
    weights = model_dir / WEIGHTS_FILENAME
    try:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        raise ModelLoadError(
            f"Failed to load the demo model's weights {weights}: {error}. "
            "Delete the folder and train the model again."
        ) from error
    return model.to(device).eval()


def _train(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    progress: bool,
) -> tuple[open_clip.CLIP, int, float, float]:
    """Run the training loop; return the model, the step count, wall and CPU seconds."""
    wall_start = time.perf_counter()
    cpu_start = time.process_time()

    model = create_demo_model().to(device)
    model.train()
    tokenizer = create_demo_tokenizer()

    # Captions are a template applied to a class name, so each step encodes every distinct
    # caption once, (T * C, L) tokens, and gathers the rows that the batch uses.
    num_templates = len(DEMO_TEMPLATES)
    num_classes = len(DIGIT_NAMES)
    caption_tokens = tokenizer(
        [template.format(name) for template in DEMO_TEMPLATES for name in DIGIT_NAMES]
    ).to(device)  # (T * C, L), row t * C + c

    first_templates = torch.as_tensor(_first_template_indices(len(labels), seed))
    images = images.to(device)
    labels = labels.to(device)
    first_templates = first_templates.to(device)

    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        no_weight_decay = parameter.ndim < 2 or "embedding" in name or name == "logit_scale"
        (no_decay if no_weight_decay else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, warmup_steps, total_steps)
    )
    generator = torch.Generator(device="cpu").manual_seed(seed)

    step = 0
    with tqdm(total=total_steps, desc="training the demo model", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(labels), generator=generator).to(device)
            # Near-equal batches: a short last batch (2 of 898 digits at batch 128) makes the
            # contrastive loss almost trivial and its step noisy.
            for batch in order.tensor_split(steps_per_epoch):
                batch_labels = labels[batch]
                batch_images = _augment(images[batch], generator)
                templates = (first_templates[batch] + epoch) % num_templates
                loss = _multi_positive_clip_loss(
                    model,
                    batch_images,
                    caption_tokens,
                    templates * num_classes + batch_labels,
                    batch_labels,
                )

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0.0, math.log(100.0))

                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    return model, step, time.perf_counter() - wall_start, time.process_time() - cpu_start


def _multi_positive_clip_loss(
    model: open_clip.CLIP,
    images: torch.Tensor,
    caption_tokens: torch.Tensor,
    caption_rows: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Symmetric contrastive loss where all pairs of the same class are positives.

    ``images`` is ``(B, 3, H, W)``, ``caption_tokens`` the ``(K, L)`` distinct captions,
    ``caption_rows`` the ``(B,)`` row of each image's caption and ``labels`` its ``(B,)`` class.
    """
    image_embeddings = model.encode_image(images, normalize=True)  # (B, D)
    distinct_text_embeddings = model.encode_text(caption_tokens, normalize=True)  # (K, D)
    text_embeddings = distinct_text_embeddings[caption_rows]  # (B, D)

    logits = model.logit_scale.exp() * image_embeddings @ text_embeddings.T  # (B, B)
    same_class = (labels[:, None] == labels[None, :]).to(logits.dtype)  # (B, B), symmetric
    targets = same_class / same_class.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift images by up to 2 pixels of 32 and rescale them by up to ±8%, one draw per image.

    The edge pixels (paper) fill the area that a shift uncovers.
    """
    batch = images.shape[0]
    scale = 1.0 + 0.08 * (2.0 * torch.rand(batch, generator=generator) - 1.0)  # (B,)
    shift = (2.0 / 16.0) * (2.0 * torch.rand(batch, 2, generator=generator) - 1.0)  # (B, 2)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = 1.0 / scale
    theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _class_embeddings(model: open_clip.CLIP, templates: Sequence[str]) -> torch.Tensor:
    """Return the ``(C, D)`` normalised mean prompt embedding of each digit class."""
    tokenizer = create_demo_tokenizer()
    device = model.logit_scale.device
    rows = []
    for name in DIGIT_NAMES:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)  # (T, L)
        prompt_embeddings = model.encode_text(tokens, normalize=True)  # (T, D)
        rows.append(F.normalize(prompt_embeddings.mean(dim=0), dim=0))
    return torch.stack(rows)


@functools.lru_cache(maxsize=2)
def _evaluation_images(seed: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """Return the preprocessed clean held-out digits and shifted pool images, with labels.

    Rendering the pool takes seconds, so the result is cached per seed for repeated training
    runs in one process. Callers must not modify the returned arrays.
    """
    splits = load_digit_splits(seed)
    _, pool_images, pool_labels = render_deployment_pool(splits, seed=seed)
    return (
        _preprocess_digits(splits.heldout_images),
        splits.heldout_labels,
        _preprocess_pil(pool_images),
        pool_labels,
    )


def _first_template_indices(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, count]).integers(0, len(DEMO_TEMPLATES), size=count)


def _preprocess_digits(images_8x8: np.ndarray) -> torch.Tensor:
    """Render 8×8 digits at the pool's size and preprocess them: ``(N, 3, S, S)`` float32."""
    return _preprocess_pil([render_digit(image, DEFAULT_IMAGE_SIZE) for image in images_8x8])


def _preprocess_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    preprocess = demo_preprocess()
    return torch.stack([preprocess(image) for image in images])


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _cpu_threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _seeded_deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators and enable deterministic algorithms, then restore both.

    cuBLAS is deterministic only with a fixed workspace size. It reads that size from
    ``CUBLAS_WORKSPACE_CONFIG`` when CUDA starts, so the variable is set here if it is unset.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        # Filling every new tensor with NaN cost about a fifth of the CPU time in a profile.
        # Repeat runs in the tests give bit-identical weights without it, which they would be
        # unlikely to do if training read uninitialised memory.
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            yield
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = was_filling
            torch.use_deterministic_algorithms(was_deterministic)


def _write_model_files(model: open_clip.CLIP, result: DemoTrainingResult) -> None:
    """Write weights, config and, last, the training record, each through a rename."""
    model_dir = result.model_dir
    model_dir.mkdir(parents=True, exist_ok=True)

    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    write_atomic(model_dir / WEIGHTS_FILENAME, lambda file: torch.save(state_dict, file))

    config = json.dumps(demo_model_config(), indent=2, sort_keys=True) + "\n"
    write_atomic(model_dir / CONFIG_FILENAME, lambda file: file.write(config.encode("utf-8")))

    record = asdict(result)
    record["model_dir"] = str(model_dir)
    record["model_name"] = DEMO_MODEL_NAME
    record["version"] = DEMO_MODEL_VERSION
    training = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_atomic(model_dir / TRAINING_FILENAME, lambda file: file.write(training.encode("utf-8")))

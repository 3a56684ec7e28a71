"""Project configuration: the YAML file ``annotator.yaml`` at the root of a project folder.

The file is validated with pydantic when a project is created or opened. Paths in it are
relative to the project folder unless absolute. Example (the demo writes a complete one)::

    name: digits
    images: pool
    model:
      spec: ViT-B-32:laion2b_s34b_b79k
    posterior:
      factors: /data/hessians/CLIP-ViT-B-32-laion2B-s34B-b79K
    classes:
      - name: cat
      - name: dog
        prompts: ["a photo of a dog", "a photo of a puppy"]
    evaluation:
      size: 200
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from annotator.errors import ConfigError
from annotator.files import write_atomic

CONFIG_FILENAME = "annotator.yaml"

StrategyName = Literal[
    "bald", "epig", "power-bald", "entropy", "predictive-entropy", "margin", "variance", "random"
]
"""Acquisition strategies, as named on the command line and in configs."""

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a photo of the {}.",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Vision–language model that encodes the images, and the device it runs on."""

    spec: str = "demo"
    """``ARCH:TAG`` (open_clip pretrained tag), ``hf-hub:ORG/NAME``, a checkpoint path, or ``demo``."""
    arch: str | None = None
    """open_clip architecture of a checkpoint file given as ``spec``."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Weights' precision: ``auto`` is bf16 or fp16 on CUDA and fp32 on the CPU."""
    device: str = "auto"
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """Images per forward pass during feature extraction."""
    num_workers: Annotated[int, Field(ge=0)] | None = None
    """Image-decoding worker processes; None picks from the CPU count."""


class PosteriorConfig(_Section):
    """Source of the projections' Laplace posterior, and settings of the head refit."""

    factors: str = "estimate"
    """A folder of factors in the BayesVLM format, ``estimate`` (from the unlabelled pool with the
    class prompts), or ``demo`` (the factors saved beside the demo model)."""
    n_img: Annotated[float, Field(gt=0)] | None = None
    """Override of the effective number of data points of the image projection's factors."""
    lambda_img: Annotated[float, Field(gt=0)] | None = None
    """Override of the prior precision of the image projection."""
    n_txt: Annotated[float, Field(gt=0)] | None = None
    """Override of the effective number of data points of the text projection's factors."""
    lambda_txt: Annotated[float, Field(gt=0)] | None = None
    """Override of the prior precision of the text projection."""
    optimize_prior: bool = False
    """Re-optimise the prior precision by the Laplace evidence after loading the factors."""
    head_posterior: Literal["auto", "dense", "kfac"] = "auto"
    """Covariance of the refit head: dense, Kronecker-factored (KFAC), or chosen by size."""
    head_prior_scale: Annotated[float, Field(gt=0)] | Literal["evidence"] = "evidence"
    """Multiplier of the head's prior precision (1 keeps the prior the factors induce), or
    ``evidence`` to choose it after every batch by the Laplace evidence of the labels."""


class ClassConfig(_Section):
    """One class: its name and, optionally, its own text prompts."""

    name: Annotated[str, Field(min_length=1)]
    prompts: tuple[str, ...] | None = None
    """Text prompts for zero-shot classification; None fills the project templates with the name."""

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        stripped = value.strip()
        if not stripped:
            raise ValueError("a class name must not be blank")
        return stripped


class EvaluationConfig(_Section):
    """The evaluation split: images reserved for measuring accuracy, never acquired or trained on."""

    size: Annotated[float, Field(ge=0)] = 0.1
    """A count (1 or more) or a fraction of the pool (below 1)."""
    labels: str | None = None
    """A labelled set to import for evaluation: a CSV of ``path,label`` or a folder of class folders."""
    per_batch: Annotated[int, Field(ge=0)] = 4
    """Evaluation tasks mixed into each annotator batch until the evaluation split is labelled."""


class AcquisitionConfig(_Section):
    """Settings of the acquisition of the next batch."""

    # BALD with correlated samples needed the fewest labels of the BayesVLM strategies on the
    # demo (docs/benchmarks.md); power-BALD did no better than random there.
    strategy: StrategyName = "bald"
    batch_size: Annotated[int, Field(ge=1)] = 20
    """Images per annotator batch, evaluation tasks included."""
    beta: Annotated[float, Field(gt=0)] = 1.0
    """Exponent of stochastic power acquisition: probability of a pick ∝ score^beta."""
    num_samples: Annotated[int, Field(ge=2)] = 64
    """Monte Carlo samples for BALD and EPIG."""
    sampling: Literal["auto", "independent", "embedding", "weights"] = "auto"
    """Method that BALD uses to draw logits: each class from its marginal (``independent``),
    from image-embedding draws (``embedding``, zero-shot only) or from whole weight draws
    (``weights``), which keep the correlation between classes. ``auto`` keeps the correlation
    up to 64 classes (embedding draws at zero-shot, weight draws for the refit head) and
    samples independently above, where correlated draws cost too much per image."""
    epig_targets: Annotated[int, Field(ge=1)] = 256
    """Pool images sampled as EPIG's target set."""
    batch_timeout_minutes: Annotated[float, Field(gt=0)] = 120
    """Open batches older than this are released back to the pool."""


class BudgetConfig(_Section):
    """Planned label budget, target accuracy and the threshold of the stopping hint."""

    planned_labels: Annotated[int, Field(ge=1)] | None = None
    target_accuracy: Annotated[float, Field(gt=0, lt=1)] | None = None
    stop_threshold: Annotated[float, Field(ge=0)] = 0.005
    """Suggest stopping when the forecast accuracy gain of the next batch is below this."""


class ProjectConfig(_Section):
    """The whole ``annotator.yaml``."""

    name: Annotated[str, Field(min_length=1)]
    images: str = "images"
    """Folder of images to label, searched recursively."""
    database: str | None = None
    """SQLAlchemy URL; None keeps a SQLite file ``project.db`` in the project folder."""
    oracle: str | None = None
    """A CSV of ``path,label`` with ground truth, used only by ``annotator simulate`` and the demo."""
    classes: tuple[ClassConfig, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """Prompt templates with ``{}`` for the class name, averaged per class."""
    model: ModelConfig = ModelConfig()
    posterior: PosteriorConfig = PosteriorConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    acquisition: AcquisitionConfig = AcquisitionConfig()
    budget: BudgetConfig = BudgetConfig()
    seed: int = 0

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one template is required")
        for template in value:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' for the class name")
        return value

    @model_validator(mode="after")
    def _check_classes(self) -> ProjectConfig:
        if len(self.classes) < 2:
            raise ValueError(f"at least two classes are required, got {len(self.classes)}")
        # Names that differ only in case would read as one class to annotators.
        folded = [c.name.casefold() for c in self.classes]
        duplicates = sorted({c.name for c in self.classes if folded.count(c.name.casefold()) > 1})
        if duplicates:
            raise ValueError(
                "class names must be unique, ignoring case; repeated: " + ", ".join(duplicates)
            )
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def class_prompts(self) -> list[tuple[str, ...]]:
        """Return each class's prompts: its own, or the templates filled with its name."""
        return [c.prompts or tuple(t.format(c.name) for t in self.templates) for c in self.classes]

    def resolve_path(self, project_dir: Path, value: str) -> Path:
        """Resolve a path from the config against the project folder."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (project_dir / path)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def parse_config(data: Any, *, source: str = "config") -> ProjectConfig:
    """Validate a config mapping, raising ConfigError that names each invalid field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as error:
        raise config_error(error, source) from error


def config_error(error: ValidationError, source: str) -> ConfigError:
    """Convert a pydantic validation error into a ConfigError with one line per invalid field."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["loc"]:
            location = ".".join(str(part) for part in item["loc"])
            problems.append(f"  {location}: {message} (got {item.get('input')!r})")
        else:
            # A whole-config check: its message names the values, and the input is everything.
            problems.append(f"  {message}")
    return ConfigError(f"invalid {source}:\n" + "\n".join(problems))


def load_config(path: Path) -> ProjectConfig:
    """Read and validate a project config file."""
    if not path.is_file():
        raise ConfigError(
            f"project config {path} not found; create a project with `annotator init` "
            "or point to a folder that contains annotator.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return parse_config(data, source=str(path))


def write_config(config: ProjectConfig, path: Path) -> None:
    """Write a config file atomically, so an interrupted write never leaves half a file."""
    text = config.to_yaml()
    write_atomic(path, lambda file: file.write(text.encode("utf-8")))

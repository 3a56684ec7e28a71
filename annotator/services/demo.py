"""Build the demo: the digits pool, the demo model with its posterior factors, a ranked project.

Everything runs offline. The demo model is trained on first use and cached; its posterior
factors are estimated on the image–caption pairs it was trained on and saved beside the
weights in the BayesVLM directory format. The demo project's evaluation split is labelled
from the ground-truth file, and the app says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from annotator.config import (
    AcquisitionConfig,
    BudgetConfig,
    ClassConfig,
    EvaluationConfig,
    ModelConfig,
    PosteriorConfig,
    ProjectConfig,
)
from annotator.data.demo_data import DIGIT_NAMES, write_demo_pool
from annotator.models.demo import (
    DEMO_TEMPLATES,
    TRAINING_FILENAME,
    demo_model_dir,
    train_demo_model,
)
from annotator.services.hessian import estimate_pair_factors
from annotator.services.ingest import IngestReport, ingest
from annotator.services.oracle import label_evaluation_from_oracle
from annotator.services.project import Project, create_project

logger = logging.getLogger(__name__)

DEMO_PROJECT_NAME = "digits-demo"
ORACLE_ANNOTATOR = "ground-truth"

BROKEN_FILES = {
    "broken/empty.png": b"",
    "broken/notes.png": b"These are scanning notes, not an image.\n",
}
"""Files the demo pool carries on purpose, to show how unusable images are reported."""


@dataclass(frozen=True)
class DemoBuild:
    project: Project
    report: IngestReport
    model_dir: Path


def ensure_demo_model(*, seed: int = 0, progress: bool = True) -> Path:
    """Train the demo model and estimate its posterior factors unless they are cached."""
    directory = demo_model_dir()
    if not (directory / TRAINING_FILENAME).is_file():
        logger.info("training the demo model into %s (about a minute on a laptop CPU)", directory)
        result = train_demo_model(directory, seed=seed, progress=progress)
        logger.info(
            "demo model trained in %.0f s: zero-shot accuracy %.1f%% on clean held-out digits",
            result.seconds,
            100 * result.heldout_accuracy,
        )
    factors_dir = directory / "hessians"
    if not (factors_dir / "prior_precision_analytic.json").is_file():
        estimate_pair_factors(
            spec="demo", pairs=None, output=factors_dir, progress=progress, seed=seed
        )
    return directory


def demo_config(seed: int = 0) -> ProjectConfig:
    """The demo project's config: the ten digits, the demo model and its factors."""
    return ProjectConfig(
        name=DEMO_PROJECT_NAME,
        images="data/pool",
        oracle="data/ground_truth.csv",
        classes=tuple(ClassConfig(name=name) for name in DIGIT_NAMES),
        templates=DEMO_TEMPLATES,
        model=ModelConfig(spec="demo"),
        posterior=PosteriorConfig(factors="demo"),
        evaluation=EvaluationConfig(size=300, per_batch=0),
        acquisition=AcquisitionConfig(strategy="bald", batch_size=20),
        budget=BudgetConfig(planned_labels=600, target_accuracy=0.9),
        seed=seed,
    )


def build_demo_project(directory: Path, *, seed: int = 0, progress: bool = True) -> DemoBuild:
    """Create (or reopen) the demo project in ``directory``, ingested and ranked.

    Building twice is safe: the pool files, the model and the features are reused.
    """
    model_dir = ensure_demo_model(seed=seed, progress=progress)
    directory = directory.resolve()
    pool = write_demo_pool(directory / "data", seed=seed)
    for relative, content in BROKEN_FILES.items():
        path = pool.pool_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(content)

    project = create_project(directory, demo_config(seed), exist_ok=True)
    report = ingest(project, progress=progress)
    labelled = label_evaluation_from_oracle(project, annotator=ORACLE_ANNOTATOR)
    if labelled:
        logger.info("labelled %d evaluation images from the ground-truth file", labelled)
    return DemoBuild(project=project, report=report, model_dir=model_dir)

"""Strategy simulation: label from ground truth through the same services as the web app.

Each (strategy, seed) run works on a scratch copy of the project: the same images,
evaluation split and cached features, but its own SQLite store with no labels. An oracle
annotator takes batches with :func:`next_batch` and submits them with
:func:`submit_batch`, so every round is refit, evaluated and re-ranked exactly as when a
person labels in the browser.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from annotator.config import ProjectConfig
from annotator.data.images import ImageRecord
from annotator.db.engine import sqlite_url
from annotator.errors import InputError
from annotator.services.batches import next_batch, submit_batch
from annotator.services.inference import SNAPSHOT_FILENAME, load_snapshot, prompts_digest
from annotator.services.oracle import label_evaluation_from_oracle, oracle_labels, read_oracle
from annotator.services.project import DATABASE_FILENAME, Project, create_project
from annotator.services.ranking import Ranking
from annotator.services.rounds import RoundResult, run_round

logger = logging.getLogger(__name__)

ORACLE_ANNOTATOR = "oracle"

SIMULATION_COLUMNS = [
    "strategy",
    "seed",
    "round",
    "labels_spent",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "balanced_accuracy",
    "macro_f1",
    "nll",
    "ece",
    "map_accuracy",
    "map_nll",
    "map_ece",
    "refit_seconds",
    "round_seconds",
    "ood_auroc",
]


def scratch_copy(
    project: Project,
    directory: Path,
    *,
    strategy: str,
    seed: int,
    url: str | None = None,
    held_out_class: str | None = None,
    held_out_paths: frozenset[str] = frozenset(),
) -> Project:
    """Create an unlabelled copy of ``project`` in ``directory`` that shares its caches.

    The copy keeps the images, their splits and feature rows, and links the original
    ``cache`` folder, so nothing is decoded or encoded again. Its store is a new SQLite
    file in ``directory`` unless ``url`` names another database. ``held_out_class`` is left
    out of the copy's classes, and the images in ``held_out_paths`` (resolved paths) move to
    the evaluation split, so acquisition never offers them.
    """
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    source = project.config
    config = source.model_copy(
        update={
            "database": None,
            "images": str(project.images_dir.resolve()),
            "oracle": str(project.oracle_path.resolve()) if project.oracle_path else None,
            "acquisition": source.acquisition.model_copy(update={"strategy": strategy}),
            "evaluation": source.evaluation.model_copy(update={"labels": None, "per_batch": 0}),
            "seed": seed,
            "classes": tuple(c for c in source.classes if c.name != held_out_class),
        }
    )
    _link_caches(project, directory, config, held_out_class)
    # By default a scratch store is a SQLite file, even when the original uses PostgreSQL.
    copy = create_project(
        directory,
        ProjectConfig.model_validate(config.model_dump()),
        url=url or sqlite_url(directory / DATABASE_FILENAME),
    )
    images = project.store.images_frame(project.project_id)
    resolved = images["path"].map(lambda p: str(Path(p).resolve()))
    images.loc[resolved.isin(held_out_paths), "split"] = "evaluation"
    for split, group in images.groupby("split"):
        records = [
            ImageRecord(
                path=Path(row.path),
                sha256=row.sha256,
                width=None if pd.isna(row.width) else int(row.width),
                height=None if pd.isna(row.height) else int(row.height),
                status=row.status,
                reason=None if pd.isna(row.reason) else row.reason,
            )
            for row in group.itertuples(index=False)
        ]
        copy.store.add_images(copy.project_id, records, split=str(split))
    new_ids = copy.store.images_frame(copy.project_id).set_index("path")["id"]
    with_rows = images.dropna(subset=["feature_row"])
    copy.store.assign_feature_rows(
        copy.project_id,
        {
            int(new_ids[path]): int(row)
            for path, row in zip(with_rows["path"], with_rows["feature_row"], strict=True)
        },
    )
    return copy


def _link_caches(
    project: Project, directory: Path, config: ProjectConfig, held_out_class: str | None
) -> None:
    """Link the copy's ``cache`` folder to the original's.

    With a held-out class the model snapshot is rewritten without that class's text features,
    and everything else is linked.
    """
    source = (project.directory / "cache").resolve()
    target = directory / "cache"
    if held_out_class is None:
        target.symlink_to(source, target_is_directory=True)
        return
    (target / "model").mkdir(parents=True)
    (target / "features").symlink_to(source / "features", target_is_directory=True)
    model_dir = target / "model" / project.model_key
    model_dir.mkdir()
    for item in (source / "model" / project.model_key).iterdir():
        if item.name != SNAPSHOT_FILENAME:
            (model_dir / item.name).symlink_to(item)
    snapshot = load_snapshot(project)
    keep = [i for i, name in enumerate(project.config.class_names) if name != held_out_class]
    dataclasses.replace(
        snapshot,
        class_features=snapshot.class_features[keep],
        prompts_digest=prompts_digest(config.class_prompts()),
    ).save(model_dir / SNAPSHOT_FILENAME)


def simulate_project(
    project: Project,
    *,
    strategies: Sequence[str],
    seeds: Sequence[int],
    rounds: int,
    batch_size: int,
    work_dir: Path | None = None,
    progress: bool = True,
    held_out_class: str | None = None,
) -> pd.DataFrame:
    """Run every (strategy, seed) pair for ``rounds`` rounds of ``batch_size`` oracle labels.

    With ``held_out_class``, that class is left out of the label set: its images are never
    acquired or labelled, and each round reports ``ood_auroc``, the AUROC of the epistemic
    uncertainty (BALD) for telling them apart from the labelled evaluation images.

    Returns one row per round and run, round 0 (zero-shot) included, with the columns of
    :data:`SIMULATION_COLUMNS`.
    """
    if rounds < 1 or batch_size < 1:
        raise InputError(f"rounds ({rounds}) and batch size ({batch_size}) must be at least 1")
    held_out_paths: frozenset[str] = frozenset()
    if held_out_class is not None and held_out_class not in project.config.class_names:
        raise InputError(
            f"held-out class {held_out_class!r} is not a project class; "
            f"choose one of {', '.join(project.config.class_names)}"
        )
    oracle = read_oracle(project)
    if held_out_class is not None:
        held_out_paths = frozenset(p for p, label in oracle.items() if label == held_out_class)
    rows: list[dict[str, Any]] = []
    runs = [(strategy, seed) for strategy in strategies for seed in seeds]
    owned = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="annotator-sim-")) if owned else work_dir
    bar = tqdm(total=len(runs) * rounds, desc="simulating", unit="round", disable=not progress)
    try:
        for strategy, seed in runs:
            scratch = scratch_copy(
                project,
                root / f"{strategy}-seed{seed}",
                strategy=strategy,
                seed=seed,
                held_out_class=held_out_class,
                held_out_paths=held_out_paths,
            )
            ood = _held_out_ids(scratch, held_out_paths)
            try:
                label_evaluation_from_oracle(
                    scratch, annotator=ORACLE_ANNOTATOR, skip_unknown=held_out_class is not None
                )
                started = time.perf_counter()
                result = run_round(scratch, note="zero-shot")
                rows.append(
                    _row(strategy, seed, result, time.perf_counter() - started, scratch, ood)
                )
                for _ in range(rounds):
                    started = time.perf_counter()
                    batch = next_batch(scratch, ORACLE_ANNOTATOR, size=batch_size)
                    if batch is None:
                        logger.warning("pool exhausted for %s seed %d", strategy, seed)
                        break
                    labels = oracle_labels(scratch, [t.image_id for t in batch.tasks], oracle)
                    submitted = submit_batch(scratch, batch.batch_id, labels)
                    if submitted.round is not None:
                        seconds = time.perf_counter() - started
                        rows.append(_row(strategy, seed, submitted.round, seconds, scratch, ood))
                    bar.update(1)
            finally:
                scratch.close()
    finally:
        bar.close()
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    return pd.DataFrame(rows, columns=SIMULATION_COLUMNS)


def _held_out_ids(project: Project, held_out_paths: frozenset[str]) -> np.ndarray:
    images = project.store.images_frame(project.project_id, status="ok")
    resolved = images["path"].map(lambda p: str(Path(p).resolve()))
    return images.loc[resolved.isin(held_out_paths), "id"].to_numpy(dtype=np.int64)


def ood_auroc(project: Project, ranking: Ranking, held_out_ids: np.ndarray) -> float:
    """AUROC of the epistemic uncertainty for held-out-class images against the labelled
    evaluation images; NaN without held-out images."""
    if held_out_ids.size == 0:
        return float("nan")
    labelled = project.store.labels_frame(project.project_id, latest_only=True, split="evaluation")
    known = np.isin(ranking.image_ids, labelled["image_id"].to_numpy())
    unknown = np.isin(ranking.image_ids, held_out_ids)
    scores = np.concatenate([ranking.epistemic[unknown], ranking.epistemic[known]])
    truth = np.concatenate([np.ones(unknown.sum()), np.zeros(known.sum())])
    return float(roc_auc_score(truth, scores))


def _row(
    strategy: str,
    seed: int,
    result: RoundResult,
    seconds: float,
    project: Project,
    held_out_ids: np.ndarray,
) -> dict[str, Any]:
    bayes = result.metrics.get("bayes", {})
    deterministic = result.metrics.get("map", {})
    low, high = bayes.get("accuracy_low", float("nan")), bayes.get("accuracy_high", float("nan"))
    return {
        "strategy": strategy,
        "seed": seed,
        "round": result.index,
        "labels_spent": result.labels_spent,
        "accuracy": bayes.get("accuracy", float("nan")),
        "accuracy_low": low,
        "accuracy_high": high,
        "balanced_accuracy": bayes.get("balanced_accuracy", float("nan")),
        "macro_f1": bayes.get("macro_f1", float("nan")),
        "nll": bayes.get("nll", float("nan")),
        "ece": bayes.get("ece", float("nan")),
        "map_accuracy": deterministic.get("accuracy", float("nan")),
        "map_nll": deterministic.get("nll", float("nan")),
        "map_ece": deterministic.get("ece", float("nan")),
        "refit_seconds": result.refit_seconds,
        "round_seconds": seconds,
        "ood_auroc": ood_auroc(project, result.ranking, held_out_ids),
    }


def dataset_project(
    dataset: Path,
    *,
    model: str,
    arch: str | None,
    factors: str,
    work_root: Path,
    evaluation_size: float = 0.2,
    templates: Sequence[str] | None = None,
    progress: bool = True,
) -> Project:
    """Create (or reuse) a project over a labelled dataset, with the labels as its oracle.

    The project lives in ``work_root`` under a name derived from the dataset and model, so
    a second simulation over the same data reuses the encoded features.
    """
    from annotator.config import ClassConfig, EvaluationConfig, ModelConfig, PosteriorConfig
    from annotator.data.datasets import read_labelled_dataset
    from annotator.services.ingest import ingest

    data = read_labelled_dataset(dataset)
    digest = hashlib.sha256(f"{dataset.resolve()}|{model}|{arch}|{factors}".encode()).hexdigest()[
        :12
    ]
    directory = work_root / f"{dataset.resolve().name}-{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    oracle = directory / "oracle.csv"
    pd.DataFrame(
        {"path": [str(Path(p).resolve()) for p in data.paths], "label": data.label_names()}
    ).to_csv(oracle, index=False)
    settings: dict[str, Any] = {
        "name": f"simulation-{dataset.resolve().name}",
        "images": str(dataset.resolve() if dataset.is_dir() else dataset.resolve().parent),
        "oracle": str(oracle),
        "classes": tuple(ClassConfig(name=name) for name in data.class_names),
        "model": ModelConfig(spec=model, arch=arch),
        "posterior": PosteriorConfig(factors=factors),
        "evaluation": EvaluationConfig(size=evaluation_size, per_batch=0),
    }
    if templates:
        settings["templates"] = tuple(templates)
    project = create_project(directory, ProjectConfig(**settings), exist_ok=True)
    ingest(project, progress=progress, paths=[Path(p) for p in data.paths])
    return project


def run_simulation(
    *,
    project_dir: Path | None,
    dataset: Path | None,
    model: str,
    arch: str | None,
    factors: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
    rounds: int,
    batch_size: int,
    out: Path,
    plots: Sequence[Path],
    progress: bool = True,
    held_out_class: str | None = None,
) -> pd.DataFrame:
    """Simulate over a project or a labelled dataset; write the CSV and the plots."""
    from annotator.evaluation.charts import save_chart, simulation_chart
    from annotator.services.project import open_project

    if (project_dir is None) == (dataset is None):
        raise InputError("give either a project folder or --dataset, not both and not neither")
    for plot in plots:
        if plot.suffix.lower() not in {".png", ".html"}:
            raise InputError(f"plot file {plot} must end in .png or .html")
    if project_dir is not None:
        project = open_project(project_dir)
    else:
        project = dataset_project(
            dataset,
            model=model,
            arch=arch,
            factors=factors,
            work_root=_simulation_cache_root(),
            progress=progress,
        )
    try:
        frame = simulate_project(
            project,
            strategies=strategies,
            seeds=seeds,
            rounds=rounds,
            batch_size=batch_size,
            progress=progress,
            held_out_class=held_out_class,
        )
    finally:
        project.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    chart = simulation_chart(frame)
    for plot in plots:
        save_chart(chart, plot)
    return frame


def _simulation_cache_root() -> Path:
    import os

    base = os.environ.get("ANNOTATOR_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "annotator"
    return root / "simulations"

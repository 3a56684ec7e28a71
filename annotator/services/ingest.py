"""Ingest a project's images: validate, record, reserve the evaluation split, encode once.

Ingestion is idempotent and resumable. Known paths keep their ids and feature rows, only
images without finished features are encoded, and a broken file is recorded as skipped
with its reason instead of stopping the run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from annotator.data.datasets import read_labelled_dataset
from annotator.data.features import FeatureCache
from annotator.data.images import ImageRecord, discover_images, inspect_images
from annotator.errors import InputError
from annotator.models.encode import encode_images
from annotator.models.loading import load_model
from annotator.models.prompts import class_text_features
from annotator.models.towers import VisionLanguageModel
from annotator.services.hessian import estimate_project_factors
from annotator.services.inference import (
    ModelSnapshot,
    factors_directory,
    prompts_digest,
    snapshot_path,
)
from annotator.services.project import Project
from annotator.services.rounds import run_round

logger = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """Counts and problems of one ingestion run."""

    discovered: int = 0
    new: int = 0
    usable: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every image that cannot be used, including earlier runs'."""
    encoded: int = 0
    evaluation_images: int = 0
    imported_labels: int = 0
    round_index: int | None = None
    seconds: float = 0.0


def ingest(
    project: Project,
    *,
    progress: bool = True,
    model: VisionLanguageModel | None = None,
    paths: Sequence[Path] | None = None,
) -> IngestReport:
    """Validate and record new images, encode missing features, and rank if nothing is ranked.

    Parameters
    ----------
    model : an already loaded model; loaded from the project config when needed and None.
    paths : image files to ingest instead of searching the project's image folder.
    """
    started = time.perf_counter()
    report = IngestReport()
    images_dir = project.images_dir
    if paths is None:
        if not images_dir.is_dir():
            raise InputError(
                f"image folder {images_dir} not found; set `images:` in "
                f"{project.directory / 'annotator.yaml'} to a folder of images"
            )
        paths = discover_images(images_dir)
    else:
        paths = [Path(p).resolve() for p in paths]

    # 1. Validate files that the store does not know yet.
    report.discovered = len(paths)
    known = set(project.store.images_frame(project.project_id)["path"].tolist())
    new_paths = [p for p in paths if str(p) not in known]
    records = _inspect(new_paths, progress)
    report.new = len(records)
    if records:
        project.store.add_images(project.project_id, records, split="pool")

    # 2. Import an evaluation set, if configured, before reserving a random split.
    if project.config.evaluation.labels:
        report.imported_labels = _import_evaluation_labels(project)
    _reserve_evaluation_split(project)

    images = project.store.images_frame(project.project_id)
    skipped = images[images["status"] == "skipped"]
    report.skipped = list(zip(skipped["path"], skipped["reason"], strict=True))
    for path, reason in report.skipped:
        logger.warning("skipped image %s: %s", path, reason)
    usable = images[images["status"] == "ok"]
    report.usable = len(usable)
    report.evaluation_images = int((usable["split"] == "evaluation").sum())
    if report.usable == 0:
        raise InputError(
            f"no usable images in {images_dir} ({report.discovered} files found, "
            f"{len(report.skipped)} skipped); add PNG, JPEG or WebP images and run ingest again"
        )

    # 3. Encode missing features; load the model only when something is missing.
    _assign_feature_rows(project)
    usable = project.store.images_frame(project.project_id, status="ok").sort_values("feature_row")
    rows = usable["feature_row"].to_numpy(dtype=np.int64)
    needed = int(rows.max()) + 1
    loaded = model
    cache = None
    if FeatureCache.exists(project.features_dir):
        cache = FeatureCache.open(project.features_dir, key=project.model_spec.cache_key)
        if cache.num_rows < needed:
            cache.grow(needed)
    missing = cache is None or bool(np.isin(rows, cache.missing_rows()).any())
    if missing or not snapshot_path(project).is_file():
        loaded = loaded or load_project_model(project)
        if cache is None:
            cache = FeatureCache.create(
                project.features_dir,
                key=project.model_spec.cache_key,
                num_rows=needed,
                feature_dim=loaded.image_dim,
                offset_dim=loaded.embed_dim if loaded.has_image_offset else None,
            )
        stats = encode_images(
            loaded,
            [Path(p) for p in usable["path"]],
            cache,
            rows=rows,
            batch_size=project.config.model.batch_size,
            num_workers=project.config.model.num_workers,
            progress=progress,
        )
        cache.flush()
        report.encoded = stats.encoded
        if stats.failed:
            _mark_unreadable(project, usable, stats.failed)
            report.usable -= len(stats.failed)
            report.skipped += [(str(f.path), f.reason) for f in stats.failed]
        _write_snapshot(project, loaded)
    cache.close()

    # 4. Posterior factors estimated from the pool when the config asks for it.
    if project.config.posterior.factors == "estimate":
        directory = factors_directory(project)
        if not (directory / "prior_precision_analytic.json").is_file():
            estimate_project_factors(project, progress=progress)
            project.store.set_factor_source(project.project_id, f"estimated:pool:{directory}")
    else:
        project.store.set_factor_source(project.project_id, f"loaded:{factors_directory(project)}")

    # 5. Round 0: the zero-shot ranking.
    if project.store.latest_round(project.project_id) is None:
        report.round_index = run_round(project, note="zero-shot").index

    report.seconds = time.perf_counter() - started
    logger.info(
        "ingested %s: %d usable, %d skipped, %d encoded in %.1f s",
        project.config.name,
        report.usable,
        len(report.skipped),
        report.encoded,
        report.seconds,
    )
    return report


def _inspect(paths: list[Path], progress: bool) -> list[ImageRecord]:
    """Decode and hash new files on a few threads, with a progress bar."""
    from tqdm.auto import tqdm

    workers = max(1, min(8, os.cpu_count() or 1))
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress) as bar:
        return inspect_images(paths, workers=workers, progress=lambda done, total: bar.update(1))


def load_project_model(project: Project) -> VisionLanguageModel:
    settings = project.config.model
    return load_model(
        project.model_spec,
        device=None if settings.device == "auto" else settings.device,
        precision=settings.precision,
    )


def _assign_feature_rows(project: Project) -> None:
    """Give every usable image without features the next free row of the feature cache."""
    images = project.store.images_frame(project.project_id)
    taken = images["feature_row"].dropna()
    next_row = int(taken.max()) + 1 if len(taken) else 0
    pending = images[(images["status"] == "ok") & images["feature_row"].isna()]
    mapping = {int(image_id): next_row + i for i, image_id in enumerate(pending["id"])}
    project.store.assign_feature_rows(project.project_id, mapping)


def _mark_unreadable(project: Project, usable, failures) -> None:
    """Record images that passed inspection but failed to decode for encoding as skipped."""
    by_path = usable.set_index("path")
    records = []
    for failure in failures:
        row = by_path.loc[str(failure.path)]
        logger.warning("image %s failed to encode: %s", failure.path, failure.reason)
        records.append(
            ImageRecord(
                path=Path(failure.path),
                sha256=row["sha256"],
                width=None if pd.isna(row["width"]) else int(row["width"]),
                height=None if pd.isna(row["height"]) else int(row["height"]),
                status="skipped",
                reason=f"failed to decode for encoding: {failure.reason}",
            )
        )
    project.store.add_images(project.project_id, records)


def _write_snapshot(project: Project, model: VisionLanguageModel) -> None:
    prompts = project.config.class_prompts()
    snapshot = ModelSnapshot(
        kind=model.kind,
        image_projection=model.image_projection.detach().float().cpu(),
        text_projection=model.text_projection.detach().float().cpu(),
        logit_scale=float(model.logit_scale),
        logit_bias=None if model.logit_bias is None else float(model.logit_bias),
        class_features=class_text_features(model, project.config.class_names, prompts)
        .float()
        .cpu(),
        prompts_digest=prompts_digest(prompts),
        has_offsets=model.has_image_offset,
    )
    snapshot.save(snapshot_path(project))


def _reserve_evaluation_split(project: Project) -> None:
    """Move a random part of the usable pool into the evaluation split, up to the configured size."""
    setting = project.config.evaluation.size
    images = project.store.images_frame(project.project_id, status="ok")
    if setting <= 0 or images.empty:
        return
    in_split = images["split"] == "evaluation"
    imported = project.store.labels_frame(project.project_id, latest_only=True)
    imported_ids = set(imported.loc[imported["source"] == "import", "image_id"].tolist())
    reserved = int(sum(1 for i in images.loc[in_split, "id"] if i not in imported_ids))
    target = int(round(setting * len(images))) if setting < 1 else int(setting)
    labelled = set(
        project.store.labels_frame(project.project_id, latest_only=True)["image_id"].tolist()
    )
    busy = {
        item.image_id for b in project.store.open_batches(project.project_id) for item in b.items
    }
    candidates = images.loc[~in_split & ~images["id"].isin(labelled | busy), "id"].to_numpy()
    needed = min(target - reserved, candidates.size)
    if needed <= 0:
        return
    rng = np.random.default_rng([project.config.seed, 1, len(images)])
    chosen = rng.choice(np.sort(candidates), size=needed, replace=False)
    project.store.set_split(project.project_id, chosen.tolist(), "evaluation")
    logger.info("reserved %d images for the evaluation split (target %d)", needed, target)


def _import_evaluation_labels(project: Project) -> int:
    """Add the configured labelled set as evaluation images with imported labels."""
    source = project.config.resolve_path(project.directory, project.config.evaluation.labels)
    dataset = read_labelled_dataset(source)
    names = project.config.class_names
    unknown = sorted(set(dataset.class_names) - set(names))
    if unknown:
        raise InputError(
            f"labels {', '.join(map(repr, unknown))} in {source} are not project classes "
            f"({', '.join(names)}); rename them or add the classes to annotator.yaml"
        )
    known = project.store.images_frame(project.project_id).set_index("path")
    new_paths = [p for p in dataset.paths if str(p) not in known.index]
    if new_paths:
        project.store.add_images(
            project.project_id, _inspect(new_paths, progress=False), split="evaluation"
        )
    images = project.store.images_frame(project.project_id).set_index("path")
    already = set(
        project.store.labels_frame(project.project_id, latest_only=True)["image_id"].tolist()
    )
    classes = {c.name: c.id for c in project.store.classes(project.project_id)}
    labels: dict[int, int] = {}
    for path, label in zip(dataset.paths, dataset.labels, strict=True):
        row = images.loc[str(path)]
        if row["status"] != "ok" or int(row["id"]) in already:
            continue
        labels[int(row["id"])] = classes[dataset.class_names[label]]
    project.store.set_split(project.project_id, list(labels), "evaluation")
    project.store.add_labels(project.project_id, labels, annotator="import", source="import")
    return len(labels)

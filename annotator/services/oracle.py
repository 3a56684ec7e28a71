"""Ground-truth labels from the project's oracle file, for simulation and the demo.

The oracle is a CSV of ``path,label``. It is read only here: ranking and refitting never
see it, and labels it writes carry the source ``oracle`` so they are distinguished from a
person's in every table and export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from annotator.data.datasets import read_labelled_dataset
from annotator.errors import ConfigError, InputError
from annotator.services.project import Project
from annotator.services.rounds import refresh_latest_metrics

logger = logging.getLogger(__name__)


def read_oracle(project: Project, *, allow_unknown: bool = False) -> dict[str, str]:
    """Return the oracle's class name for each resolved image path.

    With ``allow_unknown``, labels that are not project classes are returned too, for
    simulations that leave a class out of the label set.
    """
    path = project.oracle_path
    if path is None:
        raise ConfigError(
            f"project {project.config.name!r} has no ground truth; set `oracle:` in "
            f"{project.directory / 'annotator.yaml'} to a CSV of path,label"
        )
    dataset = read_labelled_dataset(path)
    names = set(project.config.class_names)
    unknown = sorted(set(dataset.class_names) - names)
    if unknown and not allow_unknown:
        raise InputError(
            f"oracle {path} has labels that are not project classes: {', '.join(unknown)}"
        )
    return {
        str(Path(p).resolve()): label
        for p, label in zip(dataset.paths, dataset.label_names(), strict=True)
    }


def oracle_labels(
    project: Project, image_ids: list[int], oracle: dict[str, str] | None = None
) -> dict[int, str]:
    """Return the oracle's label for each image id; raise when one is missing from the file."""
    oracle = oracle if oracle is not None else read_oracle(project)
    images = project.store.images_frame(project.project_id).set_index("id")
    labels: dict[int, str] = {}
    for image_id in image_ids:
        path = str(Path(images.loc[image_id, "path"]).resolve())
        if path not in oracle:
            raise InputError(f"image {path} has no label in the oracle {project.oracle_path}")
        labels[image_id] = oracle[path]
    return labels


def label_evaluation_from_oracle(
    project: Project, *, annotator: str = "ground-truth", skip_unknown: bool = False
) -> int:
    """Label every unlabelled evaluation image from the oracle and re-evaluate the latest round.

    With ``skip_unknown``, images whose oracle label is not a project class stay unlabelled.
    Returns the number of labels written.
    """
    images = project.store.images_frame(project.project_id, status="ok", split="evaluation")
    labelled = set(
        project.store.labels_frame(project.project_id, latest_only=True)["image_id"].tolist()
    )
    missing = [int(i) for i in images["id"] if int(i) not in labelled]
    classes = {c.name: c.id for c in project.store.classes(project.project_id)}
    oracle = read_oracle(project, allow_unknown=skip_unknown)
    labels = {
        image_id: classes[name]
        for image_id, name in oracle_labels(project, missing, oracle).items()
        if name in classes
    }
    if not labels:
        return 0
    project.store.add_labels(project.project_id, labels, annotator=annotator, source="oracle")
    refresh_latest_metrics(project)
    return len(labels)

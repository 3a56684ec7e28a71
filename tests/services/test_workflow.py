"""The labelling loop on the demo: ingest, rank, hand out batches, submit, refit, export."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from annotator.errors import InputError
from annotator.services.batches import next_batch, submit_batch
from annotator.services.demo import BROKEN_FILES, DemoBuild, build_demo_project
from annotator.services.export import export_labels
from annotator.services.oracle import oracle_labels
from annotator.services.project import Project
from annotator.services.ranking import latest_ranking
from annotator.services.simulate import scratch_copy
from annotator.services.summary import project_summary, skipped_images, top_of_ranking


def _submit_from_oracle(project: Project, annotator: str = "alice"):
    batch = next_batch(project, annotator)
    assert batch is not None
    labels = oracle_labels(project, [task.image_id for task in batch.tasks])
    return batch, submit_batch(project, batch.batch_id, labels)


def test_broken_files_skipped_with_reasons(demo_build: DemoBuild) -> None:
    reasons = dict(demo_build.report.skipped)
    pool_dir = demo_build.project.images_dir
    empty = str(pool_dir / "broken" / "empty.png")
    text = str(pool_dir / "broken" / "notes.png")

    assert set(reasons) == {empty, text}
    assert "empty file" in reasons[empty]
    assert "not an image" in reasons[text]
    assert len(BROKEN_FILES) == 2
    assert set(skipped_images(demo_build.project)["path"]) == {empty, text}


def test_every_usable_image_ranked(demo_build: DemoBuild) -> None:
    project = demo_build.project
    ranking = latest_ranking(project)
    images = project.store.images_frame(project.project_id)
    usable = images[images["status"] == "ok"]
    pool = usable[usable["split"] == "pool"]

    assert ranking is not None
    assert set(ranking.image_ids.tolist()) == set(usable["id"].tolist())
    selectable = ranking.image_ids[np.isfinite(ranking.scores)]
    assert set(selectable.tolist()) == set(pool["id"].tolist())
    assert np.all(ranking.epistemic >= -1e-6)
    assert np.all(np.isfinite(ranking.top_probs))


def test_demo_build_idempotent(demo_build: DemoBuild) -> None:
    before = project_summary(demo_build.project)
    again = build_demo_project(demo_build.project.directory, progress=False)

    assert again.report.new == 0
    assert again.report.encoded == 0
    after = project_summary(again.project)
    assert after.usable == before.usable
    assert after.rounds == before.rounds
    assert after.labelled_evaluation == before.labelled_evaluation
    again.project.close()


def test_submit_refits_and_reranks(project: Project) -> None:
    before = latest_ranking(project)
    batch, result = _submit_from_oracle(project)

    assert result.refit_error is None
    assert result.round is not None
    assert result.round.index == 1
    assert result.round.labels_spent == len(batch.tasks)
    after = latest_ranking(project)
    assert after.round_index == 1
    assert not np.allclose(np.nan_to_num(before.scores), np.nan_to_num(after.scores))
    labelled = set(project.store.labels_frame(project.project_id)["image_id"])
    assert {task.image_id for task in batch.tasks} <= labelled
    assert not np.isfinite(after.scores[np.isin(after.image_ids, list(labelled))]).any()


def test_labels_in_sqlite_file(project: Project) -> None:
    batch, _ = _submit_from_oracle(project, annotator="bob")

    with sqlite3.connect(project.directory / "project.db") as connection:
        rows = connection.execute(
            "SELECT image_id FROM labels WHERE annotator = 'bob' AND source = 'human'"
        ).fetchall()
        rounds = connection.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    assert sorted(r[0] for r in rows) == sorted(task.image_id for task in batch.tasks)
    assert rounds == 2


def test_open_batch_resumed_not_duplicated(project: Project) -> None:
    first = next_batch(project, "alice")
    again = next_batch(project, "alice")
    other = next_batch(project, "bob")

    assert again.batch_id == first.batch_id
    assert {t.image_id for t in first.tasks}.isdisjoint({t.image_id for t in other.tasks})
    assert len({t.image_id for t in first.tasks}) == len(first.tasks)


def test_incomplete_batch_rejected(project: Project) -> None:
    batch = next_batch(project, "alice")
    labels = oracle_labels(project, [task.image_id for task in batch.tasks[1:]])

    with pytest.raises(InputError, match="exactly one label per image"):
        submit_batch(project, batch.batch_id, labels)
    assert project.store.labels_frame(project.project_id, source="human").empty
    assert project.store.latest_round(project.project_id).index == 0


def test_unknown_class_rejected(project: Project) -> None:
    batch = next_batch(project, "alice")
    labels = {task.image_id: "eleven" for task in batch.tasks}

    with pytest.raises(InputError, match="unknown class 'eleven'"):
        submit_batch(project, batch.batch_id, labels)


def test_evaluation_split_never_acquired(demo_build: DemoBuild, tmp_path: Path) -> None:
    source = demo_build.project
    copy = scratch_copy(source, tmp_path / "copy", strategy="bald", seed=1)
    from annotator.config import write_config
    from annotator.services.project import open_project

    # Mix evaluation tasks into batches, as a real project does.
    config = copy.config.model_copy(
        update={"evaluation": copy.config.evaluation.model_copy(update={"per_batch": 5})}
    )
    write_config(config, copy.directory / "annotator.yaml")
    copy.close()
    copy = open_project(copy.directory)
    from annotator.services.rounds import run_round

    run_round(copy)
    evaluation = set(copy.store.images_frame(copy.project_id, split="evaluation")["id"])
    for _ in range(3):
        batch, _ = _submit_from_oracle(copy)
        purposes = {task.image_id: task.purpose for task in batch.tasks}
        acquired = {i for i, purpose in purposes.items() if purpose == "acquisition"}
        evaluated = {i for i, purpose in purposes.items() if purpose == "evaluation"}
        assert acquired.isdisjoint(evaluation)
        assert evaluated <= evaluation
        assert len(evaluated) == 5
    training = copy.store.labels_frame(copy.project_id, split="pool")
    assert set(training["image_id"]).isdisjoint(evaluation)
    copy.close()


def test_top_of_ranking_sorted(project: Project) -> None:
    frame = top_of_ranking(project, 15)

    assert len(frame) == 15
    assert frame["score"].is_monotonic_decreasing
    assert frame["rank"].tolist() == list(range(1, 16))


@pytest.mark.parametrize("export_format", ["csv", "jsonl", "folders"])
def test_export_labelled_set(project: Project, tmp_path: Path, export_format: str) -> None:
    batch, _ = _submit_from_oracle(project)
    output = tmp_path / f"labels.{export_format}"

    result = export_labels(project, output, export_format, include_evaluation=False)

    assert result.rows == len(batch.tasks)
    if export_format == "csv":
        frame = pd.read_csv(output)
        assert set(frame["split"]) == {"pool"}
        assert set(frame["label"]) <= set(project.config.class_names)
    elif export_format == "jsonl":
        assert len(output.read_text().splitlines()) == len(batch.tasks)
    else:
        files = list(output.rglob("*.png"))
        assert len(files) == len(batch.tasks)
        assert {f.parent.name for f in files} <= set(project.config.class_names)


def test_export_refuses_overwrite(project: Project, tmp_path: Path) -> None:
    output = tmp_path / "labels.csv"
    output.write_text("keep me")

    with pytest.raises(InputError, match="already exists"):
        export_labels(project, output)
    assert output.read_text() == "keep me"

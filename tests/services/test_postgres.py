"""A demo project whose store is on the PostgreSQL server, as a team would run it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import URL

from annotator.services.batches import next_batch, submit_batch
from annotator.services.demo import DemoBuild
from annotator.services.oracle import label_evaluation_from_oracle, oracle_labels
from annotator.services.project import DATABASE_URL_VARIABLE, open_project
from annotator.services.rounds import run_round
from annotator.services.simulate import scratch_copy

pytestmark = pytest.mark.postgres


def test_labelling_loop_on_postgres(
    demo_build: DemoBuild, postgres_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_url.render_as_string(hide_password=False)
    project = scratch_copy(demo_build.project, tmp_path / "team", strategy="bald", seed=0, url=url)
    label_evaluation_from_oracle(project)
    run_round(project)

    batch = next_batch(project, "alice")
    labels = oracle_labels(project, [task.image_id for task in batch.tasks])
    result = submit_batch(project, batch.batch_id, labels)
    project.close()

    assert result.round is not None
    assert result.round.index == 1
    assert not (tmp_path / "team" / "project.db").exists()

    # Team members open the project folder with the server's URL in the environment.
    monkeypatch.setenv(DATABASE_URL_VARIABLE, url)
    reopened = open_project(tmp_path / "team")
    assert reopened.store.url.startswith("postgresql")
    human = reopened.store.labels_frame(reopened.project_id, source="human")
    assert sorted(human["image_id"]) == sorted(labels)
    assert reopened.store.latest_round(reopened.project_id).index == 1
    reopened.close()

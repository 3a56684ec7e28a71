"""The app's pages driven by Streamlit's AppTest, on a real project and SQLite file."""

from __future__ import annotations

import sqlite3

import numpy as np
from streamlit.testing.v1 import AppTest

from annotator.services.oracle import oracle_labels
from annotator.services.project import Project
from annotator.services.ranking import latest_ranking
from tests.app.conftest import APP_SCRIPT

TIMEOUT = 120


def _app() -> AppTest:
    return AppTest.from_file(str(APP_SCRIPT), default_timeout=TIMEOUT)


def _label_boxes(at: AppTest) -> list:
    return [box for box in at.selectbox if str(box.key).startswith("label-")]


def test_label_page_asks_for_name(app_project: Project) -> None:
    at = _app().run()

    assert not at.exception
    assert any("Enter your name" in info.value for info in at.info)
    assert not _label_boxes(at)


def test_label_page_submits_batch(app_project: Project) -> None:
    before = latest_ranking(app_project)
    at = _app().run()
    at.text_input(key="annotator_input").set_value("alice").run()
    boxes = _label_boxes(at)
    assert len(boxes) == app_project.config.acquisition.batch_size

    image_ids = [int(str(box.key).rsplit("-", 1)[1]) for box in boxes]
    truth = oracle_labels(app_project, image_ids)
    for box, image_id in zip(boxes, image_ids, strict=True):
        box.set_value(truth[image_id])
    at.button[0].click().run()

    assert not at.exception
    assert not at.error
    assert any("Saved 20 labels" in s.value for s in at.success)
    with sqlite3.connect(app_project.directory / "project.db") as connection:
        stored = connection.execute(
            "SELECT image_id FROM labels WHERE annotator = 'alice' AND source = 'human'"
        ).fetchall()
        rounds = connection.execute('SELECT labels_spent FROM rounds ORDER BY "index"').fetchall()
    assert sorted(row[0] for row in stored) == sorted(image_ids)
    assert [row[0] for row in rounds] == [0, 20]
    after = latest_ranking(app_project)
    assert after.round_index == 1
    assert not np.allclose(np.nan_to_num(before.scores), np.nan_to_num(after.scores))
    # The next batch is ready and contains none of the labelled images.
    next_ids = {int(str(box.key).rsplit("-", 1)[1]) for box in _label_boxes(at)}
    assert next_ids
    assert next_ids.isdisjoint(image_ids)


def test_label_page_rejects_partial_batch(app_project: Project) -> None:
    at = _app().run()
    at.text_input(key="annotator_input").set_value("carol").run()
    boxes = _label_boxes(at)
    boxes[0].set_value(app_project.config.class_names[0])
    at.button[0].click().run()

    assert any("Choose a class for image(s) #2" in e.value for e in at.error)
    assert app_project.store.labels_frame(app_project.project_id, source="human").empty


def test_progress_page_renders(app_project: Project) -> None:
    at = _app().run()
    at.switch_page("views/progress.py").run()

    assert not at.exception
    assert any("ground-truth file" in info.value for info in at.info)
    assert any(metric.label == "Zero-shot accuracy" for metric in at.metric)


def test_pool_page_lists_skipped_files(app_project: Project) -> None:
    at = _app().run()
    at.switch_page("views/pool.py").run()

    assert not at.exception
    skipped = at.dataframe[0].value
    assert sorted(skipped["reason"].str.split(":").str[0]) == [
        "empty file (0 bytes)",
        "not an image",
    ]


def test_export_page_renders(app_project: Project) -> None:
    at = _app().run()
    at.switch_page("views/export.py").run()

    assert not at.exception
    assert any("labelled images" in md.value for md in at.markdown)

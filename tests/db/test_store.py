"""Tests of Store, each run on a SQLite file and on a PostgreSQL database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

import annotator.db.store as store_module
from annotator.data.images import discover_images, inspect_images
from annotator.db import NewBatchItem, Store
from annotator.errors import InputError, StoreError

from .conftest import Seeded, ok_record, seed_project, skipped_record


def _count(store: Store, table: str) -> int:
    with store.engine.connect() as connection:
        return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


@pytest.fixture
def failing_batch_update(store: Store) -> Iterator[None]:
    """Make the database reject any UPDATE of a batch: a failure after the label inserts."""
    sqlite = store.engine.dialect.name == "sqlite"
    with store.engine.begin() as connection:
        if sqlite:
            connection.exec_driver_sql(
                "CREATE TRIGGER fail_batch_update BEFORE UPDATE ON batches "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
        else:
            connection.exec_driver_sql(
                "CREATE FUNCTION fail_batch_update() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER fail_batch_update BEFORE UPDATE ON batches "
                "FOR EACH ROW EXECUTE FUNCTION fail_batch_update()"
            )
    yield
    with store.engine.begin() as connection:
        connection.exec_driver_sql(
            "DROP TRIGGER fail_batch_update" + ("" if sqlite else " ON batches")
        )
        if not sqlite:
            connection.exec_driver_sql("DROP FUNCTION fail_batch_update()")


# ---------------------------------------------------------------------- projects


def test_project_round_trip(store: Store) -> None:
    config = {"batch_size": 8, "templates": ["a photo of a {}."], "nested": {"beta": 1.5}}
    created = store.create_project(
        "  birds ", model_spec="ViT-B-32:openai", factor_source="published:/f", config=config
    )
    loaded = store.get_project("birds")
    assert loaded == created
    assert loaded.name == "birds"
    assert loaded.config == config
    assert loaded.created_at.tzinfo is not None
    assert abs(loaded.created_at - datetime.now(UTC)) < timedelta(minutes=5)
    assert store.get_project(created.id) == created
    assert store.get_project(created) == created


def test_project_duplicate_name(store: Store) -> None:
    store.create_project("birds", model_spec="demo", factor_source="demo")
    with pytest.raises(StoreError, match="already exists"):
        store.create_project("birds", model_spec="demo", factor_source="demo")


def test_project_not_found_lists_names(store: Store) -> None:
    store.create_project("birds", model_spec="demo", factor_source="demo")
    with pytest.raises(StoreError, match="'bird' not found") as raised:
        store.get_project("bird")
    assert "birds" in str(raised.value)


def test_project_invalid_arguments(store: Store) -> None:
    with pytest.raises(InputError, match="project name is empty"):
        store.create_project("  ", model_spec="demo", factor_source="demo")
    with pytest.raises(InputError, match="model_spec"):
        store.create_project("p", model_spec="", factor_source="demo")
    with pytest.raises(InputError, match=r"config\['x'\] is nan"):
        store.create_project("p", model_spec="demo", factor_source="demo", config={"x": np.nan})
    assert store.list_projects() == []


def test_update_config_and_factor_source(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo", config={"a": 1})
    updated = store.update_project_config(project, {"a": np.int64(2), "v": np.arange(3)})
    assert updated.config == {"a": 2, "v": [0, 1, 2]}
    assert store.get_project("p").config == {"a": 2, "v": [0, 1, 2]}
    assert store.set_factor_source("p", "estimated:pool").factor_source == "estimated:pool"
    assert store.get_project("p").factor_source == "estimated:pool"


def test_delete_project_cascades(store: Store) -> None:
    seeded = seed_project(store, "gone")
    remaining = seed_project(store, "remaining")
    store.add_labels(seeded.project, {seeded.pool_ids[0]: seeded.classes[0].id}, annotator="ann")
    batch = store.open_batch(
        seeded.project,
        "ann",
        seeded.pool_ids[1:3],
        kind="acquisition",
        strategy="power",
        round_index=0,
    )
    store.submit_batch(batch.id, {seeded.pool_ids[1]: seeded.classes[1].id})
    store.add_round(seeded.project, labels_spent=2, strategy="power", metrics={"accuracy": 0.5})

    store.delete_project("gone")

    assert [project.name for project in store.list_projects()] == ["remaining"]
    # Only the other project's 3 classes and 9 images are left.
    assert _count(store, "classes") == 3
    assert _count(store, "images") == 9
    for table in ("labels", "batches", "batch_items", "rounds"):
        assert _count(store, table) == 0, table
    assert len(store.images_frame(remaining.project)) == 9


# ---------------------------------------------------------------------- classes


def test_classes_round_trip(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo")
    classes = store.set_classes(
        project, {"cat": "a photo of a cat", "dog": ["a {}.", "the {}."], "fox": None}
    )
    assert [(c.index, c.name, c.prompt) for c in classes] == [
        (0, "cat", "a photo of a cat"),
        (1, "dog", ["a {}.", "the {}."]),
        (2, "fox", None),
    ]
    assert store.classes(project) == classes


def test_classes_append_keeps_ids(seeded: Seeded, store: Store) -> None:
    store.add_labels(seeded.project, {seeded.pool_ids[0]: seeded.classes[0].id}, annotator="a")
    updated = store.set_classes(
        seeded.project, {"cat": "a cat", "dog": None, "fox": None, "owl": None}
    )
    assert [c.id for c in updated[:3]] == [c.id for c in seeded.classes]
    assert [(c.index, c.name) for c in updated] == [(0, "cat"), (1, "dog"), (2, "fox"), (3, "owl")]
    assert updated[0].prompt == "a cat"


def test_classes_replace_rejected_when_labelled(seeded: Seeded, store: Store) -> None:
    store.add_labels(seeded.project, {seeded.pool_ids[0]: seeded.classes[1].id}, annotator="a")
    with pytest.raises(StoreError, match="already have labels") as raised:
        store.set_classes(seeded.project, ["dog", "cat", "fox"])
    assert "dog" in str(raised.value)
    assert [c.name for c in store.classes(seeded.project)] == ["cat", "dog", "fox"]


def test_classes_replace_without_labels(seeded: Seeded, store: Store) -> None:
    replaced = store.set_classes(seeded.project, ["zebra", "yak"])
    assert [(c.index, c.name) for c in replaced] == [(0, "zebra"), (1, "yak")]


def test_classes_invalid(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo")
    with pytest.raises(InputError, match="more than once"):
        store.set_classes(project, ["cat", "cat"])
    with pytest.raises(InputError, match="empty"):
        store.set_classes(project, [])
    with pytest.raises(InputError, match="the string"):
        store.set_classes(project, "cat")
    with pytest.raises(InputError, match="prompt of class 'cat'"):
        store.set_classes(project, {"cat": 3})
    assert store.classes(project) == []


# ---------------------------------------------------------------------- images


def test_images_round_trip(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo")
    result = store.add_images(
        project, [ok_record("a.png", "1", 40, 30), skipped_record("b.png", "not an image")]
    )
    assert (result.inserted, result.updated, result.unchanged) == (2, 0, 0)

    frame = store.images_frame(project)
    assert list(frame.columns) == [
        "id",
        "path",
        "sha256",
        "width",
        "height",
        "status",
        "reason",
        "split",
        "feature_row",
        "created_at",
    ]
    assert frame.path.tolist() == ["a.png", "b.png"]
    assert frame.status.tolist() == ["ok", "skipped"]
    assert frame.width.tolist() == [40, pd.NA]
    assert frame.reason.isna().tolist() == [True, False]
    assert frame.reason.iloc[1] == "not an image"
    assert frame.split.tolist() == ["pool", "pool"]
    assert str(frame.feature_row.dtype) == "Int64"
    assert str(frame.created_at.dtype).endswith("UTC]")


def test_images_from_inspected_folder(store: Store, tmp_path: Path) -> None:
    """Records from annotator.data.images go into the store as they are."""
    Image.new("RGB", (8, 6)).save(tmp_path / "real.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("no pixels here")
    records = inspect_images(discover_images(tmp_path))
    project = store.create_project("p", model_spec="demo", factor_source="demo")

    store.add_images(project, records)

    frame = store.images_frame(project).set_index("path")
    real, empty, text_file = (
        str(tmp_path / name) for name in ("real.png", "empty.png", "text.png")
    )
    assert frame.loc[real, "status"] == "ok"
    assert (frame.loc[real, "width"], frame.loc[real, "height"]) == (8, 6)
    assert frame.loc[empty, "reason"] == "empty file (0 bytes)"
    assert frame.loc[text_file, "reason"] == "not an image: cannot identify image file format"
    assert frame.loc[real, "sha256"] == records[1].sha256


def test_images_reingest_keeps_ids_and_rows(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo")
    records = [ok_record(f"{i}.png", str(i)) for i in range(5)]
    store.add_images(project, records)
    before = store.images_frame(project)
    store.assign_feature_rows(project, dict(zip(before.id, range(5), strict=True)))
    before = store.images_frame(project)

    again = store.add_images(project, [*records, ok_record("5.png", "5")])
    after = store.images_frame(project)

    assert (again.inserted, again.updated, again.unchanged) == (1, 0, 5)
    assert again.invalidated_image_ids == ()
    pd.testing.assert_frame_equal(after.iloc[:5].reset_index(drop=True), before)
    assert after.feature_row.tolist() == [0, 1, 2, 3, 4, pd.NA]


def test_images_changed_content_clears_row(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo")
    store.add_images(
        project, [ok_record("a.png", "1"), ok_record("b.png", "2"), ok_record("c.png", "3")]
    )
    ids = store.images_frame(project).id.tolist()
    store.assign_feature_rows(project, {ids[0]: 0, ids[1]: 1, ids[2]: 2})

    result = store.add_images(
        project,
        [ok_record("a.png", "1", width=64), ok_record("b.png", "9"), skipped_record("c.png")],
    )
    frame = store.images_frame(project).set_index("id")

    assert (result.inserted, result.updated, result.unchanged) == (0, 3, 0)
    assert sorted(result.invalidated_image_ids) == [ids[1], ids[2]]
    assert frame.loc[ids[0], "feature_row"] == 0  # same hash, new size: row kept
    assert frame.loc[ids[0], "width"] == 64
    assert frame.loc[ids[1], "feature_row"] is pd.NA
    assert frame.loc[ids[1], "sha256"] == "9".rjust(64, "0")
    assert frame.loc[ids[2], "status"] == "skipped"
    assert frame.loc[ids[2], "feature_row"] is pd.NA


def test_images_invalid_records(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo")
    with pytest.raises(InputError, match="more than once"):
        store.add_images(project, [ok_record("a.png"), ok_record("a.png")])
    with pytest.raises(InputError, match="without a reason"):
        store.add_images(project, [skipped_record("a.png", reason="")])
    with pytest.raises(InputError, match="invalid status of image 'a.png'"):
        store.add_images(project, [replace(ok_record("a.png"), status="broken")])
    assert store.images_frame(project).empty


def test_images_frame_filters(seeded: Seeded, store: Store) -> None:
    pool = store.images_frame(seeded.project, status="ok", split="pool")
    assert pool.id.tolist() == seeded.pool_ids
    evaluation = store.images_frame(seeded.project, split="evaluation")
    assert evaluation.id.tolist() == seeded.evaluation_ids
    skipped = store.images_frame(seeded.project, status="skipped")
    assert skipped.id.tolist() == [seeded.skipped_id]
    with pytest.raises(InputError, match="expected one of: pool, evaluation"):
        store.images_frame(seeded.project, split="train")


def test_images_empty_frame_has_columns(store: Store) -> None:
    project = store.create_project("p", model_spec="demo", factor_source="demo")
    frame = store.images_frame(project)
    assert frame.empty
    assert "feature_row" in frame.columns
    assert str(frame.feature_row.dtype) == "Int64"


def test_set_split(seeded: Seeded, store: Store) -> None:
    moved = store.set_split(seeded.project, seeded.pool_ids[:2], "evaluation")
    assert moved == 2
    evaluation = store.images_frame(seeded.project, split="evaluation").id.tolist()
    assert sorted(evaluation) == sorted(seeded.evaluation_ids + seeded.pool_ids[:2])
    # Moving again changes nothing.
    assert store.set_split(seeded.project, seeded.pool_ids[:2], "evaluation") == 0


def test_set_split_foreign_image(seeded: Seeded, store: Store) -> None:
    other = seed_project(store, "other")
    with pytest.raises(StoreError, match="not images of project"):
        store.set_split(seeded.project, [seeded.pool_ids[0], other.pool_ids[0]], "evaluation")
    assert store.images_frame(seeded.project, split="evaluation").id.tolist() == (
        seeded.evaluation_ids
    )


def test_set_split_rejects_open_batch_image(seeded: Seeded, store: Store) -> None:
    batch = store.open_batch(
        seeded.project,
        "ann",
        seeded.pool_ids[:1],
        kind="acquisition",
        strategy="s",
        round_index=0,
    )
    with pytest.raises(StoreError, match=f"open batches {batch.id}"):
        store.set_split(seeded.project, seeded.pool_ids[:1], "evaluation")


def test_assign_feature_rows_validation(seeded: Seeded, store: Store) -> None:
    project, ids = seeded.project, seeded.pool_ids
    store.assign_feature_rows(project, {ids[0]: 0, ids[1]: 1})
    # Exchanging rows among the given images is allowed.
    store.assign_feature_rows(project, {ids[0]: 1, ids[1]: 0})
    rows = store.images_frame(project).set_index("id").feature_row
    assert (rows[ids[0]], rows[ids[1]]) == (1, 0)

    with pytest.raises(StoreError, match="already belong to images"):
        store.assign_feature_rows(project, {ids[2]: 0})
    with pytest.raises(StoreError, match="have no features"):
        store.assign_feature_rows(project, {seeded.skipped_id: 7})
    with pytest.raises(InputError, match="given to several images"):
        store.assign_feature_rows(project, {ids[2]: 5, ids[3]: 5})
    with pytest.raises(InputError, match="at least 0"):
        store.assign_feature_rows(project, {ids[2]: -1})
    other = seed_project(store, "other")
    with pytest.raises(StoreError, match="not images of project"):
        store.assign_feature_rows(project, {other.pool_ids[0]: 9})
    rows = store.images_frame(project).set_index("id").feature_row
    assert rows.dropna().to_dict() == {ids[0]: 1, ids[1]: 0}


# ---------------------------------------------------------------------- labels


def test_labels_latest_only(seeded: Seeded, store: Store) -> None:
    cat, dog, fox = seeded.classes
    first, second = seeded.pool_ids[:2]
    store.add_labels(seeded.project, {first: cat.id, second: dog.id}, annotator="ann")
    store.add_labels(seeded.project, {first: fox.id}, annotator="bob", source="import")

    history = store.labels_frame(seeded.project)
    assert len(history) == 3
    latest = store.labels_frame(seeded.project, latest_only=True).set_index("image_id")
    assert latest.loc[first, "class_name"] == "fox"
    assert latest.loc[first, "class_index"] == 2
    assert latest.loc[first, "annotator"] == "bob"
    assert latest.loc[second, "class_name"] == "dog"
    assert len(latest) == 2

    imported = store.labels_frame(seeded.project, source="import")
    assert imported.image_id.tolist() == [first]


def test_labels_split_filter(seeded: Seeded, store: Store) -> None:
    cat = seeded.classes[0]
    store.add_labels(
        seeded.project,
        {seeded.pool_ids[0]: cat.id, seeded.evaluation_ids[0]: cat.id},
        annotator="ann",
    )
    pool = store.labels_frame(seeded.project, split="pool")
    evaluation = store.labels_frame(seeded.project, split="evaluation")
    assert pool.image_id.tolist() == [seeded.pool_ids[0]]
    assert evaluation.image_id.tolist() == [seeded.evaluation_ids[0]]


def test_add_labels_rejects_foreign_class(seeded: Seeded, store: Store) -> None:
    other = seed_project(store, "other")
    with pytest.raises(StoreError, match="not classes of project") as raised:
        store.add_labels(
            seeded.project,
            {seeded.pool_ids[0]: seeded.classes[0].id, seeded.pool_ids[1]: other.classes[0].id},
            annotator="ann",
        )
    assert str(other.classes[0].id) in str(raised.value)
    assert _count(store, "labels") == 0


def test_add_labels_rejects_foreign_or_skipped_image(seeded: Seeded, store: Store) -> None:
    other = seed_project(store, "other")
    cat = seeded.classes[0]
    with pytest.raises(StoreError, match="not images of project"):
        store.add_labels(seeded.project, {other.pool_ids[0]: cat.id}, annotator="ann")
    with pytest.raises(StoreError, match="cannot be labelled"):
        store.add_labels(seeded.project, {seeded.skipped_id: cat.id}, annotator="ann")
    with pytest.raises(InputError, match="invalid label source"):
        store.add_labels(
            seeded.project, {seeded.pool_ids[0]: cat.id}, annotator="a", source="guess"
        )
    assert _count(store, "labels") == 0


def test_database_rejects_cross_project_label(seeded: Seeded, store: Store) -> None:
    """The composite foreign keys hold even for SQL that bypasses the store."""
    other = seed_project(store, "other")
    statement = text(
        "INSERT INTO labels (project_id, image_id, class_id, annotator, created_at, source) "
        "VALUES (:project, :image, :class_id, 'x', :now, 'human')"
    )
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(
            statement,
            {
                "project": seeded.project.id,
                "image": seeded.pool_ids[0],
                "class_id": other.classes[0].id,
                "now": datetime.now(UTC),
            },
        )
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(
            statement,
            {
                "project": seeded.project.id,
                "image": other.pool_ids[0],
                "class_id": seeded.classes[0].id,
                "now": datetime.now(UTC),
            },
        )
    assert _count(store, "labels") == 0


def test_database_rejects_invalid_status(seeded: Seeded, store: Store) -> None:
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(
            text("UPDATE images SET status = 'broken' WHERE id = :id"),
            {"id": seeded.pool_ids[0]},
        )
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(
            text("UPDATE images SET reason = NULL WHERE id = :id"), {"id": seeded.skipped_id}
        )


# ---------------------------------------------------------------------- batches


def test_batch_round_trip(seeded: Seeded, store: Store) -> None:
    items = [
        NewBatchItem(seeded.pool_ids[2], score=0.9),
        NewBatchItem(seeded.evaluation_ids[0], purpose="evaluation"),
        NewBatchItem(seeded.pool_ids[0], score=0.4),
    ]
    batch = store.open_batch(
        seeded.project, "ann", items, kind="mixed", strategy="epig", round_index=3
    )
    assert batch.status == "open"
    assert batch.kind == "mixed"
    assert batch.round_index == 3
    assert batch.submitted_at is None
    assert batch.image_ids == [seeded.pool_ids[2], seeded.evaluation_ids[0], seeded.pool_ids[0]]
    assert [item.position for item in batch.items] == [0, 1, 2]
    assert [item.score for item in batch.items] == [0.9, None, 0.4]
    assert [item.purpose for item in batch.items] == ["acquisition", "evaluation", "acquisition"]
    assert batch.items[0].path == "pets/pool/2.png"
    assert store.get_batch(batch.id) == batch
    assert store.open_batches(seeded.project) == [batch]
    assert store.open_batches(seeded.project, annotator="ann") == [batch]
    assert store.open_batches(seeded.project, annotator="bob") == []


def test_submit_batch_writes_labels(seeded: Seeded, store: Store) -> None:
    cat, dog, _ = seeded.classes
    ids = seeded.pool_ids[:3]
    batch = store.open_batch(
        seeded.project, "ann", ids, kind="acquisition", strategy="power", round_index=0
    )
    submitted = store.submit_batch(batch.id, {ids[0]: cat.id, ids[1]: dog.id})

    assert submitted.status == "submitted"
    assert submitted.submitted_at is not None
    assert submitted.submitted_at >= batch.created_at
    labels = store.labels_frame(seeded.project)
    assert labels.image_id.tolist() == ids[:2]
    assert labels.class_name.tolist() == ["cat", "dog"]
    assert labels.batch_id.tolist() == [batch.id, batch.id]
    assert set(labels.annotator) == {"ann"}
    assert set(labels.source) == {"human"}
    assert store.open_batches(seeded.project) == []
    # The unlabelled image is free to be handed out again.
    again = store.open_batch(
        seeded.project, "bob", [ids[2]], kind="acquisition", strategy="power", round_index=1
    )
    assert again.image_ids == [ids[2]]


def test_submit_batch_twice_rejected(seeded: Seeded, store: Store) -> None:
    cat = seeded.classes[0]
    image = seeded.pool_ids[0]
    batch = store.open_batch(
        seeded.project, "ann", [image], kind="acquisition", strategy="s", round_index=0
    )
    store.submit_batch(batch.id, {image: cat.id})
    with pytest.raises(StoreError, match="already submitted"):
        store.submit_batch(batch.id, {image: cat.id})
    assert _count(store, "labels") == 1


def test_submit_expired_batch_rejected(seeded: Seeded, store: Store) -> None:
    image = seeded.pool_ids[0]
    batch = store.open_batch(
        seeded.project, "ann", [image], kind="acquisition", strategy="s", round_index=0
    )
    assert store.expire_batches(timedelta(0)) == [batch.id]
    with pytest.raises(StoreError, match="expired"):
        store.submit_batch(batch.id, {image: seeded.classes[0].id})
    assert _count(store, "labels") == 0
    assert store.get_batch(batch.id).status == "expired"


def test_submit_batch_foreign_class_writes_nothing(seeded: Seeded, store: Store) -> None:
    other = seed_project(store, "other")
    ids = seeded.pool_ids[:2]
    batch = store.open_batch(
        seeded.project, "ann", ids, kind="acquisition", strategy="s", round_index=0
    )
    with pytest.raises(StoreError, match="not classes of project"):
        store.submit_batch(batch.id, {ids[0]: seeded.classes[0].id, ids[1]: other.classes[0].id})
    assert _count(store, "labels") == 0
    assert store.get_batch(batch.id).status == "open"
    assert store.get_batch(batch.id).submitted_at is None


def test_submit_batch_failure_after_insert_rolls_back(
    seeded: Seeded, store: Store, request: pytest.FixtureRequest
) -> None:
    ids = seeded.pool_ids[:2]
    batch = store.open_batch(
        seeded.project, "ann", ids, kind="acquisition", strategy="s", round_index=0
    )
    request.getfixturevalue("failing_batch_update")

    with pytest.raises(StoreError, match="injected failure") as raised:
        store.submit_batch(batch.id, {ids[0]: seeded.classes[0].id, ids[1]: seeded.classes[1].id})
    assert raised.value.__cause__ is not None
    assert _count(store, "labels") == 0
    assert store.get_batch(batch.id).status == "open"


def test_submit_batch_image_outside_batch(seeded: Seeded, store: Store) -> None:
    batch = store.open_batch(
        seeded.project,
        "ann",
        seeded.pool_ids[:1],
        kind="acquisition",
        strategy="s",
        round_index=0,
    )
    cat = seeded.classes[0]
    with pytest.raises(StoreError, match="not in batch"):
        store.submit_batch(batch.id, {seeded.pool_ids[0]: cat.id, seeded.pool_ids[1]: cat.id})
    with pytest.raises(InputError, match="no labels given"):
        store.submit_batch(batch.id, {})
    with pytest.raises(StoreError, match="batch 9999 not found"):
        store.submit_batch(9999, {seeded.pool_ids[0]: cat.id})
    assert _count(store, "labels") == 0


def test_open_batch_validation(seeded: Seeded, store: Store) -> None:
    project = seeded.project
    open_batch = store.open_batch
    with pytest.raises(StoreError, match="not in the 'pool' split"):
        open_batch(
            project, "a", seeded.evaluation_ids[:1], kind="acquisition", strategy="s", round_index=0
        )
    with pytest.raises(StoreError, match="not in the 'evaluation' split"):
        open_batch(
            project, "a", seeded.pool_ids[:1], kind="evaluation", strategy="s", round_index=0
        )
    with pytest.raises(StoreError, match="cannot be handed out"):
        open_batch(
            project, "a", [seeded.skipped_id], kind="acquisition", strategy="s", round_index=0
        )
    with pytest.raises(InputError, match="Use the kind 'mixed'"):
        open_batch(
            project,
            "a",
            [NewBatchItem(seeded.evaluation_ids[0], purpose="evaluation")],
            kind="acquisition",
            strategy="s",
            round_index=0,
        )
    with pytest.raises(InputError, match="more than once"):
        open_batch(
            project, "a", [seeded.pool_ids[0]] * 2, kind="acquisition", strategy="s", round_index=0
        )
    with pytest.raises(InputError, match="items is empty"):
        open_batch(project, "a", [], kind="acquisition", strategy="s", round_index=0)
    with pytest.raises(InputError, match="score of image"):
        open_batch(
            project,
            "a",
            [NewBatchItem(seeded.pool_ids[0], score=float("nan"))],
            kind="acquisition",
            strategy="s",
            round_index=0,
        )
    with pytest.raises(InputError, match="invalid batch kind"):
        open_batch(project, "a", seeded.pool_ids[:1], kind="random", strategy="s", round_index=0)
    assert _count(store, "batches") == 0


def test_open_batch_rejects_images_in_open_batch(seeded: Seeded, store: Store) -> None:
    first = store.open_batch(
        seeded.project,
        "ann",
        seeded.pool_ids[:2],
        kind="acquisition",
        strategy="s",
        round_index=0,
    )
    with pytest.raises(StoreError, match=f"already in open batches {first.id}"):
        store.open_batch(
            seeded.project,
            "bob",
            seeded.pool_ids[1:3],
            kind="acquisition",
            strategy="s",
            round_index=0,
        )
    store.expire_batches(timedelta(0), project=seeded.project)
    second = store.open_batch(
        seeded.project,
        "bob",
        seeded.pool_ids[1:3],
        kind="acquisition",
        strategy="s",
        round_index=0,
    )
    assert second.status == "open"


def test_expire_batches_age_and_project(seeded: Seeded, store: Store) -> None:
    other = seed_project(store, "other")
    mine = store.open_batch(
        seeded.project,
        "ann",
        seeded.pool_ids[:1],
        kind="acquisition",
        strategy="s",
        round_index=0,
    )
    theirs = store.open_batch(
        other.project,
        "ann",
        other.pool_ids[:1],
        kind="acquisition",
        strategy="s",
        round_index=0,
    )
    assert store.expire_batches(timedelta(hours=1)) == []
    assert store.expire_batches(timedelta(0), project=seeded.project) == [mine.id]
    assert store.get_batch(theirs.id).status == "open"
    assert store.expire_batches(timedelta(0)) == [theirs.id]
    with pytest.raises(InputError, match="must not be negative"):
        store.expire_batches(timedelta(seconds=-1))


def test_concurrent_submits_store_one(seeded: Seeded, store: Store) -> None:
    """Two threads submit the same batch; exactly one succeeds and its labels are stored once."""
    ids = seeded.pool_ids[:2]
    batch = store.open_batch(
        seeded.project, "ann", ids, kind="acquisition", strategy="s", round_index=0
    )
    labels = {ids[0]: seeded.classes[0].id, ids[1]: seeded.classes[1].id}
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def submit() -> None:
        start.wait()
        try:
            store.submit_batch(batch.id, labels)
            outcomes.append("submitted")
        except StoreError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(outcomes)[1] == "submitted"
    assert "already submitted" in sorted(outcomes)[0]
    assert _count(store, "labels") == 2


# ---------------------------------------------------------------------- rounds


def test_rounds_round_trip(seeded: Seeded, store: Store) -> None:
    assert store.latest_round(seeded.project) is None
    zero = store.add_round(
        seeded.project,
        labels_spent=0,
        strategy="zero-shot",
        metrics={"bayes": {"accuracy": np.float32(0.25), "ece": 0.1}, "map": {"accuracy": 0.2}},
    )
    first = store.add_round(
        seeded.project,
        labels_spent=4,
        strategy="power",
        index=1,
        refit_seconds=1.5,
        prior_precision=2.0,
        metrics={"bayes": {"accuracy": 0.5}},
        note="after batch 1",
    )
    assert zero.index == 0
    assert zero.metrics == {"bayes": {"accuracy": 0.25, "ece": 0.1}, "map": {"accuracy": 0.2}}
    assert first.index == 1
    assert store.latest_round(seeded.project) == first

    frame = store.rounds_frame(seeded.project)
    assert frame["index"].tolist() == [0, 1]
    assert frame.labels_spent.tolist() == [0, 4]
    assert frame.metrics.iloc[1] == {"bayes": {"accuracy": 0.5}}
    assert np.isnan(frame.refit_seconds.iloc[0])
    assert frame.note.isna().tolist() == [True, False]
    assert frame.note.iloc[1] == "after batch 1"
    flat = pd.json_normalize(frame.metrics.tolist())
    assert flat["bayes.accuracy"].tolist() == [0.25, 0.5]


def test_add_round_validation(seeded: Seeded, store: Store) -> None:
    store.add_round(seeded.project, labels_spent=0, strategy="zero-shot", metrics={})
    with pytest.raises(StoreError, match="next round index is 1"):
        store.add_round(seeded.project, labels_spent=0, strategy="s", metrics={}, index=0)
    with pytest.raises(InputError, match="NaN or infinity"):
        store.add_round(seeded.project, labels_spent=1, strategy="s", metrics={"nll": float("inf")})
    with pytest.raises(InputError, match="greater than 0"):
        store.add_round(
            seeded.project, labels_spent=1, strategy="s", metrics={}, prior_precision=0.0
        )
    with pytest.raises(InputError, match="labels_spent must be at least 0"):
        store.add_round(seeded.project, labels_spent=-1, strategy="s", metrics={})
    assert len(store.rounds_frame(seeded.project)) == 1


def test_update_round_metrics(seeded: Seeded, store: Store) -> None:
    zero = store.add_round(seeded.project, labels_spent=0, strategy="s", metrics={"accuracy": 0.1})
    updated = store.update_round_metrics(zero.id, {"accuracy": np.float64(0.4)})
    assert updated.metrics == {"accuracy": 0.4}
    assert store.latest_round(seeded.project).metrics == {"accuracy": 0.4}
    with pytest.raises(StoreError, match="round id 999999 does not exist"):
        store.update_round_metrics(999_999, {})
    with pytest.raises(InputError, match="NaN or infinity"):
        store.update_round_metrics(zero.id, {"nll": float("nan")})
    assert store.latest_round(seeded.project).metrics == {"accuracy": 0.4}


# ---------------------------------------------------------------------- summary and scale


def test_summary_counts(seeded: Seeded, store: Store) -> None:
    cat, dog, _ = seeded.classes
    store.add_labels(seeded.project, {seeded.pool_ids[0]: cat.id}, annotator="a")
    store.add_labels(seeded.project, {seeded.pool_ids[0]: dog.id}, annotator="b")
    store.add_labels(seeded.project, {seeded.evaluation_ids[0]: dog.id}, annotator="b")
    store.open_batch(
        seeded.project, "a", seeded.pool_ids[1:2], kind="acquisition", strategy="s", round_index=0
    )
    store.add_round(seeded.project, labels_spent=1, strategy="s", metrics={})

    summary = store.summary(seeded.project)
    assert summary.images_ok == 8
    assert summary.images_skipped == 1
    assert summary.pool == 6
    assert summary.evaluation == 2
    assert summary.labelled_pool == 1
    assert summary.labelled_evaluation == 1
    assert summary.labels == 3
    assert summary.open_batches == 1
    assert summary.rounds == 1


def test_chunked_queries(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """More ids than one IN (...) chunk, so every chunked query runs several times."""
    monkeypatch.setattr(store_module, "IN_CHUNK", 7)
    count = 40
    project = store.create_project("big", model_spec="demo", factor_source="demo")
    store.add_images(project, [ok_record(f"{i}.png", format(i, "x")) for i in range(count)])
    ids = store.images_frame(project).id.tolist()
    classes = store.set_classes(project, ["a", "b"])

    store.assign_feature_rows(project, dict(zip(ids, range(count), strict=True)))
    # Reversing the order exchanges every row among the images.
    store.assign_feature_rows(project, dict(zip(ids, reversed(range(count)), strict=True)))
    assert store.set_split(project, ids[:25], "evaluation") == 25
    batch = store.open_batch(
        project, "ann", ids[25:], kind="acquisition", strategy="s", round_index=0
    )
    store.submit_batch(batch.id, {image_id: classes[0].id for image_id in ids[25:]})
    store.add_labels(project, {image_id: classes[1].id for image_id in ids[:25]}, annotator="b")

    frame = store.images_frame(project)
    assert frame.feature_row.tolist() == list(reversed(range(count)))
    assert (frame.split == "evaluation").sum() == 25
    assert len(store.labels_frame(project, latest_only=True)) == count
    with pytest.raises(StoreError, match="are not images of project"):
        store.set_split(project, [*ids, max(ids) + 1], "pool")

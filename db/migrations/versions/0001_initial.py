"""Create the initial schema: projects, classes, images, batches, labels and rounds.

Revision ID: 0001
Revises:
Create Date: 2026-12-04

The allowed values in the CHECK constraints are written out here instead of being read from
the enums in ``annotator.db.models``, so this migration keeps creating the same schema when
those enums change later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME_LENGTH = 200
STATUS_LENGTH = 16


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("model_spec", sa.Text(), nullable=False),
        sa.Column("factor_source", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_projects"),
        sa.UniqueConstraint("name", name="uq_projects_name"),
    )

    op.create_table(
        "classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("prompt", sa.JSON(none_as_null=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_classes"),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            ondelete="CASCADE",
            name="fk_classes_project_id_projects",
        ),
        sa.UniqueConstraint("project_id", "index", name="uq_classes_project_id_index"),
        sa.UniqueConstraint("project_id", "name", name="uq_classes_project_id_name"),
        sa.UniqueConstraint("project_id", "id", name="uq_classes_project_id_id"),
        sa.CheckConstraint('"index" >= 0', name="ck_classes_index_non_negative"),
    )

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(STATUS_LENGTH), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("split", sa.String(STATUS_LENGTH), nullable=False),
        sa.Column("feature_row", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            ondelete="CASCADE",
            name="fk_images_project_id_projects",
        ),
        sa.UniqueConstraint("project_id", "path", name="uq_images_project_id_path"),
        sa.UniqueConstraint("project_id", "id", name="uq_images_project_id_id"),
        sa.UniqueConstraint("project_id", "feature_row", name="uq_images_project_id_feature_row"),
        sa.CheckConstraint("status IN ('ok', 'skipped')", name="ck_images_status"),
        sa.CheckConstraint("split IN ('pool', 'evaluation')", name="ck_images_split"),
        sa.CheckConstraint(
            "(status = 'ok' AND reason IS NULL) OR (status = 'skipped' AND reason IS NOT NULL)",
            name="ck_images_reason_iff_skipped",
        ),
        sa.CheckConstraint(
            "feature_row IS NULL OR (status = 'ok' AND feature_row >= 0)",
            name="ck_images_feature_row_only_ok",
        ),
        sa.CheckConstraint("width IS NULL OR width > 0", name="ck_images_width_positive"),
        sa.CheckConstraint("height IS NULL OR height > 0", name="ck_images_height_positive"),
    )
    op.create_index(
        "ix_images_project_id_status_split", "images", ["project_id", "status", "split"]
    )

    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("annotator", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("kind", sa.String(STATUS_LENGTH), nullable=False),
        sa.Column("strategy", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("status", sa.String(STATUS_LENGTH), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("round_index", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            ondelete="CASCADE",
            name="fk_batches_project_id_projects",
        ),
        sa.CheckConstraint(
            "kind IN ('acquisition', 'evaluation', 'mixed')", name="ck_batches_kind"
        ),
        sa.CheckConstraint("status IN ('open', 'submitted', 'expired')", name="ck_batches_status"),
        sa.CheckConstraint(
            "(status = 'submitted') = (submitted_at IS NOT NULL)",
            name="ck_batches_submitted_at_iff_submitted",
        ),
        sa.CheckConstraint("round_index >= 0", name="ck_batches_round_index_non_negative"),
    )
    op.create_index("ix_batches_project_id_status", "batches", ["project_id", "status"])

    op.create_table(
        "batch_items",
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("purpose", sa.String(STATUS_LENGTH), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "image_id", name="pk_batch_items"),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            ondelete="CASCADE",
            name="fk_batch_items_batch_id_batches",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            ondelete="CASCADE",
            name="fk_batch_items_image_id_images",
        ),
        sa.UniqueConstraint("batch_id", "position", name="uq_batch_items_batch_id_position"),
        sa.CheckConstraint(
            "purpose IN ('acquisition', 'evaluation')", name="ck_batch_items_purpose"
        ),
        sa.CheckConstraint("position >= 0", name="ck_batch_items_position_non_negative"),
    )
    op.create_index("ix_batch_items_image_id", "batch_items", ["image_id"])

    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("annotator", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(STATUS_LENGTH), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_labels"),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            ondelete="CASCADE",
            name="fk_labels_project_id_projects",
        ),
        sa.ForeignKeyConstraint(
            ["project_id", "image_id"],
            ["images.project_id", "images.id"],
            ondelete="CASCADE",
            name="fk_labels_project_id_image_id_images",
        ),
        sa.ForeignKeyConstraint(
            ["project_id", "class_id"],
            ["classes.project_id", "classes.id"],
            ondelete="CASCADE",
            name="fk_labels_project_id_class_id_classes",
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            ondelete="SET NULL",
            name="fk_labels_batch_id_batches",
        ),
        sa.CheckConstraint("source IN ('human', 'oracle', 'import')", name="ck_labels_source"),
    )
    op.create_index("ix_labels_project_id_image_id", "labels", ["project_id", "image_id"])
    op.create_index("ix_labels_batch_id", "labels", ["batch_id"])

    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("labels_spent", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refit_seconds", sa.Float(), nullable=True),
        sa.Column("prior_precision", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rounds"),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            ondelete="CASCADE",
            name="fk_rounds_project_id_projects",
        ),
        sa.UniqueConstraint("project_id", "index", name="uq_rounds_project_id_index"),
        sa.CheckConstraint('"index" >= 0', name="ck_rounds_index_non_negative"),
        sa.CheckConstraint("labels_spent >= 0", name="ck_rounds_labels_spent_non_negative"),
    )


def downgrade() -> None:
    op.drop_table("rounds")
    op.drop_index("ix_labels_batch_id", table_name="labels")
    op.drop_index("ix_labels_project_id_image_id", table_name="labels")
    op.drop_table("labels")
    op.drop_index("ix_batch_items_image_id", table_name="batch_items")
    op.drop_table("batch_items")
    op.drop_index("ix_batches_project_id_status", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_images_project_id_status_split", table_name="images")
    op.drop_table("images")
    op.drop_table("classes")
    op.drop_table("projects")

"""feedback and datasets: labels for logged predictions, the serving log's index, datasets

- feedback: one ground-truth label per (model, request id); a different label replaces it.
- logged_predictions: the serving log's requests (instances, predictions), indexed from the
  store; unique (model_id, request_id).
- serving_log_objects: the serving-log objects already indexed; unique (model_id, key).
- serving_log_cursors: how far each model's serving-log hours were listed.
- datasets, dataset_versions: named training datasets and their builds.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 08:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def _model_fk() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("label", sa.JSON(), nullable=False),
        sa.Column("label_key", sa.String(length=64), nullable=False),
        sa.Column("labelled_at", _TZ, nullable=False),
        sa.Column("received_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.Column("by", sa.String(length=64), nullable=False),
        _model_fk(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "request_id", name="uq_feedback_request"),
    )
    op.create_table(
        "serving_log_objects",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("indexed", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("indexed_at", _TZ, nullable=False),
        _model_fk(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "key", name="uq_serving_log_objects_key"),
    )
    op.create_table(
        "logged_predictions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("at", _TZ, nullable=False),
        sa.Column("instances", sa.JSON(), nullable=False),
        sa.Column("predictions", sa.JSON(), nullable=True),
        sa.Column("source_id", sa.Integer(), nullable=True),
        _model_fk(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "request_id", name="uq_logged_predictions_request"),
    )
    op.create_index(
        "ix_logged_predictions_model_version",
        "logged_predictions",
        ["model_id", "version", "id"],
        unique=False,
    )
    op.create_index(
        "ix_logged_predictions_model_at", "logged_predictions", ["model_id", "at"], unique=False
    )
    op.create_table(
        "serving_log_cursors",
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("listed_through", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        _model_fk(),
        sa.PrimaryKeyConstraint("model_id"),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("next_version", sa.Integer(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "name", name="uq_datasets_project_name"),
    )
    op.create_index("ix_datasets_project_id", "datasets", ["project_id"], unique=False)
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("prefix_uri", sa.Text(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("lease_until", _TZ, nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_version"),
    )
    op.create_index(
        "ix_dataset_versions_dataset_id", "dataset_versions", ["dataset_id"], unique=False
    )
    op.create_index("ix_dataset_versions_state", "dataset_versions", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dataset_versions_state", table_name="dataset_versions")
    op.drop_index("ix_dataset_versions_dataset_id", table_name="dataset_versions")
    op.drop_table("dataset_versions")
    op.drop_index("ix_datasets_project_id", table_name="datasets")
    op.drop_table("datasets")
    op.drop_table("serving_log_cursors")
    op.drop_index("ix_logged_predictions_model_at", table_name="logged_predictions")
    op.drop_index("ix_logged_predictions_model_version", table_name="logged_predictions")
    op.drop_table("logged_predictions")
    op.drop_table("serving_log_objects")
    op.drop_table("feedback")

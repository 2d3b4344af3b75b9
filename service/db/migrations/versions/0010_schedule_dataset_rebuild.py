"""schedules that rebuild a dataset before each slot's job

- schedules.dataset: the dataset each slot rebuilds first (None: the slot starts its job at
  once, as before).
- schedule_runs.dataset_version_id, dataset_version: the version a slot rebuilt; the slot's
  outcome is `building` until that version is READY (the job starts) or FAILED.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 08:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("schedules") as batch:
        batch.add_column(sa.Column("dataset", sa.String(length=63), nullable=True))
    with op.batch_alter_table("schedule_runs") as batch:
        batch.add_column(sa.Column("dataset_version_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("dataset_version", sa.Integer(), nullable=True))
    op.create_index(
        "ix_schedule_runs_building",
        "schedule_runs",
        ["outcome"],
        postgresql_where=sa.text("outcome = 'building'"),
    )


def downgrade() -> None:
    op.drop_index("ix_schedule_runs_building", table_name="schedule_runs")
    with op.batch_alter_table("schedule_runs") as batch:
        batch.drop_column("dataset_version")
        batch.drop_column("dataset_version_id")
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("dataset")

"""schedules: cron schedules of job templates, and the slots they handled

- schedules: a project's cron expression (with its time zone), the job spec each slot
  submits, its policies (concurrency, catchup, max_catchup), paused, and where the firing
  stands (handled_until, next_fire_at).
- schedule_runs: one row per slot handled (started, skipped or failed); the unique
  (schedule_id, fire_time) is what makes a slot fire at most once.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 19:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), server_default="UTC", nullable=False),
        sa.Column("job", sa.JSON(), nullable=False),
        sa.Column("concurrency", sa.String(length=16), nullable=False),
        sa.Column("catchup", sa.String(length=8), nullable=False),
        sa.Column("max_catchup", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("handled_until", _TZ, nullable=False),
        sa.Column("next_fire_at", _TZ, nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "name", name="uq_schedules_project_name"),
    )
    op.create_index("ix_schedules_project_id", "schedules", ["project_id"], unique=False)
    op.create_index(
        "ix_schedules_due",
        "schedules",
        ["next_fire_at"],
        unique=False,
        postgresql_where=sa.text("NOT paused"),
    )

    op.create_table(
        "schedule_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("schedule_id", sa.String(length=40), nullable=False),
        sa.Column("fire_time", _TZ, nullable=False),
        sa.Column("recorded_at", _TZ, nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("missed", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["schedule_id"], ["schedules.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule_id", "fire_time", name="uq_schedule_runs_slot"),
    )
    op.create_index("ix_schedule_runs_job", "schedule_runs", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_schedule_runs_job", table_name="schedule_runs")
    op.drop_table("schedule_runs")
    op.drop_index("ix_schedules_due", table_name="schedules")
    op.drop_index("ix_schedules_project_id", table_name="schedules")
    op.drop_table("schedules")

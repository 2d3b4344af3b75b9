"""hyperparameter tuning: a trial is a job with a parent

- jobs.parent_id: the tuning job a trial belongs to (NULL for any other job); a trial outlives
  its tuning job's row (SET NULL) as a job of its own.
- jobs.trial: the trial's number in its tuning job (1-based), unique per tuning job.
- jobs.trial_stopped: the median rule stopped (cancelled) the trial.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 22:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("trial", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("trial_stopped", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_foreign_key(
            "fk_jobs_parent_id", "jobs", ["parent_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_unique_constraint("uq_jobs_parent_trial", ["parent_id", "trial"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_parent_trial", type_="unique")
        batch.drop_constraint("fk_jobs_parent_id", type_="foreignkey")
        batch.drop_column("trial_stopped")
        batch.drop_column("trial")
        batch.drop_column("parent_id")

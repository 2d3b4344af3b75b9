"""per-replica metrics and events

- replica_metrics: the metric lines of a job's servers other than the chief (a distributed
  job's worker-<k>, a batch prediction job's workers), per replica; the job's own `metrics`
  stay the chief's.
- job_events.replica: the replica an event is about (NULL: the job as a whole).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 22:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replica_metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("replica", sa.SmallInteger(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "job_id", "replica", "log_offset", "name", name="uq_replica_metrics_point"
        ),
    )
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("replica", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("replica")
    op.drop_table("replica_metrics")

"""per-replica logs

- replica_log_chunks: the logs of a job's servers other than the chief (a distributed job's
  replicas worker-1.., a batch prediction job's workers), one stream per replica.
- resources.log_offset: the bytes of that server's log file stored so far.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 18:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replica_log_chunks",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("replica", sa.SmallInteger(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "replica", "offset"),
    )
    with op.batch_alter_table("resources") as batch:
        batch.add_column(
            sa.Column("log_offset", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("log_offset")
    op.drop_table("replica_log_chunks")

"""restartable training jobs

- jobs.restarts: how many times the trainer was restarted on a new server (restart_policy).
- jobs.log_base: the job's log offset where the current server's log file starts (each server
  writes its log from 0; the job's log goes on across restarts).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 07:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("restarts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("log_base", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("log_base")
        batch.drop_column("restarts")

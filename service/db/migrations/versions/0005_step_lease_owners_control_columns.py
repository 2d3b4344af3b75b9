"""step lease, resource owners, control state in columns

- jobs.step_lease_owner / step_lease_until: the step in progress holds the job (heartbeat);
  the reconciler re-drives nothing while the lease is live.
- jobs.queue_wait: why a QUEUED job waits ('parked' by admission, 'backoff' after a cloud
  quota refusal), instead of reading the prose of queue_reason.
- jobs.export_baseline: the output prefix's objects when the job's first export began (a
  failed export removes only what appeared or changed since).
- jobs.ssh_failing_since: when SSH to the job's server started failing in its state, instead
  of scanning the events for "SSH failed".
- resources.creating: the claim of the allocate run that boots the server, instead of a
  server_id of 'creating:<token>'.
- resources.owner_kind / owner_id: who owns a server ('job' and the job id for every row
  today; model-serving endpoints own servers the same way).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 16:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("step_lease_owner", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("step_lease_until", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("queue_wait", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("ssh_failing_since", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("export_baseline", sa.JSON(), nullable=True))
    op.execute(
        "UPDATE jobs SET queue_wait = 'parked' "
        "WHERE state = 'QUEUED' AND queue_reason LIKE 'waiting%'"
    )
    op.execute(
        "UPDATE jobs SET queue_wait = 'backoff' "
        "WHERE state = 'QUEUED' AND queue_reason IS NOT NULL AND queue_reason NOT LIKE 'waiting%'"
    )
    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.add_column(sa.Column("creating", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("owner_kind", sa.String(length=16), nullable=False, server_default="job")
        )
        batch_op.add_column(sa.Column("owner_id", sa.String(length=64), nullable=True))
    op.execute("UPDATE resources SET owner_id = job_id")
    op.execute(
        "UPDATE resources SET creating = substr(server_id, 10), server_id = NULL "
        "WHERE server_id LIKE 'creating:%'"
    )
    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.alter_column("owner_id", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index("ix_resources_owner", ["owner_kind", "owner_id"], unique=False)


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it): a batch "move and copy" of
    # jobs would drop the table, and ON DELETE CASCADE would empty its children with it
    op.execute(
        "UPDATE resources SET server_id = 'creating:' || creating "
        "WHERE creating IS NOT NULL AND server_id IS NULL"
    )
    op.drop_index("ix_resources_owner", table_name="resources")
    for column in ("owner_id", "owner_kind", "creating"):
        op.drop_column("resources", column)
    for column in (
        "export_baseline",
        "ssh_failing_since",
        "queue_wait",
        "step_lease_until",
        "step_lease_owner",
    ):
        op.drop_column("jobs", column)

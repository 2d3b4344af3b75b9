"""evaluation gate: model_evaluations, and the kind of a label history row

- model_evaluations: a job's gate for the version it registered: the state of the evaluation
  (PENDING, BOOTING, SCORING, DONE), the evaluator's server (a resources row of the job), its
  SSH key (encrypted), the champion, both scores, the holdout's rows and objects, the decision
  and its reason, a step lease.
- model_label_history.kind: move | rollback | refusal (a gate that left the label where it was).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 08:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "model_label_history",
        sa.Column("kind", sa.String(length=16), server_default="move", nullable=False),
    )
    op.create_table(
        "model_evaluations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("gate", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("resource_id", sa.Integer(), nullable=True),
        sa.Column("ssh_key_enc", sa.LargeBinary(), nullable=True),
        sa.Column("ssh_public_key", sa.Text(), nullable=True),
        sa.Column("champion_version", sa.Integer(), nullable=True),
        sa.Column("candidate_score", sa.Float(), nullable=True),
        sa.Column("champion_score", sa.Float(), nullable=True),
        sa.Column("holdout_rows", sa.Integer(), nullable=True),
        sa.Column("holdout", sa.JSON(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("step_lease_owner", sa.String(length=64), nullable=True),
        sa.Column("step_lease_until", _TZ, nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.Column("finished_at", _TZ, nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_model_evaluations_version_id", "model_evaluations", ["version_id"], unique=False
    )
    op.create_index("ix_model_evaluations_job_id", "model_evaluations", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_model_evaluations_job_id", table_name="model_evaluations")
    op.drop_index("ix_model_evaluations_version_id", table_name="model_evaluations")
    op.drop_table("model_evaluations")
    with op.batch_alter_table("model_label_history") as batch_op:
        batch_op.drop_column("kind")

"""model registry and serving: models, versions, labels (+ history), endpoints, replicas

- models, model_versions, model_labels, model_label_history (append-only): the registry.
- endpoints: a model's online-prediction endpoint (at most one not DELETED per model).
- resources: job_id becomes nullable (an endpoint's replicas have no job); a replica's model
  version, REST port (serving_port), replica_state, ready_at, last_health_at, health_failures.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 16:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("next_version", sa.Integer(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "name", name="uq_models_project_name"),
    )
    op.create_index("ix_models_project_id", "models", ["project_id"], unique=False)

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("checksums", sa.JSON(), nullable=False),
        sa.Column("signature", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("source_job_id", sa.String(length=40), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
    )
    op.create_index("ix_model_versions_model_id", "model_versions", ["model_id"], unique=False)

    op.create_table(
        "model_labels",
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "name"),
    )

    op.create_table(
        "model_label_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("label", sa.String(length=63), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("at", _TZ, nullable=False),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("why", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_model_label_history_model_at",
        "model_label_history",
        ["model_id", "at", "id"],
        unique=False,
    )

    op.create_table(
        "endpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=63), server_default="default", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("target_label", sa.String(length=63), nullable=True),
        sa.Column("target_version", sa.Integer(), nullable=True),
        sa.Column("serving_version", sa.Integer(), nullable=True),
        sa.Column("traffic", sa.JSON(), nullable=True),
        sa.Column("replicas", sa.Integer(), nullable=False),
        sa.Column("flavor", sa.String(length=64), nullable=False),
        sa.Column("log_sample_rate", sa.Float(), server_default="0", nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("ssh_key_enc", sa.LargeBinary(), nullable=True),
        sa.Column("ssh_public_key", sa.Text(), nullable=True),
        sa.Column("trust_id", sa.String(length=64), nullable=True),
        sa.Column("step_lease_owner", sa.String(length=64), nullable=True),
        sa.Column("step_lease_until", _TZ, nullable=True),
        sa.Column("last_progress_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_endpoints_project_id", "endpoints", ["project_id"], unique=False)
    op.create_index("ix_endpoints_model_id", "endpoints", ["model_id"], unique=False)
    op.create_index("ix_endpoints_state", "endpoints", ["state"], unique=False)
    op.create_index(
        "uq_endpoints_model_live",
        "endpoints",
        ["model_id"],
        unique=True,
        postgresql_where=sa.text("state <> 'DELETED'"),
        sqlite_where=sa.text("state <> 'DELETED'"),
    )

    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=True)
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("serving_port", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("replica_state", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("ready_at", _TZ, nullable=True))
        batch_op.add_column(sa.Column("last_health_at", _TZ, nullable=True))
        batch_op.add_column(
            sa.Column("health_failures", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    # an endpoint's replicas have no job: they cannot stay in a table whose job_id is NOT NULL
    op.execute("DELETE FROM resources WHERE job_id IS NULL")
    for column in (
        "health_failures",
        "last_health_at",
        "ready_at",
        "replica_state",
        "serving_port",
        "version",
    ):
        op.drop_column("resources", column)
    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=False)
    op.drop_index("uq_endpoints_model_live", table_name="endpoints")
    op.drop_index("ix_endpoints_state", table_name="endpoints")
    op.drop_index("ix_endpoints_model_id", table_name="endpoints")
    op.drop_index("ix_endpoints_project_id", table_name="endpoints")
    op.drop_table("endpoints")
    op.drop_index("ix_model_label_history_model_at", table_name="model_label_history")
    op.drop_table("model_label_history")
    op.drop_table("model_labels")
    op.drop_index("ix_model_versions_model_id", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index("ix_models_project_id", table_name="models")
    op.drop_table("models")

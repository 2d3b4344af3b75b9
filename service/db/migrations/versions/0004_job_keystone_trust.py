"""job keystone trust: the trust a job's workers act through in the submitter's project

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 03:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('trust_id', sa.String(length=64), nullable=True))
    op.create_index(
        'ix_jobs_trust_owed', 'jobs', ['state'], postgresql_where=sa.text('trust_id IS NOT NULL')
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_trust_owed', table_name='jobs')
    op.drop_column('jobs', 'trust_id')

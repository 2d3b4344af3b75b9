"""quotas and fair share: per-project quota overrides, last admission per project

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 00:48:05.909094
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('fair_share',
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('last_admitted_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('admitted', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('project_id')
    )
    op.create_table('quotas',
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('jobs', sa.Integer(), nullable=True),
    sa.Column('servers', sa.Integer(), nullable=True),
    sa.Column('gpus', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('project_id')
    )


def downgrade() -> None:
    op.drop_table('quotas')
    op.drop_table('fair_share')

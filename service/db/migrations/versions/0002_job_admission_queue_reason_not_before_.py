"""job admission: queue reason, not before, allocation attempt

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 00:15:03.288677
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('alloc_attempt', sa.Integer(), nullable=False, server_default='0'))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('alloc_attempt')
        batch_op.drop_column('not_before')
        batch_op.drop_column('queue_reason')


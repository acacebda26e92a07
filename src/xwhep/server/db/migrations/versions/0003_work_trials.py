"""works.trials: the attempt count, kept by the claim itself (it was a count over tasks at every claim)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("works", sa.Column("trials", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.execute("UPDATE works SET trials = (SELECT count(*) FROM tasks WHERE tasks.work = works.uid)")


def downgrade() -> None:
    with op.batch_alter_table("works") as batch:
        batch.drop_column("trials")

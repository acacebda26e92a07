"""mandates: a user's mandate to a MANDATED_USER to act on its behalf

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mandates",
        sa.Column("uid", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(36), nullable=True),
        sa.Column("access_rights", sa.Integer(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("modified", sa.Float(), nullable=False),
        sa.Column("mandator", sa.String(36), nullable=False),
        sa.Column("mandatary", sa.String(36), nullable=False),
        sa.Column("expires", sa.Float(), nullable=True),
        sa.UniqueConstraint("mandator", "mandatary", name="uq_mandates_pair"),
    )
    op.create_index("ix_mandates_owner", "mandates", ["owner"])
    op.create_index("ix_mandates_mandatary", "mandates", ["mandatary"])


def downgrade() -> None:
    op.drop_index("ix_mandates_mandatary", table_name="mandates")
    op.drop_index("ix_mandates_owner", table_name="mandates")
    op.drop_table("mandates")

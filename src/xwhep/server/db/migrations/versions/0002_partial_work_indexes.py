"""partial indexes on works.grp, works.session, works.replica_of

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

COLUMNS = ("grp", "session", "replica_of")


def upgrade() -> None:
    for col in COLUMNS:
        op.drop_index(f"ix_works_{col}", table_name="works")
        op.create_index(f"ix_works_{col}", "works", [col], unique=False,
                        sqlite_where=sa.text(f"{col} IS NOT NULL"), postgresql_where=sa.text(f"{col} IS NOT NULL"))


def downgrade() -> None:
    for col in COLUMNS:
        op.drop_index(f"ix_works_{col}", table_name="works")
        op.create_index(f"ix_works_{col}", "works", [col], unique=False)

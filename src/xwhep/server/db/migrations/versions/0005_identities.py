"""per-host keys and durable token revocation

hosts.key_hash: the sha256 of the host's own key, issued at registration (each host its own identity);
users.tokens_after: tokens issued before this time no longer count (password change, reset, revocation).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("hosts", sa.Column("key_hash", sa.String(64), nullable=True))
    op.add_column("users", sa.Column("tokens_after", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("tokens_after")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("key_hash")

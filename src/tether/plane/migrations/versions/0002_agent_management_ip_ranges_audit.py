"""Agent deletion tombstones, allowed IP ranges and the audit log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tether.plane.models import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tether_agent") as batch:
        batch.add_column(sa.Column("deleted_at", UtcDateTime(), nullable=True))
        batch.add_column(sa.Column("deleted_by", sa.String(256), nullable=True))
    op.create_table(
        "tether_allowed_ip_range",
        sa.Column("cidr", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=True),
        sa.PrimaryKeyConstraint("cidr", name="tether_allowed_ip_range_pkey"),
    )
    op.create_table(
        "tether_audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(256), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="tether_audit_log_pkey"),
    )
    op.create_index("idx_tether_audit_log_at", "tether_audit_log", ["at"])


def downgrade() -> None:
    op.drop_index("idx_tether_audit_log_at", table_name="tether_audit_log")
    op.drop_table("tether_audit_log")
    op.drop_table("tether_allowed_ip_range")
    with op.batch_alter_table("tether_agent") as batch:
        batch.drop_column("deleted_by")
        batch.drop_column("deleted_at")

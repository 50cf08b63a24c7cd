"""DAG processing on agents: bundles and their owner, the latest result per file, work claims.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tether.plane.models import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tether_bundle",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_id", sa.String(16), nullable=False),
        sa.Column("first_agent", sa.String(128), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("last_sync_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="tether_bundle_pkey"),
    )
    op.create_table(
        "tether_dag_file",
        sa.Column("bundle_name", sa.String(200), nullable=False),
        sa.Column("relative_fileloc", sa.String(1024), nullable=False),
        sa.Column("digest", sa.String(128), nullable=False),
        sa.Column("dag_hashes", sa.JSON(), nullable=False),
        sa.Column("incarnation", sa.String(36), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("bundle_name", "relative_fileloc", name="tether_dag_file_pkey"),
    )
    op.create_table(
        "tether_work_claim",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("work", sa.JSON(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="tether_work_claim_pkey"),
    )
    op.create_index("idx_tether_work_claim_created_at", "tether_work_claim", ["created_at"])


def downgrade() -> None:
    op.drop_index("idx_tether_work_claim_created_at", table_name="tether_work_claim")
    op.drop_table("tether_work_claim")
    op.drop_table("tether_dag_file")
    op.drop_table("tether_bundle")

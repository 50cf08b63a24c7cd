"""Task logs shipped by agents: one row per try, one per batch of lines; each agent's log mode.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tether.plane.models import UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tether_agent") as batch:
        batch.add_column(sa.Column("task_logs", sa.String(16), nullable=True))
        batch.add_column(sa.Column("task_log_folder", sa.String(1024), nullable=True))
    op.create_table(
        "tether_task_log",
        sa.Column("ti_id", sa.String(36), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("map_index", sa.Integer(), nullable=False),
        sa.Column("agent_name", sa.String(128), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.BigInteger(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.Column("first_at", UtcDateTime(), nullable=False),
        sa.Column("last_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("ti_id", "try_number", name="tether_task_log_pkey"),
    )
    op.create_index("idx_tether_task_log_last_at", "tether_task_log", ["last_at"])
    op.create_table(
        "tether_task_log_chunk",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("ti_id", sa.String(36), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("segment", sa.String(36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("received_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="tether_task_log_chunk_pkey"),
    )
    op.create_index(
        "idx_tether_task_log_chunk_batch",
        "tether_task_log_chunk",
        ["ti_id", "try_number", "segment", "seq"],
        unique=True,
    )
    op.create_index("idx_tether_task_log_chunk_read", "tether_task_log_chunk", ["ti_id", "try_number", "id"])


def downgrade() -> None:
    op.drop_index("idx_tether_task_log_chunk_read", table_name="tether_task_log_chunk")
    op.drop_index("idx_tether_task_log_chunk_batch", table_name="tether_task_log_chunk")
    op.drop_table("tether_task_log_chunk")
    op.drop_index("idx_tether_task_log_last_at", table_name="tether_task_log")
    op.drop_table("tether_task_log")
    with op.batch_alter_table("tether_agent") as batch:
        batch.drop_column("task_log_folder")
        batch.drop_column("task_logs")

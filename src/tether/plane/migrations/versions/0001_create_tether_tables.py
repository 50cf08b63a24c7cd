"""Create Tether's tables: agent tokens, agents and jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tether.plane.models import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tether_agent_token",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.String(1024), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=True),
        sa.Column("expires_at", UtcDateTime(), nullable=True),
        sa.Column("last_used_at", UtcDateTime(), nullable=True),
        sa.Column("revoked_at", UtcDateTime(), nullable=True),
        sa.Column("revoked_by", sa.String(256), nullable=True),
        sa.PrimaryKeyConstraint("id", name="tether_agent_token_pkey"),
    )
    op.create_table(
        "tether_agent",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("incarnation", sa.String(36), nullable=False),
        sa.Column("token_id", sa.String(16), nullable=False),
        sa.Column("hostname", sa.String(256), nullable=False),
        sa.Column("tether_version", sa.String(64), nullable=False),
        sa.Column("airflow_version", sa.String(64), nullable=False),
        sa.Column("python_version", sa.String(64), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("free_slots", sa.Integer(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("cordoned", sa.Boolean(), nullable=False),
        sa.Column("cordon_reason", sa.String(1024), nullable=True),
        sa.Column("cordoned_by", sa.String(256), nullable=True),
        sa.Column("cordoned_at", UtcDateTime(), nullable=True),
        sa.Column("first_seen", UtcDateTime(), nullable=False),
        sa.Column("registered_at", UtcDateTime(), nullable=False),
        sa.Column("last_heartbeat", UtcDateTime(), nullable=False),
        sa.Column("heartbeat_interval", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="tether_agent_pkey"),
        sa.UniqueConstraint("name", name="uq_tether_agent_name"),
    )
    op.create_table(
        "tether_job",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("ti_id", sa.String(36), nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("map_index", sa.Integer(), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(256), nullable=False),
        sa.Column("pool_slots", sa.Integer(), nullable=False),
        sa.Column("priority_weight", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("workload", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.String(36), nullable=True),
        sa.Column("agent_name", sa.String(128), nullable=True),
        sa.Column("incarnation", sa.String(36), nullable=True),
        sa.Column("lease_expires_at", UtcDateTime(), nullable=True),
        sa.Column("queued_at", UtcDateTime(), nullable=False),
        sa.Column("leased_at", UtcDateTime(), nullable=True),
        sa.Column("started_at", UtcDateTime(), nullable=True),
        sa.Column("finished_at", UtcDateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(1024), nullable=True),
        sa.PrimaryKeyConstraint("id", name="tether_job_pkey"),
    )
    op.create_index("idx_tether_job_claim", "tether_job", ["state", "queue", "priority_weight", "queued_at"])
    op.create_index("idx_tether_job_ti", "tether_job", ["ti_id", "try_number"], unique=True)
    op.create_index("idx_tether_job_agent", "tether_job", ["agent_id", "state"])


def downgrade() -> None:
    op.drop_index("idx_tether_job_agent", table_name="tether_job")
    op.drop_index("idx_tether_job_ti", table_name="tether_job")
    op.drop_index("idx_tether_job_claim", table_name="tether_job")
    op.drop_table("tether_job")
    op.drop_table("tether_agent")
    op.drop_table("tether_agent_token")

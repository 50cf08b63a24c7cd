"""Triggerer agents: the Airflow triggerer job of each agent process, the outcomes written, the tries logged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tether.plane.models import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tether_triggerer",
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("incarnation", sa.String(36), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("beat_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name="tether_triggerer_pkey"),
    )
    op.create_table(
        "tether_trigger_outcome",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("trigger_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="tether_trigger_outcome_pkey"),
    )
    op.create_index("idx_tether_trigger_outcome_at", "tether_trigger_outcome", ["at"])
    op.create_table(
        "tether_trigger_run",
        sa.Column("trigger_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("ti_id", sa.String(36), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("trigger_id", "job_id", name="tether_trigger_run_pkey"),
    )
    op.create_index("idx_tether_trigger_run_at", "tether_trigger_run", ["at"])


def downgrade() -> None:
    op.drop_index("idx_tether_trigger_run_at", table_name="tether_trigger_run")
    op.drop_table("tether_trigger_run")
    op.drop_index("idx_tether_trigger_outcome_at", table_name="tether_trigger_outcome")
    op.drop_table("tether_trigger_outcome")
    op.drop_table("tether_triggerer")

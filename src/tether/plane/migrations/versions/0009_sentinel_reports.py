"""Sentinel reports: the latest report of each namespace's sentinel on the agents' pods.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tether.plane.models import UtcDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tether_sentinel_report",
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("sentinel", sa.String(128), nullable=False),
        sa.Column("token_id", sa.String(16), nullable=False),
        sa.Column("received_at", UtcDateTime(), nullable=False),
        sa.Column("interval", sa.Float(), nullable=False),
        sa.Column("pods", sa.JSON(), nullable=False),
        sa.Column("backends", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("namespace", name="tether_sentinel_report_pkey"),
    )


def downgrade() -> None:
    op.drop_table("tether_sentinel_report")

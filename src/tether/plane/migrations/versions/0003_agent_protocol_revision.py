"""The protocol revision each agent speaks.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every agent registered so far is a Tether 0.1 agent, which speaks revision 1.
    with op.batch_alter_table("tether_agent") as batch:
        batch.add_column(sa.Column("protocol", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("tether_agent") as batch:
        batch.drop_column("protocol")

"""Jobs of other kinds than tasks: the callbacks and connection tests Airflow hands its executor.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tether_job") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="task"))


def downgrade() -> None:
    with op.batch_alter_table("tether_job") as batch:
        batch.drop_column("kind")

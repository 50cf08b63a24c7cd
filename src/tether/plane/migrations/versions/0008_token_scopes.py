"""Token scopes: the roles a token's agents may serve, and the DAG bundles its dag-processors may write.

Tokens made before scopes keep working as worker tokens.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tether_agent_token") as batch:
        batch.add_column(sa.Column("scopes", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("bundles", sa.JSON(), nullable=True))
    op.execute("""UPDATE tether_agent_token SET scopes = '["worker"]'""")
    with op.batch_alter_table("tether_agent_token") as batch:
        batch.alter_column("scopes", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("tether_agent_token") as batch:
        batch.drop_column("bundles")
        batch.drop_column("scopes")

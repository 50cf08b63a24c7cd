"""Tether's DB manager: ``airflow db migrate`` runs our Alembic chain with it."""

from __future__ import annotations

from pathlib import Path

from airflow.utils.db_manager import BaseDBManager

from tether.plane.models import metadata

_HERE = Path(__file__).parent


class TetherDBManager(BaseDBManager):
    """Creates and migrates the ``tether_*`` tables, versioned in ``alembic_version_tether``."""

    metadata = metadata
    version_table_name = "alembic_version_tether"
    migration_dir = (_HERE / "migrations").as_posix()
    alembic_file = (_HERE / "alembic.ini").as_posix()
    supports_table_dropping = True
    revision_heads_map = {"0.1.0": "0002", "0.2.0": "0009"}

"""Tether's Alembic chain: head matches the models, and downgrade round-trips."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from tether.plane.db import TetherDBManager
from tether.plane.models import metadata


def _config(url: str) -> Config:
    config = Config(TetherDBManager.alembic_file)
    config.set_main_option("script_location", TetherDBManager.migration_dir)
    config.set_main_option("sqlalchemy.url", url)
    return config


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": TetherDBManager.version_table_name, "compare_type": True}
        )
        diff = compare_metadata(context, metadata)
    engine.dispose()
    return diff


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_upgrade_to_head_matches_the_models(database_url: str) -> None:
    command.upgrade(_config(database_url), "head")
    assert _diff(database_url) == []
    assert {"tether_agent", "tether_job", "tether_agent_token", "alembic_version_tether"} <= _tables(database_url)


def test_downgrade_round_trips(database_url: str) -> None:
    config = _config(database_url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    assert _tables(database_url) <= {"alembic_version_tether"}
    command.upgrade(config, "head")
    assert _diff(database_url) == []


def test_every_revision_is_mapped_to_a_release() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config("sqlite://"))
    assert set(TetherDBManager.revision_heads_map.values()) <= {r.revision for r in script.walk_revisions()}
    assert script.get_current_head() in TetherDBManager.revision_heads_map.values()


def test_migrations_ship_with_the_package() -> None:
    assert (Path(TetherDBManager.migration_dir) / "env.py").is_file()

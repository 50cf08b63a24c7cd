"""Tether's Alembic chain: head matches the models, and downgrade round-trips."""

from __future__ import annotations

import json
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


def test_upgrading_from_the_first_release_keeps_tokens_cordons_and_queued_jobs(database_url: str) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import text

    config = _config(database_url)
    command.upgrade(config, TetherDBManager.revision_heads_map["0.1.0"])
    now = datetime(2026, 12, 1, tzinfo=UTC)
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tether_agent_token (id, name, secret_hash, created_at) "
                "VALUES ('0123456789', 'fleet', 'h', :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO tether_agent (id, name, incarnation, token_id, hostname, tether_version, "
                "airflow_version, python_version, roles, queues, labels, slots, free_slots, draining, cordoned, "
                "cordon_reason, cordoned_by, first_seen, registered_at, last_heartbeat, heartbeat_interval, metrics) "
                "VALUES ('a1', 'agent-1', 'i1', '0123456789', 'h', '0.1.0', '3.3.2', '3.11', '[\"worker\"]', "
                "'[\"default\"]', '{}', 4, 4, false, true, 'disk', 'cli:ops', :now, :now, :now, 10, '{}')"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO tether_job (id, ti_id, dag_id, task_id, run_id, map_index, try_number, queue, "
                "pool_slots, priority_weight, state, workload, queued_at) "
                "VALUES ('j1', 't1', 'd', 't', 'r', -1, 1, 'default', 1, 1, 'QUEUED', '{}', :now)"
            ),
            {"now": now},
        )
    command.upgrade(config, "head")
    with engine.connect() as conn:
        token = conn.execute(
            text("SELECT name, secret_hash, revoked_at, scopes, bundles FROM tether_agent_token")
        ).one()
        agent = conn.execute(text("SELECT cordoned, cordon_reason, cordoned_by, protocol FROM tether_agent")).one()
        job = conn.execute(text("SELECT id, state, kind FROM tether_job")).one()
    engine.dispose()
    scopes = json.loads(token[3]) if isinstance(token[3], str) else token[3]
    # A token of the first release keeps working, as a worker token; a job of it is a task.
    assert (*token[:3], scopes, token[4]) == ("fleet", "h", None, ["worker"], None)
    assert (bool(agent[0]), *agent[1:]) == (True, "disk", "cli:ops", 1)
    assert tuple(job) == ("j1", "QUEUED", "task")

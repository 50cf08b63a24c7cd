"""Fixtures shared by every tier: databases on SQLite and the local PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tether.embedded import Plane

PG_ADMIN_URL = os.environ.get("TETHER_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def _pg_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    if not _pg_available():
        pytest.fail(f"PostgreSQL is required for these tests and is not reachable at {PG_ADMIN_URL}")
    return PG_ADMIN_URL


def create_pg_database(admin_url: str) -> str:
    name = f"tether_test_{secrets.token_hex(4)}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@contextlib.contextmanager
def running_plane(admin_url: str, home: Path, dags_folder: Path, env: dict[str, str]) -> Iterator[Plane]:
    """A plane (API server, scheduler, DAG processor) on a PostgreSQL database of its own, gone afterwards."""
    url = create_pg_database(admin_url)
    plane = Plane(home=home, dags_folder=dags_folder, sql_alchemy_conn=url, extra_env=env)
    try:
        plane.migrate()
        plane.start()
        yield plane
    finally:
        plane.stop()
        drop_pg_database(admin_url, url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tether.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    url = create_pg_database(admin)
    try:
        yield url
    finally:
        drop_pg_database(admin, url)

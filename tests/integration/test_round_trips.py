"""What the agent API's hot paths cost the PostgreSQL server: one transaction per call.

A fleet's heartbeats, and every task's start and report, are the plane's steady
database load; each must be a single statement on the server, with nothing sent
around it (no BEGIN and COMMIT, no reset of the connection as it returns to the pool).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.conftest import SETTINGS, StoreAgent, enqueue
from tether import protocol
from tether.plane.api.app import agent_api_session_factory
from tether.plane.models import metadata
from tether.plane.store import Store

POOL_SIZE = 2


class Server:
    """Transactions the server counted for one database, read once its backends have flushed them."""

    def __init__(self, admin_url: str, url: str) -> None:
        self.name = url.rsplit("/", 1)[1]
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def transactions(self, *engines: Engine) -> int:
        # A backend reports its counts when it exits: close the pools' connections and wait for that.
        for engine in engines:
            engine.dispose()
        deadline = time.monotonic() + 10
        with self.admin.connect() as conn:
            while conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": self.name}
            ).scalar():
                assert time.monotonic() < deadline, "the pool's backends did not exit"
                time.sleep(0.05)
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            return int(
                conn.execute(
                    text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
                    {"d": self.name},
                ).scalar()
            )


@pytest.fixture
def pg(pg_admin_url: str) -> Iterator[tuple[Engine, Server]]:
    url = create_pg_database(pg_admin_url)
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=0)
    metadata.create_all(engine)
    server = Server(pg_admin_url, url)
    try:
        yield engine, server
    finally:
        engine.dispose()
        server.admin.dispose()
        drop_pg_database(pg_admin_url, url)


def test_heartbeats_starts_and_reports_are_one_transaction_each(
    pg: tuple[Engine, Server], make_workload: Callable[..., Any]
) -> None:
    engine, server = pg
    store = Store(sessionmaker(bind=engine, expire_on_commit=False), settings=SETTINGS)
    agent = StoreAgent(store)
    enqueue(store, *(make_workload(task_id=f"t{i}") for i in range(5)))
    job_ids = agent.take()
    assert len(job_ids) == 5
    before = server.transactions(engine)

    beats = 20
    for _ in range(beats):
        agent.heartbeat()
    for job_id in job_ids:
        agent.start(job_id)
    for job_id in job_ids:
        agent.report(job_id, protocol.ReportState.SUCCESS)

    calls = beats + 2 * len(job_ids)
    # The backend the pool starts counts one transaction of its own (reading its settings); the
    # calls come one at a time, so there is one.
    assert calls <= server.transactions(engine) - before <= calls + 1


def test_a_claim_commits_without_waiting_for_its_wal_and_the_start_gate_waits(
    pg: tuple[Engine, Server], make_workload: Callable[..., Any]
) -> None:
    """A claim lost in a crash leaves its jobs queued and the gate refuses their start (ADR 1).

    So only the gate's commit waits for the WAL flush (which takes the claim's with it). The
    setting is read on the server as each statement that writes a job runs.
    """
    engine, _ = pg
    store = Store(sessionmaker(bind=engine, expire_on_commit=False), settings=SETTINGS)
    agent = StoreAgent(store)
    seen: list[str] = []

    def read_setting(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TETHER_JOB"):
            with cursor.connection.cursor() as own:  # in the same transaction, leaving its rows alone
                own.execute("SHOW synchronous_commit")
                seen.append(own.fetchone()[0])

    event.listen(engine, "after_cursor_execute", read_setting)
    enqueue(store, make_workload(task_id="t0"))
    job_ids = agent.take()
    assert len(job_ids) == 1
    agent.start(job_ids[0])
    event.remove(engine, "after_cursor_execute", read_setting)

    # The lease, then the start.
    assert seen == ["off", "on"]
    # The claim's setting ended with its transaction: the connection went back to the pool as it came.
    with engine.connect() as conn:
        assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"


def test_the_agent_apis_pool_checks_only_connections_left_unused(pg: tuple[Engine, Server]) -> None:
    engine, server = pg
    sessions = agent_api_session_factory(
        engine.url.render_as_string(hide_password=False), ping_idle_after=timedelta(seconds=2)
    )
    pool: Engine = sessions.kw["bind"]
    agent = StoreAgent(Store(sessions, settings=SETTINGS))
    before = server.transactions(pool, engine)
    beats = 20
    for _ in range(beats):
        agent.heartbeat()
    # Airflow checks every connection before each use by default; in steady use this pool does not.
    assert beats <= server.transactions(pool) - before <= beats + 1

    # A connection left unused, then lost (the server restarted, a proxy dropped it), is replaced unseen.
    agent.heartbeat()
    with server.admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": server.name}
        )
    time.sleep(2.2)
    agent.heartbeat()  # raises if the call got the dead connection
    pool.dispose()

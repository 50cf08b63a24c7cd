"""What the agent API's hot paths cost the PostgreSQL server: one transaction per call.

A fleet's heartbeats, and every task's start and report, are the plane's steady
database load; each must be a single statement on the server, with nothing sent
around it (no BEGIN and COMMIT, no reset of the connection as it returns to the pool).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.conftest import SETTINGS, enqueue
from tether import protocol
from tether.plane.models import metadata
from tether.plane.store import Store, TokenIdentity

POOL_SIZE = 2


class Server:
    """Transactions the server counted for one database, read once its backends have flushed them."""

    def __init__(self, admin_url: str, url: str) -> None:
        self.name = url.rsplit("/", 1)[1]
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def transactions(self, engine: Engine) -> int:
        # A backend reports its counts when it exits: close the pool's connections and wait for that.
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
    _, token = store.create_token(name="t")
    identity = TokenIdentity(id=token.id, name=token.name)
    incarnation = uuid.uuid4()
    agent = store.register(
        identity,
        protocol.RegisterRequest(
            name="a",
            incarnation=incarnation,
            tether_version="0",
            airflow_version="3",
            python_version="3.11",
            hostname="h",
            queues=["default"],
            slots=8,
        ),
    )
    enqueue(store, *(make_workload(task_id=f"t{i}") for i in range(5)))
    leases = store.claim(
        identity, agent.id, protocol.LeaseRequest(incarnation=incarnation, free_slots=5, queues=["default"], wait=0)
    )
    job_ids = [str(lease.job_id) for lease in leases or []]
    assert len(job_ids) == 5
    before = server.transactions(engine)

    beats = 20
    for _ in range(beats):
        store.heartbeat(
            identity,
            agent.id,
            protocol.HeartbeatRequest(incarnation=incarnation, running_jobs=[], free_slots=8, draining=False),
        )
    for job_id in job_ids:
        store.start(identity, agent.id, job_id, protocol.StartRequest(incarnation=incarnation))
    for job_id in job_ids:
        store.report(
            identity,
            agent.id,
            job_id,
            protocol.ReportRequest(incarnation=incarnation, state=protocol.ReportState.SUCCESS, exit_code=0),
        )

    calls = beats + 2 * len(job_ids)
    # Each backend the pool starts counts one transaction of its own (reading its settings).
    assert calls <= server.transactions(engine) - before <= calls + POOL_SIZE

"""The real store on an in-memory SQLite database, for tests that need no database server.

It runs the very statements production runs (on SQLite's dialect), so a unit test
of the executor or the agent API exercises the store's rules, not a copy of them.
"""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from tether import protocol
from tether.plane.config import PlaneSettings
from tether.plane.models import metadata
from tether.plane.store import Store, TokenIdentity


def memory_store(settings: PlaneSettings | None = None) -> Store:
    """A ``Store`` with Tether's tables on a fresh in-memory SQLite database.

    One connection serves every call, so use it from one thread at a time.
    """
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})

    metadata.create_all(engine)
    return Store(sessionmaker(bind=engine, expire_on_commit=False), settings=settings or PlaneSettings())


class StoreAgent:
    """An agent calling the store directly, as the agent API's routes do."""

    def __init__(self, store: Store, name: str = "a1") -> None:
        self.store = store
        _, row = store.create_token(name=f"tok-{name}")
        self.identity = TokenIdentity(id=row.id, name=row.name)
        self.incarnation = uuid.uuid4()
        self.agent_id = store.register(
            self.identity,
            protocol.RegisterRequest(
                name=name,
                incarnation=self.incarnation,
                tether_version="0",
                airflow_version="3",
                python_version="3.11",
                hostname="h",
                queues=["default"],
                slots=8,
            ),
        ).id

    def take(self, n: int = 8) -> list[str]:
        leases = self.store.claim(
            self.identity,
            self.agent_id,
            protocol.LeaseRequest(incarnation=self.incarnation, free_slots=n, queues=["default"], wait=0),
        )
        return [str(lease.job_id) for lease in leases or []]

    def start(self, job_id: str) -> None:
        self.store.start(self.identity, self.agent_id, job_id, protocol.StartRequest(incarnation=self.incarnation))

    def report(self, job_id: str, state: protocol.ReportState) -> None:
        self.store.report(
            self.identity,
            self.agent_id,
            job_id,
            protocol.ReportRequest(incarnation=self.incarnation, state=state, exit_code=0),
        )

    def heartbeat(self) -> None:
        self.store.heartbeat(
            self.identity,
            self.agent_id,
            protocol.HeartbeatRequest(incarnation=self.incarnation, running_jobs=[], free_slots=8, draining=False),
        )

"""Store and API fixtures on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from tether import errors, protocol
from tether.plane.api.app import create_app
from tether.plane.api.deps import PlaneContext
from tether.plane.config import PlaneSettings
from tether.plane.models import metadata
from tether.plane.store import Store
from tether.plane.store.testing import StoreAgent

#: The header every agent call carries: the revision the agent speaks.
SPEAKS = {protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)}

SETTINGS = PlaneSettings(
    heartbeat_interval=timedelta(seconds=1),
    lease_wait=timedelta(seconds=1),
    lease_timeout=timedelta(seconds=30),
    poll_interval=timedelta(seconds=0.05),
    token_cache_ttl=timedelta(seconds=0),
    max_agent_tokens=5,
)


async def fake_authorizer(request: Request, method: str) -> str:
    """Stands in for Airflow's auth manager: the X-Test-User header names the caller."""
    user = request.headers.get("X-Test-User")
    if not user:
        raise errors.Unauthorized("log in to Airflow first", reason="not_authenticated")
    if user != "admin" and method != "GET":
        raise errors.Forbidden(f"user {user!r} may not change Tether's settings", reason="forbidden")
    return user


@pytest.fixture
def engine(database_url: str) -> Iterator[object]:
    eng = create_engine(database_url)
    metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: object) -> Store:
    return Store(sessionmaker(bind=engine, expire_on_commit=False), settings=SETTINGS)  # type: ignore[call-overload]


@pytest.fixture
def client(store: Store, database_url: str) -> Iterator[TestClient]:
    dsn = None
    if database_url.startswith("postgresql"):
        dsn = database_url.replace("postgresql+psycopg2://", "postgresql://")
    ctx = PlaneContext.for_store(store, listen_dsn=dsn)
    with TestClient(create_app(lambda: ctx, authorizer=fake_authorizer)) as test_client:
        yield test_client
    ctx.wakeup.stop()


@pytest.fixture
def make_workload() -> Callable[..., object]:
    from airflow.executors.workloads import BundleInfo, ExecuteTask
    from airflow.executors.workloads.task import TaskInstanceDTO

    def make(
        *,
        task_id: str = "t",
        queue: str = "default",
        pool_slots: int = 1,
        priority_weight: int = 1,
        try_number: int = 1,
    ) -> object:
        ti = TaskInstanceDTO(
            id=uuid.uuid4(),
            task_id=task_id,
            dag_id="d",
            run_id="r",
            try_number=try_number,
            map_index=-1,
            dag_version_id=uuid.uuid4(),
            queue=queue,
            pool_slots=pool_slots,
            priority_weight=priority_weight,
        )
        return ExecuteTask(
            ti=ti, dag_rel_path="d.py", token="jwt", bundle_info=BundleInfo(name="dags-folder"), log_path=None
        )

    return make


def enqueue(store: Store, *workloads: object) -> None:
    with store.transaction() as session:
        for workload in workloads:
            store.enqueue(session, workload)


__all__ = ["SETTINGS", "SPEAKS", "StoreAgent", "enqueue", "fake_authorizer"]

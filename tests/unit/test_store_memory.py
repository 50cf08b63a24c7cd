"""The store on an in-memory database: the rules themselves, without a database server."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from tether import errors, protocol
from tether.plane.config import PlaneSettings
from tether.plane.models import Job
from tether.plane.store import Store, utcnow
from tether.plane.store.testing import StoreAgent, memory_store


class _Workload:
    """The parts of an ``ExecuteTask`` workload the store reads."""

    def __init__(self, task_id: str) -> None:
        self.ti = type(
            "TI",
            (),
            {
                "id": uuid.uuid4(),
                "try_number": 1,
                "dag_id": "d",
                "task_id": task_id,
                "run_id": "r",
                "map_index": -1,
                "queue": "default",
                "pool_slots": 1,
                "priority_weight": 1,
            },
        )()

    def model_dump_json(self) -> str:
        return '{"ti": {}}'


@pytest.fixture
def store() -> Store:
    return memory_store(PlaneSettings(lease_timeout=timedelta(seconds=30)))


def _queue(store: Store, *task_ids: str) -> None:
    with store.transaction() as session:
        for task_id in task_ids:
            store.enqueue(session, _Workload(task_id))


def _all_states(store: Store) -> list[str]:
    with store.transaction() as session:
        return sorted(session.scalars(select(Job.state)))


def test_a_job_goes_from_queued_to_an_outcome_once(store: Store) -> None:
    _queue(store, "t")
    agent = StoreAgent(store)
    (job_id,) = agent.take()
    agent.start(job_id)
    agent.report(job_id, protocol.ReportState.SUCCESS)
    agent.report(job_id, protocol.ReportState.SUCCESS)  # a retried call: the same answer
    with pytest.raises(errors.Conflict, match="already SUCCESS; its outcome is final"):
        agent.report(job_id, protocol.ReportState.FAILED)
    assert _all_states(store) == ["SUCCESS"]


def test_only_the_holder_starts_or_reports_a_job(store: Store) -> None:
    _queue(store, "t")
    holder, other = StoreAgent(store, "holder"), StoreAgent(store, "other")
    (job_id,) = holder.take()
    with pytest.raises(errors.Conflict, match="not leased to this agent"):
        other.start(job_id)
    with pytest.raises(errors.Conflict, match="must pass the start gate first"):
        holder.report(job_id, protocol.ReportState.SUCCESS)
    holder.start(job_id)
    with pytest.raises(errors.Conflict, match="not held by this agent"):
        other.report(job_id, protocol.ReportState.SUCCESS)
    assert _all_states(store) == ["RUNNING"]


def test_an_expired_lease_is_refused_and_returns_to_the_queue(store: Store) -> None:
    _queue(store, "t")
    agent = StoreAgent(store)
    (job_id,) = agent.take()
    later = protocol.StartRequest(incarnation=agent.incarnation)
    with pytest.raises(errors.Conflict, match="expired; it went back to the queue"):
        store.start(agent.identity, agent.agent_id, job_id, later, now=utcnow() + timedelta(minutes=1))
    assert _all_states(store) == ["QUEUED"]
    assert agent.take() == [job_id]

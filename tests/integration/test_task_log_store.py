"""Keeping shipped log batches on a real database (SQLite and PostgreSQL): what one call of many batches writes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from tests.integration.conftest import StoreAgent, enqueue
from tether import protocol
from tether.plane.store import Store


def _started_jobs(store: Store, make_workload: Callable[..., Any], count: int) -> tuple[StoreAgent, list[str]]:
    enqueue(store, *(make_workload(task_id=f"t{i}") for i in range(count)))
    agent = StoreAgent(store)
    jobs = agent.take(count)
    for job_id in jobs:
        agent.start(job_id)
    return agent, jobs


def _ti(store: Store, job_id: str) -> str:
    from tether.plane.models import Job

    with store.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.ti_id


@contextmanager
def _statements(engine: Any) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_one_call_keeps_several_batches_of_a_try_in_order_and_once(
    store: Store, make_workload: Callable[..., Any]
) -> None:
    agent, (first, second) = _started_jobs(store, make_workload, 2)
    segment = uuid.uuid4()

    def batch(job_id: str, seq: int, lines: list[str], *, final: bool = False) -> protocol.JobLogBatch:
        return protocol.JobLogBatch(job_id=uuid.UUID(job_id), segment=segment, seq=seq, lines=lines, final=final)

    request = protocol.JobLogBatches(
        incarnation=agent.incarnation,
        batches=[
            batch(first, 0, ["a", "b"]),
            batch(second, 0, ["x"]),
            batch(first, 1, ["c"]),
            batch(first, 1, ["c"]),  # the same batch twice in one call: kept once
            batch(first, 2, [], final=True),  # no lines, but the log is whole now
        ],
    )
    answers = store.append_logs(agent.identity, agent.agent_id, request).answers
    assert [a.stop for a in answers] == [False] * 5
    ti_first, ti_second = _ti(store, first), _ti(store, second)
    assert list(store.task_log_lines(ti_first, 1)) == ["a", "b", "c"]
    assert list(store.task_log_lines(ti_second, 1)) == ["x"]
    state = store.task_log_state(ti_first, 1)
    assert state is not None and (state.lines, state.bytes, state.closed) == (3, 6, True)
    other = store.task_log_state(ti_second, 1)
    assert other is not None and (other.lines, other.bytes, other.closed) == (1, 2, False)

    # Sent again after a lost answer, with one new batch: only the new one is added to what is kept.
    again = protocol.JobLogBatches(
        incarnation=agent.incarnation, batches=[*request.batches, batch(second, 1, ["y", "z"], final=True)]
    )
    store.append_logs(agent.identity, agent.agent_id, again)
    assert list(store.task_log_lines(ti_first, 1)) == ["a", "b", "c"]
    assert list(store.task_log_lines(ti_second, 1)) == ["x", "y", "z"]
    state = store.task_log_state(ti_first, 1)
    assert state is not None and (state.lines, state.bytes, state.closed) == (3, 6, True)
    other = store.task_log_state(ti_second, 1)
    assert other is not None and (other.lines, other.bytes, other.closed) == (3, 6, True)


def test_a_call_costs_the_same_statements_for_one_batch_as_for_many(
    store: Store, engine: Any, make_workload: Callable[..., Any]
) -> None:
    agent, jobs = _started_jobs(store, make_workload, 6)
    segment = uuid.uuid4()

    def call(job_ids: list[str], seq: int) -> list[str]:
        request = protocol.JobLogBatches(
            incarnation=agent.incarnation,
            batches=[
                protocol.JobLogBatch(job_id=uuid.UUID(j), segment=segment, seq=seq, lines=[f"line {seq}"])
                for j in job_ids
            ],
        )
        with _statements(engine) as seen:
            answers = store.append_logs(agent.identity, agent.agent_id, request).answers
        assert not any(a.stop for a in answers)
        return [s for s in seen if s in {"SELECT", "INSERT", "UPDATE"}]

    # The logs' first batches (the logs start), then their next ones (the logs grow).
    assert call(jobs[:1], 0) == call(jobs[1:], 0)
    assert call(jobs[:1], 1) == call(jobs[1:], 1)
    # A control: the count is of this call's statements, and one more kind of work shows in it.
    assert call(jobs[:1], 1).count("INSERT") == 0 and call(jobs[:1], 2).count("INSERT") == 1
    for job_id in jobs[1:]:
        assert list(store.task_log_lines(_ti(store, job_id), 1)) == ["line 0", "line 1"]

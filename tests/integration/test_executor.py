"""TetherExecutor against a real database: jobs in the caller's transaction, events, revoke, adoption."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, select

from tests.integration.conftest import StoreAgent as Agent
from tests.integration.conftest import enqueue
from tether import protocol
from tether.plane.models import Job
from tether.plane.store import Store, utcnow

os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", "tests-only-secret")


@pytest.fixture
def executor(store: Store) -> Any:
    from tether.plane.executor import TetherExecutor

    return TetherExecutor(parallelism=3, store=store)


@dataclass
class FakeTI:
    """The few task-instance attributes the executor reads in revoke and adoption."""

    id: uuid.UUID
    try_number: int
    state: str
    key: Any


def _queue(executor: Any, store: Store, workload: Any) -> None:
    with store.transaction() as session:
        executor.queue_workload(workload, session)


def test_a_rolled_back_scheduling_decision_leaves_no_job(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    session = store._session_factory()
    with pytest.raises(RuntimeError), session.begin():
        executor.queue_workload(make_workload(), session)
        raise RuntimeError("the scheduler's transaction fails")
    session.close()
    with store.transaction() as check:
        assert check.query(Job).count() == 0


def test_jobs_in_flight_count_against_parallelism(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    for i in range(2):
        _queue(executor, store, make_workload(task_id=f"t{i}"))
    assert len(executor.running) == 2
    assert executor.slots_available == 1


def test_a_full_executor_counts_jobs_finished_since_its_last_sync(
    store: Store, make_workload: Callable[..., Any]
) -> None:
    from tether.plane.executor import TetherExecutor

    now = [1000.0]
    executor = TetherExecutor(parallelism=3, store=store, clock=lambda: now[0])
    for i in range(3):
        _queue(executor, store, make_workload(task_id=f"t{i}"))
    agent = Agent(store)
    jobs = agent.take()
    for job_id in jobs:
        agent.start(job_id)
    executor.sync()
    executor.get_event_buffer()
    assert executor.slots_available == 0
    agent.report(jobs[0], protocol.ReportState.SUCCESS)
    # Asked again at once, the executor does not look again.
    assert executor.slots_available == 0
    # The scheduler asks before its next sync: the finished job's slot is free already,
    # and its event waits in the buffer for the scheduler to process.
    now[0] += 1
    assert executor.slots_available == 1
    assert [state for state, _ in executor.get_event_buffer().values()] == ["success"]


def test_job_states_become_executor_events(executor: Any, store: Store, make_workload: Callable[..., Any]) -> None:
    ok, bad = make_workload(task_id="ok"), make_workload(task_id="bad")
    _queue(executor, store, ok)
    _queue(executor, store, bad)
    agent = Agent(store)
    jobs = agent.take()
    for job_id in jobs:
        agent.start(job_id)
    executor.sync()
    # Running is not an event for a task instance: the task says so itself, through the Execution API.
    assert executor.get_event_buffer() == {}
    with store.transaction() as session:
        by_task = {session.get(Job, job_id).task_id: job_id for job_id in jobs}  # type: ignore[union-attr]
    agent.report(by_task["ok"], protocol.ReportState.SUCCESS)
    agent.report(by_task["bad"], protocol.ReportState.FAILED)
    executor.sync()
    events = executor.get_event_buffer()
    assert {key.task_id: state for key, (state, _) in events.items()} == {"ok": "success", "bad": "failed"}
    assert executor.running == set()


def test_a_callback_is_marked_running_and_a_task_is_not(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    from airflow.executors.workloads import BundleInfo
    from airflow.executors.workloads.callback import CallbackDTO, CallbackFetchMethod, ExecuteCallback

    callback = ExecuteCallback(
        callback=CallbackDTO(id=str(uuid.uuid4()), fetch_method=CallbackFetchMethod.IMPORT_PATH, data={"path": "m.f"}),
        dag_rel_path="d.py",
        bundle_info=BundleInfo(name="dags-folder"),
        token="jwt",
        log_path=None,
    )
    task = make_workload(task_id="t")
    _queue(executor, store, callback)
    _queue(executor, store, task)
    agent = Agent(store)
    for job_id in agent.take():
        agent.start(job_id)
    executor.sync()
    # As with Airflow's own executors: a callback's running state is Airflow's to record from the
    # event; a task records its own, through the Execution API.
    assert {key: state for key, (state, _) in executor.get_event_buffer().items()} == {callback.key: "running"}


def test_a_sweep_that_fails_is_tried_again_and_does_not_stop_the_scheduler(
    store: Store, make_workload: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep or purge PostgreSQL ended (a deadlock, a lost connection) must not end the scheduler's loop."""
    from sqlalchemy.exc import OperationalError

    from tether.plane.executor import TetherExecutor

    now = [1000.0]
    executor = TetherExecutor(parallelism=3, store=store, clock=lambda: now[0])
    sweeps: list[str] = []
    real_sweep = store.sweep

    def sweep(**kwargs: Any) -> dict[str, int]:
        if not sweeps:
            sweeps.append("failed")
            raise OperationalError("UPDATE job ...", {}, Exception("deadlock detected"))
        sweeps.append("swept")
        return real_sweep(**kwargs)

    def purge(**kwargs: Any) -> int:
        raise OperationalError("DELETE FROM tether_job ...", {}, Exception("server closed the connection"))

    monkeypatch.setattr(store, "sweep", sweep)
    monkeypatch.setattr(store, "purge", purge)  # the first loop purges too
    _queue(executor, store, make_workload(task_id="ok"))
    agent = Agent(store)
    [job_id] = agent.take()
    agent.start(job_id)
    agent.report(job_id, protocol.ReportState.SUCCESS)
    executor.sync()  # the sweep fails; the loop goes on and reports what finished
    assert sweeps == ["failed"]
    assert {key.task_id: state for key, (state, _) in executor.get_event_buffer().items()} == {"ok": "success"}
    now[0] += 1.0
    executor.sync()
    assert sweeps == ["failed", "swept"]


def test_a_dead_agents_running_job_is_reported_failed(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    _queue(executor, store, make_workload())
    agent = Agent(store)
    agent.start(agent.take()[0])
    store.sweep(now=utcnow() + timedelta(minutes=5))
    executor.sync()
    assert [state for state, _ in executor.get_event_buffer().values()] == ["failed"]


def test_revoke_takes_the_job_away_without_an_event(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    workload = make_workload()
    _queue(executor, store, workload)
    executor.revoke_task(ti=FakeTI(workload.ti.id, 1, "queued", workload.ti.key))
    assert executor.running == set()
    assert Agent(store).take() == []
    executor.sync()
    assert executor.get_event_buffer() == {}
    assert store.job_views([str(workload.ti.id)])[0].state is protocol.JobState.REVOKED


def test_a_new_scheduler_adopts_what_tether_still_tracks(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    from tether.plane.executor import TetherExecutor

    running, queued = make_workload(task_id="running"), make_workload(task_id="queued")
    _queue(executor, store, running)
    _queue(executor, store, queued)
    agent = Agent(store)
    leased = agent.take(1)
    agent.start(leased[0])
    unknown = make_workload(task_id="unknown")
    successor = TetherExecutor(parallelism=3, store=store)
    tis = [
        FakeTI(running.ti.id, 1, "running", running.ti.key),
        FakeTI(queued.ti.id, 1, "queued", queued.ti.key),
        FakeTI(unknown.ti.id, 1, "queued", unknown.ti.key),
    ]
    not_adopted = successor.try_adopt_task_instances(tis)
    assert [ti.id for ti in not_adopted] == [unknown.ti.id]
    assert successor.running == {running.ti.key, queued.ti.key}
    for job_id in leased:
        agent.report(job_id, protocol.ReportState.SUCCESS)
    successor.sync()
    assert list(successor.get_event_buffer()) == [leased_key(store, leased[0])]


def leased_key(store: Store, job_id: str) -> Any:
    with store.transaction() as session:
        job = session.get(Job, job_id)
        from airflow.models.taskinstancekey import TaskInstanceKey

        return TaskInstanceKey(job.dag_id, job.task_id, job.run_id, job.try_number, job.map_index)


def test_a_try_queued_again_keeps_its_row_and_loses_its_lease(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    workload = make_workload()
    enqueue(store, workload)
    agent = Agent(store)
    (job_id,) = agent.take()
    _queue(executor, store, workload)  # the scheduler reset the try and queued it again
    with store.transaction() as session:
        jobs = session.scalars(select(Job).where(Job.ti_id == str(workload.ti.id))).all()
    assert [(job.id, job.state, job.agent_id, job.leased_at) for job in jobs] == [
        (job_id, protocol.JobState.QUEUED.value, None, None)
    ]
    assert agent.take() == [job_id]


def test_times_in_any_zone_are_kept_as_the_same_instant(store: Store, make_workload: Callable[..., Any]) -> None:
    queued = utcnow().astimezone(timezone(timedelta(hours=2)))
    workload = make_workload()
    with store.transaction() as session:
        store.enqueue(session, workload, now=queued)
    with store.transaction() as session:
        (job,) = session.scalars(select(Job).where(Job.ti_id == str(workload.ti.id))).all()
    assert job.queued_at == queued


def test_queueing_a_job_is_one_statement_in_the_schedulers_transaction(
    store: Store, engine: Any, make_workload: Callable[..., Any]
) -> None:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    workloads = [make_workload(task_id=f"t{i}") for i in range(3)]
    event.listen(engine, "before_cursor_execute", record)
    try:
        enqueue(store, *workloads)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(statements) == 3, statements
    views = store.job_views([str(w.ti.id) for w in workloads])
    assert sorted((v.key.task_id, v.state) for v in views) == [(f"t{i}", protocol.JobState.QUEUED) for i in range(3)]


def test_two_schedulers_sweeping_at_once_settle_each_job_once(
    executor: Any, store: Store, make_workload: Callable[..., Any]
) -> None:
    import threading

    for i in range(6):
        _queue(executor, store, make_workload(task_id=f"t{i}"))
    agent = Agent(store)
    jobs = agent.take()
    for job_id in jobs[:3]:
        agent.start(job_id)
    later = utcnow() + timedelta(minutes=5)
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            results.append(store.sweep(now=later))
        except BaseException as exc:  # surfaced below: a sweep must not fail on a concurrent one
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    with store.transaction() as session:
        states = sorted(session.get(Job, job_id).state for job_id in jobs)
    assert states == ["FAILED"] * 3 + ["QUEUED"] * 3
    # Whichever sweep won, the agent was settled and nothing was done twice.
    assert sum(r["unhealthy_agents"] for r in results) >= 1
    executor.sync()
    assert sorted(state for state, _ in executor.get_event_buffer().values()) == ["failed"] * 3

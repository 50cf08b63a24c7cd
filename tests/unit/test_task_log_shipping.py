"""Task log shipping without processes: the follower on the agent, the store on the plane."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.unit.scenarios import run, until
from tether import protocol
from tether.agent.health import AgentMetrics
from tether.agent.logs import LogFollower, LogShipper
from tether.agent.settings import AgentSettings
from tether.errors import PlaneUnavailable
from tether.plane.config import PlaneSettings
from tether.plane.models import Job
from tether.plane.store import Store
from tether.plane.store.testing import StoreAgent, memory_store

SETTINGS = AgentSettings(plane_url="http://plane.test", token="t", name="unit", max_backoff=timedelta(seconds=0.05))


class Plane:
    """Takes batches, or is away, as told."""

    def __init__(self) -> None:
        self.batches: list[protocol.LogBatch] = []
        self.attempts = 0
        self.down = False
        self.stop_after: int | None = None

    async def send(self, job_id: uuid.UUID, batch: protocol.LogBatch) -> protocol.LogBatchResponse:
        self.attempts += 1
        if self.down:
            raise PlaneUnavailable("away")
        self.batches.append(batch)
        stop = self.stop_after is not None and len(self.batches) >= self.stop_after
        return protocol.LogBatchResponse(stop=stop, reason="limit" if stop else None)

    def lines(self) -> list[str]:
        return [line for batch in self.batches for line in batch.lines]


def _follower(path: Path, plane: Plane) -> LogFollower:
    return LogFollower(
        key=uuid.uuid4(),
        path=path,
        send=plane.send,
        incarnation=uuid.uuid4(),
        metrics=AgentMetrics(),
        settings=SETTINGS,
    )


def test_lines_leave_as_they_are_written_and_the_last_ones_when_the_task_exits(tmp_path: Path) -> None:
    path = tmp_path / "attempt=1.log"

    async def scenario() -> None:
        plane = Plane()
        follower = _follower(path, plane)
        follower.start()
        with path.open("a") as log:
            log.write("one\ntwo\nthr")
        await until(lambda: plane.lines() == ["one", "two"])
        with path.open("a") as log:
            log.write("ee\nlast line without its newline")
        follower.finish()
        await follower.wait(5)
        assert plane.lines() == ["one", "two", "three", "last line without its newline"]
        assert [batch.seq for batch in plane.batches] == list(range(len(plane.batches)))
        assert plane.batches[-1].final and not any(batch.final for batch in plane.batches[:-1])

    run(scenario)


def test_a_task_resumed_here_ships_only_its_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "attempt=1.log"
    path.write_text("before the deferral\n")

    async def scenario() -> None:
        plane = Plane()
        follower = _follower(path, plane)
        follower.start()
        with path.open("a") as log:
            log.write("after the deferral\n")
        follower.finish()
        await follower.wait(5)
        assert plane.lines() == ["after the deferral"]

    run(scenario)


def test_lines_wait_in_the_file_while_the_plane_is_away(tmp_path: Path) -> None:
    path = tmp_path / "attempt=1.log"

    async def scenario() -> None:
        plane = Plane()
        plane.down = True
        follower = _follower(path, plane)
        follower.start()
        path.write_text("".join(f"line {i}\n" for i in range(5)))
        await until(lambda: plane.attempts >= 3)  # tried, and tried again
        assert plane.batches == []
        plane.down = False
        follower.finish()
        await follower.wait(5)
        assert plane.lines() == [f"line {i}" for i in range(5)]

    run(scenario)


def test_the_follower_stops_when_the_plane_says_so(tmp_path: Path) -> None:
    path = tmp_path / "attempt=1.log"

    async def scenario() -> None:
        plane = Plane()
        plane.stop_after = 1
        follower = _follower(path, plane)
        follower.start()
        path.write_text("kept\n")
        await until(lambda: len(plane.batches) == 1)
        with path.open("a") as log:
            log.write("not sent\n")
        follower.finish()
        await follower.wait(5)
        assert plane.lines() == ["kept"] and follower.stopped_by_plane

    run(scenario)


def test_a_line_longer_than_the_protocol_allows_is_cut_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "attempt=1.log"
    path.write_text("y" * (protocol.MAX_LOG_LINE + 10) + "\n")

    async def scenario() -> None:
        plane = Plane()
        follower = _follower(path, plane)
        follower.offset = 0  # the line was there before the follower started: read it all the same
        follower._task = asyncio.create_task(follower._run())
        follower.finish()
        await follower.wait(5)
        [line] = plane.lines()
        assert line.startswith("y" * 100)
        assert line.endswith(f"[Tether cut this line at {protocol.MAX_LOG_LINE} characters]")

    run(scenario)


# -- the plane's side -------------------------------------------------------------------


class _Workload:
    def __init__(self) -> None:
        self.ti = type(
            "TI",
            (),
            {"id": uuid.uuid4(), "try_number": 1, "dag_id": "d", "task_id": "t", "run_id": "r", "map_index": -1,
             "queue": "default", "pool_slots": 1, "priority_weight": 1},
        )()  # fmt: skip

    def model_dump_json(self) -> str:
        return '{"log_path": "dag_id=d/run_id=r/task_id=t/attempt=1.log"}'


@pytest.fixture
def store() -> Store:
    return memory_store(PlaneSettings(task_log_max_bytes=100))


def _job(store: Store) -> tuple[StoreAgent, str, Any]:
    workload = _Workload()
    with store.transaction() as session:
        store.enqueue(session, workload)
    agent = StoreAgent(store)
    (job_id,) = agent.take()
    agent.start(job_id)
    return agent, job_id, workload


def _batch(agent: StoreAgent, lines: list[str], *, seq: int, segment: uuid.UUID) -> protocol.LogBatch:
    return protocol.LogBatch(incarnation=agent.incarnation, segment=segment, seq=seq, lines=lines)


def test_a_batch_sent_twice_is_kept_once_and_lines_read_back_in_order(store: Store) -> None:
    agent, job_id, workload = _job(store)
    segment = uuid.uuid4()
    for seq, lines in enumerate((["a", "b"], ["c"])):
        store.append_log(agent.identity, agent.agent_id, job_id, _batch(agent, lines, seq=seq, segment=segment))
    store.append_log(agent.identity, agent.agent_id, job_id, _batch(agent, ["c"], seq=1, segment=segment))
    assert list(store.task_log_lines(str(workload.ti.id), 1)) == ["a", "b", "c"]
    state = store.task_log_state(str(workload.ti.id), 1)
    assert state is not None and (state.lines, state.bytes, state.truncated) == (3, 6, False)


def test_past_the_limit_the_log_is_cut_with_a_notice_and_no_more_is_taken(store: Store) -> None:
    agent, job_id, workload = _job(store)
    segment = uuid.uuid4()
    answer = store.append_log(
        agent.identity, agent.agent_id, job_id, _batch(agent, ["x" * 60, "y" * 60], seq=0, segment=segment)
    )
    assert answer.stop
    lines = list(store.task_log_lines(str(workload.ti.id), 1))
    assert lines[0] == "x" * 60 and "Tether cut this log here" in lines[1] and len(lines) == 2
    later = store.append_log(agent.identity, agent.agent_id, job_id, _batch(agent, ["z"], seq=1, segment=segment))
    assert later.stop and list(store.task_log_lines(str(workload.ti.id), 1)) == lines


def test_only_the_jobs_agent_ships_its_log(store: Store) -> None:
    _, job_id, workload = _job(store)
    other = StoreAgent(store, "other")
    batch = _batch(other, ["no"], seq=0, segment=uuid.uuid4())
    answer = store.append_log(other.identity, other.agent_id, job_id, batch)
    assert answer.stop and store.task_log_state(str(workload.ti.id), 1) is not None
    assert list(store.task_log_lines(str(workload.ti.id), 1)) == []


def test_one_call_keeps_several_jobs_batches_each_on_its_own_terms(store: Store) -> None:
    workloads = [_Workload() for _ in range(3)]
    with store.transaction() as session:
        for workload in workloads:
            store.enqueue(session, workload)
    agent = StoreAgent(store)
    jobs = agent.take()
    for job_id in jobs:
        agent.start(job_id)
    other_agent_job = _job_of_another_agent(store)
    segment = uuid.uuid4()

    def batch(job_id: str, lines: list[str], seq: int = 0) -> protocol.JobLogBatch:
        return protocol.JobLogBatch(job_id=uuid.UUID(job_id), segment=segment, seq=seq, lines=lines)

    request = protocol.JobLogBatches(
        incarnation=agent.incarnation,
        batches=[
            batch(jobs[0], ["a", "b"]),
            batch(jobs[1], ["x" * 60, "y" * 60]),  # past the 100-byte limit: cut, and told to stop
            batch(jobs[2], ["c"]),
            batch(other_agent_job, ["not mine"]),
            batch(str(uuid.uuid4()), ["no such job"]),
        ],
    )
    answers = store.append_logs(agent.identity, agent.agent_id, request).answers
    assert [str(a.job_id) for a in answers] == [str(b.job_id) for b in request.batches]
    assert [a.stop for a in answers] == [False, True, False, True, True]
    with store.transaction() as session:
        ti = {job_id: session.get(Job, job_id).ti_id for job_id in jobs}  # type: ignore[union-attr]
    # Sent again after a lost answer: every batch is kept once.
    store.append_logs(agent.identity, agent.agent_id, request)
    lines = {job_id: list(store.task_log_lines(ti[job_id], 1)) for job_id in jobs}
    assert lines[jobs[0]] == ["a", "b"] and lines[jobs[2]] == ["c"]
    assert lines[jobs[1]][0] == "x" * 60 and "Tether cut this log here" in lines[jobs[1]][1]


def _job_of_another_agent(store: Store) -> str:
    with store.transaction() as session:
        store.enqueue(session, _Workload())
    other = StoreAgent(store, "other")
    (job_id,) = other.take()
    other.start(job_id)
    return job_id


class _Jobs:
    """The agent client's job calls, as far as log batches go: every call kept, the second job refused."""

    def __init__(self) -> None:
        self.calls: list[protocol.JobLogBatches] = []
        self.down = False

    async def logs(self, agent_id: uuid.UUID, body: protocol.JobLogBatches) -> protocol.JobLogBatchesResponse:
        self.calls.append(body)
        if self.down:
            raise PlaneUnavailable("away")
        return protocol.JobLogBatchesResponse(
            answers=[
                protocol.JobLogAnswer(job_id=b.job_id, stop=b.lines == ["refused"], reason="limit")
                for b in body.batches
            ]
        )


def _shipper(jobs: _Jobs, folder: Path) -> LogShipper:
    return LogShipper(
        client=type("Client", (), {"jobs": jobs})(),
        agent_id=uuid.uuid4,
        incarnation=uuid.uuid4(),
        folder=folder,
        metrics=AgentMetrics(),
        settings=SETTINGS,
    )


def test_the_shipper_sends_batches_ready_together_in_one_call(tmp_path: Path) -> None:
    async def scenario() -> None:
        jobs = _Jobs()
        shipper = _shipper(jobs, tmp_path)
        names = ["one", "refused", "three"]
        for name in names:
            (tmp_path / f"{name}.log").write_text(f"{name}\n")
        followers = []
        for name in names:
            follower = shipper.follow(uuid.uuid4(), f"{name}.log")
            assert follower is not None
            follower.offset = 0  # the file was written before the follower started, as a task's first lines
            followers.append(follower)
        for follower in followers:
            follower.finish()
        await asyncio.gather(*(f.wait(5) for f in followers))
        assert len(jobs.calls) == 1, [len(c.batches) for c in jobs.calls]
        assert sorted(line for b in jobs.calls[0].batches for line in b.lines) == sorted(names)
        assert [f.stopped_by_plane for f in followers] == [False, True, False]

    run(scenario)


def test_while_the_plane_is_away_each_follower_keeps_its_lines_and_sends_them_later(tmp_path: Path) -> None:
    async def scenario() -> None:
        jobs = _Jobs()
        jobs.down = True
        shipper = _shipper(jobs, tmp_path)
        (tmp_path / "a.log").write_text("first\n")
        follower = shipper.follow(uuid.uuid4(), "a.log")
        assert follower is not None
        follower.offset = 0
        follower.finish()
        await until(lambda: len(jobs.calls) >= 2)
        jobs.down = False
        await follower.wait(5)
        assert [b.lines for b in jobs.calls[-1].batches] == [["first"]] and not follower.stopped_by_plane

    run(scenario)

"""Task logs agents ship while their tasks run, kept per try in batches, and read back in order.

A try's log is as long as ``[tether] task_log_max_bytes`` at most: the batch that
reaches it is cut, a line saying so is added, and the agent is told to stop. A
batch sent again (a retry after a lost answer) is taken once. Logs go with their
task instances: when ``airflow db clean`` removes a try, ``purge_task_logs``
removes its log.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tether import errors, protocol
from tether.plane.models import Job, TaskLog, TaskLogChunk
from tether.plane.store.base import Database, TokenIdentity, utcnow
from tether.plane.store.rules import calling_agent

_LOG: Table = TaskLog.__table__  # type: ignore[assignment]
_CHUNK: Table = TaskLogChunk.__table__  # type: ignore[assignment]

#: What a log batch needs of its job: whose it is, and the try it is of.
_JOB_TRY = select(Job.id, Job.agent_id, Job.ti_id, Job.try_number, Job.dag_id, Job.task_id, Job.run_id, Job.map_index)

#: Chunks read at a time when a log is read back.
_READ_PAGE = 200


def tether_line(event: str, *, level: str = "warning", at: datetime | None = None) -> str:
    """A log line in the supervisor's own JSON form, from Tether rather than the task."""
    return json.dumps({"timestamp": (at or utcnow()).isoformat(), "level": level, "logger": "tether", "event": event})


@dataclass(frozen=True)
class TaskLogState:
    """What the plane has of one try's log."""

    agent_name: str | None
    lines: int = 0
    bytes: int = 0
    truncated: bool = False
    closed: bool = False
    last_at: datetime | None = None


class LogStore(Database):
    def append_log(
        self,
        identity: TokenIdentity,
        agent_id: str,
        job_id: str,
        batch: protocol.LogBatch,
        *,
        now: datetime | None = None,
    ) -> protocol.LogBatchResponse:
        """Keep a batch of a job's log lines, once, within the try's limit."""
        try:
            with self.transaction() as session:
                agent = calling_agent(session, identity, agent_id, batch.incarnation)
                job = session.execute(_JOB_TRY.where(Job.id == job_id)).one_or_none()
                if job is None:
                    raise errors.NotFound(f"no job {job_id}", reason="job_not_found")
                if job.agent_id != agent.id:
                    return protocol.LogBatchResponse(stop=True, reason="the job is no longer this agent's")
                try_of = TryOf(job.ti_id, job.try_number, job.dag_id, job.task_id, job.run_id, job.map_index)
                return append_lines(session, try_of, agent.name, batch, self.settings.task_log_max_bytes, now)
        except IntegrityError:
            return protocol.LogBatchResponse()  # the same batch, kept by a call that raced this one

    def append_logs(
        self, identity: TokenIdentity, agent_id: str, request: protocol.JobLogBatches, *, now: datetime | None = None
    ) -> protocol.JobLogBatchesResponse:
        """Keep batches of several of an agent's jobs' logs in one transaction, each as ``append_log`` would."""
        try:
            return self._append_logs(identity, agent_id, request, now or utcnow())
        except IntegrityError:
            # A batch raced its own retry; the second pass finds it kept and keeps the others.
            return self._append_logs(identity, agent_id, request, now or utcnow())

    def _append_logs(
        self, identity: TokenIdentity, agent_id: str, request: protocol.JobLogBatches, now: datetime
    ) -> protocol.JobLogBatchesResponse:
        refused: list[protocol.LogBatchResponse | None] = []
        taken: list[tuple[TryOf, protocol.LogLines]] = []
        with self.transaction() as session:
            agent = calling_agent(session, identity, agent_id, request.incarnation)
            ids = list({str(batch.job_id) for batch in request.batches})
            jobs = {job.id: job for job in session.execute(_JOB_TRY.where(Job.id.in_(ids)))}
            for batch in request.batches:
                job = jobs.get(str(batch.job_id))
                if job is None:
                    refused.append(protocol.LogBatchResponse(stop=True, reason=f"no job {batch.job_id}"))
                elif job.agent_id != agent.id:
                    refused.append(protocol.LogBatchResponse(stop=True, reason="the job is no longer this agent's"))
                else:
                    refused.append(None)
                    try_of = TryOf(job.ti_id, job.try_number, job.dag_id, job.task_id, job.run_id, job.map_index)
                    taken.append((try_of, batch))
            kept = iter(append_batches(session, taken, agent.name, self.settings.task_log_max_bytes, now))
        answers = []
        for batch, refusal in zip(request.batches, refused, strict=True):
            answer = refusal or next(kept)
            answers.append(protocol.JobLogAnswer(job_id=batch.job_id, stop=answer.stop, reason=answer.reason))
        return protocol.JobLogBatchesResponse(answers=answers)

    def task_log_state(self, ti_id: str, try_number: int) -> TaskLogState | None:
        """The try's log as the plane has it, where the try ran on an agent; None for a try Tether never ran."""
        with self.transaction() as session:
            log = session.get(TaskLog, (ti_id, try_number))
            if log is not None:
                return TaskLogState(
                    agent_name=log.agent_name,
                    lines=log.lines,
                    bytes=log.bytes,
                    truncated=log.truncated,
                    closed=log.closed,
                    last_at=log.last_at,
                )
            ran = session.execute(
                select(Job.agent_name).where(Job.ti_id == ti_id, Job.try_number == try_number)
            ).one_or_none()
        return None if ran is None else TaskLogState(agent_name=ran.agent_name)

    def task_log_lines(self, ti_id: str, try_number: int) -> Iterator[str]:
        """The try's shipped lines in the order they came, read a page of batches at a time."""
        after = 0
        while True:
            with self.statement() as conn:
                rows = conn.execute(
                    select(TaskLogChunk.id, TaskLogChunk.data)
                    .where(
                        TaskLogChunk.ti_id == ti_id,
                        TaskLogChunk.try_number == try_number,
                        TaskLogChunk.id > after,
                    )
                    .order_by(TaskLogChunk.id)
                    .limit(_READ_PAGE)
                ).all()
            for row in rows:
                if row.data:
                    yield from row.data.split("\n")
            if len(rows) < _READ_PAGE:
                return
            after = rows[-1].id

    def purge_task_logs(self, *, batch: int = 500) -> int:
        """Delete the logs of tries Airflow no longer has (``airflow db clean`` removed them), a batch at a time."""
        from airflow.models.taskinstance import TaskInstance
        from airflow.models.taskinstancehistory import TaskInstanceHistory

        with self.transaction() as session:
            tries = session.execute(
                select(TaskLog.ti_id, TaskLog.try_number).order_by(TaskLog.last_at).limit(batch)
            ).all()
            ids = {uuid.UUID(ti_id) for ti_id, _ in tries}
            # Compared as UUIDs through Airflow's own column types: stored differently on each database.
            kept = {str(i) for i in session.scalars(select(TaskInstance.id).where(TaskInstance.id.in_(ids)))}
            kept |= {
                str(i)
                for i in session.scalars(
                    select(TaskInstanceHistory.task_instance_id).where(TaskInstanceHistory.task_instance_id.in_(ids))
                )
            }
            gone = [(ti_id, try_number) for ti_id, try_number in tries if ti_id not in kept]
            for ti_id, try_number in gone:
                session.execute(
                    delete(TaskLogChunk).where(TaskLogChunk.ti_id == ti_id, TaskLogChunk.try_number == try_number)
                )
                session.execute(delete(TaskLog).where(TaskLog.ti_id == ti_id, TaskLog.try_number == try_number))
            return len(gone)


@dataclass(frozen=True)
class TryOf:
    """The try a log belongs to."""

    ti_id: str
    try_number: int
    dag_id: str
    task_id: str
    run_id: str
    map_index: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.ti_id, self.try_number)


def append_lines(
    session: Session,
    try_of: TryOf,
    agent_name: str,
    batch: protocol.LogLines,
    limit: int,
    now: datetime | None = None,
) -> protocol.LogBatchResponse:
    """Keep a batch of lines of a try's log, once, within ``limit`` bytes (a race raises ``IntegrityError``)."""
    return append_batches(session, [(try_of, batch)], agent_name, limit, now)[0]


@dataclass
class _LogSoFar:
    """A try's log as one call has it: read once, then moved on by each of the call's batches."""

    bytes: int
    lines: int
    truncated: bool
    closed: bool = False
    #: Whether this call keeps a batch of it, and what that adds to the stored counters.
    grown: bool = False
    added_bytes: int = 0
    added_lines: int = 0


def append_batches(
    session: Session,
    batches: Sequence[tuple[TryOf, protocol.LogLines]],
    agent_name: str,
    limit: int,
    now: datetime | None = None,
) -> list[protocol.LogBatchResponse]:
    """Keep batches of lines of tries' logs, each once and within ``limit`` bytes; an answer per batch, in order.

    A few statements whatever the number of batches (read the logs, read which of the
    batches are kept already, write the new logs, the chunks, the grown logs), not a
    few per batch: an agent's call carries a batch of each task it runs. Counters grow
    by what the call adds, so calls for one try do not undo each other. Two calls
    starting the same log, or keeping the same batch, at once: ``IntegrityError``.
    """
    now = now or utcnow()
    keys = list(dict.fromkeys(try_of.key for try_of, _ in batches))
    if not keys:
        return []
    rows = session.execute(
        select(TaskLog.ti_id, TaskLog.try_number, TaskLog.bytes, TaskLog.lines, TaskLog.truncated).where(
            tuple_(TaskLog.ti_id, TaskLog.try_number).in_(keys)
        )
    )
    logs = {(row.ti_id, row.try_number): _LogSoFar(row.bytes, row.lines, row.truncated) for row in rows}
    started = [key for key in keys if key not in logs]
    sent = [(try_of.ti_id, try_of.try_number, str(batch.segment), batch.seq) for try_of, batch in batches]
    kept: set[tuple[str, int, str, int]] = set()
    if again := [key for key in sent if key[:2] in logs]:
        columns = (TaskLogChunk.ti_id, TaskLogChunk.try_number, TaskLogChunk.segment, TaskLogChunk.seq)
        kept = {(r[0], r[1], r[2], r[3]) for r in session.execute(select(*columns).where(tuple_(*columns).in_(again)))}
    full = protocol.LogBatchResponse(stop=True, reason=f"the log reached its limit of {limit} bytes")
    answers: list[protocol.LogBatchResponse] = []
    chunks: list[dict[str, Any]] = []
    for (try_of, batch), key in zip(batches, sent, strict=True):
        log = logs.setdefault(key[:2], _LogSoFar(bytes=0, lines=0, truncated=False))
        if log.truncated:
            answers.append(full)
            continue
        if key in kept:
            answers.append(protocol.LogBatchResponse())  # sent again after a lost answer: kept already
            continue
        kept.add(key)
        lines, size, cut = _fit(batch.lines, limit - log.bytes)
        if cut:
            lines.append(
                tether_line(
                    f"Tether cut this log here: it reached [tether] task_log_max_bytes ({limit} bytes). "
                    f"The whole log stays on agent {agent_name}.",
                    at=now,
                )
            )
        chunks.append(
            {
                "ti_id": try_of.ti_id,
                "try_number": try_of.try_number,
                "segment": key[2],
                "seq": batch.seq,
                "data": "\n".join(lines),
                "lines": len(lines),
                "received_at": now,
            }
        )
        log.bytes, log.added_bytes = log.bytes + size, log.added_bytes + size
        log.lines, log.added_lines = log.lines + len(lines), log.added_lines + len(lines)
        log.truncated, log.closed, log.grown = cut, batch.final, True
        answers.append(full if cut else protocol.LogBatchResponse())
    if chunks:
        _write(session, {try_of.key: try_of for try_of, _ in batches}, logs, started, chunks, agent_name, now)
    return answers


def _write(
    session: Session,
    tries: dict[tuple[str, int], TryOf],
    logs: dict[tuple[str, int], _LogSoFar],
    started: list[tuple[str, int]],
    chunks: list[dict[str, Any]],
    agent_name: str,
    now: datetime,
) -> None:
    """The logs a call starts, the chunks it keeps and what it adds to the logs it grows: a statement each."""
    if started:
        session.execute(
            insert(_LOG),
            [
                {
                    "ti_id": key[0],
                    "try_number": key[1],
                    "dag_id": tries[key].dag_id,
                    "task_id": tries[key].task_id,
                    "run_id": tries[key].run_id,
                    "map_index": tries[key].map_index,
                    "agent_name": agent_name,
                    "bytes": logs[key].bytes,
                    "lines": logs[key].lines,
                    "truncated": logs[key].truncated,
                    "closed": logs[key].closed,
                    "first_at": now,
                    "last_at": now,
                }
                for key in started
            ],
        )
    session.execute(insert(_CHUNK), chunks)
    new = set(started)
    grown = [
        {
            "b_ti_id": key[0],
            "b_try_number": key[1],
            "b_bytes": log.added_bytes,
            "b_lines": log.added_lines,
            "b_truncated": log.truncated,
            "b_closed": log.closed,
        }
        for key, log in logs.items()
        if key not in new and log.grown
    ]
    if grown:
        session.execute(
            update(_LOG)
            .where(_LOG.c.ti_id == bindparam("b_ti_id"), _LOG.c.try_number == bindparam("b_try_number"))
            .values(
                agent_name=agent_name,
                bytes=_LOG.c.bytes + bindparam("b_bytes"),
                lines=_LOG.c.lines + bindparam("b_lines"),
                truncated=bindparam("b_truncated"),
                closed=bindparam("b_closed"),
                last_at=now,
            ),
            grown,
        )


def _fit(lines: list[str], room: int) -> tuple[list[str], int, bool]:
    """The lines that fit in ``room`` bytes (with their newlines), their size, and whether any were left out."""
    kept: list[str] = []
    size = 0
    for line in lines:
        cost = len(line.encode()) + 1
        if size + cost > room:
            return kept, size, True
        kept.append(line)
        size += cost
    return kept, size, False

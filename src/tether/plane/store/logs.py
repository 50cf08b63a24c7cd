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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tether import errors, protocol
from tether.plane.models import Job, TaskLog, TaskLogChunk
from tether.plane.store.base import Database, TokenIdentity, utcnow
from tether.plane.store.rules import calling_agent

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
                job = session.get(Job, job_id)
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
        answers = []
        with self.transaction() as session:
            agent = calling_agent(session, identity, agent_id, request.incarnation)
            ids = list({str(batch.job_id) for batch in request.batches})
            jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
            for batch in request.batches:
                job = jobs.get(str(batch.job_id))
                if job is None:
                    answer = protocol.LogBatchResponse(stop=True, reason=f"no job {batch.job_id}")
                elif job.agent_id != agent.id:
                    answer = protocol.LogBatchResponse(stop=True, reason="the job is no longer this agent's")
                else:
                    try_of = TryOf(job.ti_id, job.try_number, job.dag_id, job.task_id, job.run_id, job.map_index)
                    answer = append_lines(session, try_of, agent.name, batch, self.settings.task_log_max_bytes, now)
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


def append_lines(
    session: Session,
    try_of: TryOf,
    agent_name: str,
    batch: protocol.LogLines,
    limit: int,
    now: datetime | None = None,
) -> protocol.LogBatchResponse:
    """Keep a batch of lines of a try's log, once, within ``limit`` bytes (a race raises ``IntegrityError``)."""
    now = now or utcnow()
    log = session.get(TaskLog, (try_of.ti_id, try_of.try_number))
    if log is None:
        log = TaskLog(
            ti_id=try_of.ti_id,
            try_number=try_of.try_number,
            dag_id=try_of.dag_id,
            task_id=try_of.task_id,
            run_id=try_of.run_id,
            map_index=try_of.map_index,
            agent_name=agent_name,
            bytes=0,
            lines=0,
            truncated=False,
            closed=False,
            first_at=now,
        )
        session.add(log)
    elif log.truncated:
        return protocol.LogBatchResponse(stop=True, reason=f"the log reached its limit of {limit} bytes")
    elif _has_batch(session, log, batch):
        return protocol.LogBatchResponse()  # sent again after a lost answer: kept already
    lines, size, cut = _fit(batch.lines, limit - log.bytes)
    if cut:
        lines.append(
            tether_line(
                f"Tether cut this log here: it reached [tether] task_log_max_bytes ({limit} bytes). "
                f"The whole log stays on agent {agent_name}.",
                at=now,
            )
        )
    session.add(
        TaskLogChunk(
            ti_id=log.ti_id,
            try_number=log.try_number,
            segment=str(batch.segment),
            seq=batch.seq,
            data="\n".join(lines),
            lines=len(lines),
            received_at=now,
        )
    )
    log.agent_name = agent_name
    log.bytes += size
    log.lines += len(lines)
    log.truncated = cut
    log.closed = batch.final
    log.last_at = now
    session.flush()
    if cut:
        return protocol.LogBatchResponse(stop=True, reason=f"the log reached its limit of {limit} bytes")
    return protocol.LogBatchResponse()


def _has_batch(session: Session, log: TaskLog, batch: protocol.LogLines) -> bool:
    return (
        session.scalar(
            select(TaskLogChunk.id).where(
                TaskLogChunk.ti_id == log.ti_id,
                TaskLogChunk.try_number == log.try_number,
                TaskLogChunk.segment == str(batch.segment),
                TaskLogChunk.seq == batch.seq,
            )
        )
        is not None
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

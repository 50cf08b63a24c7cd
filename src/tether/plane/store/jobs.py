"""Jobs and leases: the executor queues jobs, agents claim them, pass the start gate and report outcomes.

Every change agents or schedulers race on is one conditional statement checked
by its row count, so it is safe on SQLite and with several schedulers and API
servers on PostgreSQL; PostgreSQL also claims with ``FOR UPDATE SKIP LOCKED`` so
that agents do not queue up behind each other's locks. Where such a statement
changes nothing, the store reads the rows only to say why (or to find a retried
call already done); it never writes the same rule a second way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from tether import errors, protocol
from tether.plane import metrics
from tether.plane.models import Job
from tether.plane.store.base import NOTIFY_CHANNEL, Database, TokenIdentity, utcnow
from tether.plane.store.rules import (
    AGENT,
    CALLER_EXISTS,
    IN_FLIGHT,
    JOB,
    agent_status,
    caller_params,
    calling_agent,
    requeue,
)
from tether.plane.views import TryOut
from tether.protocol import AgentStatus, JobKind, JobState

_CLAIMABLE = (
    select(JOB.c.id, JOB.c.pool_slots, JOB.c.workload, JOB.c.queue, JOB.c.queued_at)
    .where(
        JOB.c.state == JobState.QUEUED.value,
        JOB.c.queue.in_(bindparam("queues", expanding=True)),
        JOB.c.pool_slots <= bindparam("free"),
        JOB.c.kind.in_(bindparam("kinds", expanding=True)),
    )
    .order_by(JOB.c.priority_weight.desc(), JOB.c.queued_at, JOB.c.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)

_LEASE = (
    update(JOB)
    .where(JOB.c.id.in_(bindparam("job_ids", expanding=True)), JOB.c.state == JobState.QUEUED.value)
    .values(
        state=JobState.LEASED.value,
        agent_id=bindparam("holder_id"),
        agent_name=bindparam("holder_name"),
        incarnation=bindparam("holder_incarnation"),
        leased_at=bindparam("now"),
        lease_expires_at=bindparam("expires"),
    )
    .returning(JOB.c.id)
)

#: A claim's transaction commits without waiting for the flush of its WAL (PostgreSQL).
_NO_FLUSH_WAIT = text("SET LOCAL synchronous_commit TO OFF")

#: The start gate: each of the jobs whose unexpired lease the current caller holds becomes a start.
_START = (
    update(JOB)
    .where(
        JOB.c.id.in_(bindparam("job_ids", expanding=True)),
        JOB.c.state == JobState.LEASED.value,
        JOB.c.agent_id == bindparam("holder_id"),
        JOB.c.incarnation == bindparam("holder_incarnation"),
        JOB.c.lease_expires_at > bindparam("now"),
        CALLER_EXISTS,
    )
    .values(state=JobState.RUNNING.value, started_at=bindparam("now"), lease_expires_at=None)
    .returning(JOB.c.id, JOB.c.queue, JOB.c.leased_at)
)

#: An outcome from the job's holder, registered with this token. Any incarnation: an outcome
#: found after the agent restarted is still its holder's to deliver, and the job row says who holds it.
_FINISH = (
    update(JOB)
    .where(
        JOB.c.id == bindparam("job_id"),
        JOB.c.state == JobState.RUNNING.value,
        JOB.c.agent_id == bindparam("holder_id"),
        exists().where(AGENT.c.id == bindparam("holder_id"), AGENT.c.token_id == bindparam("token")),
    )
    .values(
        state=bindparam("outcome"),
        finished_at=bindparam("now"),
        exit_code=bindparam("code"),
        reason=bindparam("why"),
    )
)

#: What a try queued again (same task instance, same try number) overwrites in the row it had.
_REQUEUED_FIELDS = tuple(c.name for c in JOB.columns if c.name not in ("id", "ti_id", "try_number"))


def _upsert_job(insert: Any) -> Any:
    """``insert`` (a dialect's) of one job, replacing the row of the same try if there is one."""
    statement = insert(JOB).values({c.name: bindparam(c.name) for c in JOB.columns})
    return statement.on_conflict_do_update(
        index_elements=[JOB.c.ti_id, JOB.c.try_number],
        set_={name: statement.excluded[name] for name in _REQUEUED_FIELDS},
    )


_PG_ENQUEUED = _upsert_job(postgresql.insert).returning(JOB.c.queue).cte("enqueued")
#: One round trip per job on the scheduler's critical path: the row and the wake-up of waiting
#: agents, which PostgreSQL delivers at commit (once per queue, however many jobs it got).
_ENQUEUE: dict[str, Executable] = {
    "postgresql": select(func.pg_notify(NOTIFY_CHANNEL, _PG_ENQUEUED.c.queue)),
    "sqlite": _upsert_job(sqlite.insert),
}

#: What the executor needs of its jobs on every scheduler loop: not their workloads.
_JOB_VIEWS = select(
    JOB.c.ti_id,
    JOB.c.dag_id,
    JOB.c.task_id,
    JOB.c.run_id,
    JOB.c.map_index,
    JOB.c.try_number,
    JOB.c.state,
    JOB.c.agent_name,
    JOB.c.exit_code,
    JOB.c.reason,
).where(JOB.c.ti_id.in_(bindparam("ti_ids", expanding=True)))
_JOB_VIEWS_CHUNK = 500

#: The work each queue has, by state: one statement on the claim index, however large the fleet.
_LOAD = (
    select(JOB.c.queue, JOB.c.state, func.count().label("jobs"), func.sum(JOB.c.pool_slots).label("slots"))
    .where(JOB.c.state.in_([JobState.QUEUED.value, *IN_FLIGHT]))
    .group_by(JOB.c.queue, JOB.c.state)
)

_REPORTED = {
    protocol.ReportState.RUNNING: JobState.RUNNING,
    protocol.ReportState.SUCCESS: JobState.SUCCESS,
    protocol.ReportState.FAILED: JobState.FAILED,
}


#: Callbacks go before tasks, as Airflow's executors take them: they finish work already done.
CALLBACK_PRIORITY = 2**31 - 1


def _identity(workload: Any, callback_queue: str) -> dict[str, Any]:
    """The columns that say what a workload is, where it goes, and before what."""
    kind = {"ExecuteCallback": JobKind.CALLBACK, "TestConnection": JobKind.CONNECTION_TEST}.get(
        getattr(workload, "type", "ExecuteTask"), JobKind.TASK
    )
    if kind is JobKind.CALLBACK:
        data = workload.callback.data
        return {
            "kind": kind.value,
            "ti_id": str(workload.callback.id),
            "try_number": 1,
            "dag_id": str(data.get("dag_id") or ""),
            "task_id": str(workload.display_name)[:250],
            "run_id": str(data.get("dag_run_id") or ""),
            "map_index": -1,
            "queue": callback_queue,
            "pool_slots": 1,
            "priority_weight": CALLBACK_PRIORITY,
        }
    if kind is JobKind.CONNECTION_TEST:
        return {
            "kind": kind.value,
            "ti_id": str(workload.connection_test_id),
            "try_number": 1,
            "dag_id": "",
            "task_id": str(workload.connection_id)[:250],
            "run_id": "",
            "map_index": -1,
            "queue": workload.queue or callback_queue,
            "pool_slots": 1,
            "priority_weight": CALLBACK_PRIORITY,
        }
    ti = workload.ti
    return {
        "kind": kind.value,
        "ti_id": str(ti.id),
        "try_number": ti.try_number,
        "dag_id": ti.dag_id,
        "task_id": ti.task_id,
        "run_id": ti.run_id,
        "map_index": ti.map_index,
        "queue": ti.queue,
        "pool_slots": ti.pool_slots,
        "priority_weight": ti.priority_weight,
    }


def _aware(moment: datetime) -> datetime:
    """A time read back from SQLite's dialect in a raw statement, which drops its zone: it was written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class QueueLoad:
    """The work of one queue: jobs and task slots waiting, and held by agents (leased or running)."""

    queued: int = 0
    running: int = 0
    queued_slots: int = 0
    running_slots: int = 0


@dataclass(frozen=True)
class JobKey:
    ti_id: str
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int


@dataclass(frozen=True)
class JobView:
    """A job as the executor sees it."""

    key: JobKey
    state: JobState
    agent_name: str | None
    exit_code: int | None
    reason: str | None


class JobStore(Database):
    # -- the executor's side -----------------------------------------------------------

    def enqueue(self, session: Session, workload: Any, *, now: datetime | None = None) -> None:
        """Write the job for an Airflow workload in the caller's transaction.

        A try queued again (the scheduler reset it) replaces the row it had; so
        does a callback or connection test queued again.
        """
        now = now or utcnow()
        values = {
            "id": str(uuid.uuid4()),
            **_identity(workload, self.settings.callback_queue or "default"),
            "state": JobState.QUEUED.value,
            "workload": workload.model_dump_json(),
            "agent_id": None,
            "agent_name": None,
            "incarnation": None,
            "lease_expires_at": None,
            "queued_at": now,
            "leased_at": None,
            "started_at": None,
            "finished_at": None,
            "exit_code": None,
            "reason": None,
        }
        conn = session.connection()
        conn.execute(_ENQUEUE[conn.dialect.name], values)

    def job_views(self, ti_ids: Sequence[str]) -> list[JobView]:
        views = []
        with self.statement() as conn:
            for start in range(0, len(ti_ids), _JOB_VIEWS_CHUNK):
                chunk = list(ti_ids[start : start + _JOB_VIEWS_CHUNK])
                for row in conn.execute(_JOB_VIEWS, {"ti_ids": chunk}):
                    views.append(
                        JobView(
                            key=JobKey(
                                ti_id=row.ti_id,
                                dag_id=row.dag_id,
                                task_id=row.task_id,
                                run_id=row.run_id,
                                map_index=row.map_index,
                                try_number=row.try_number,
                            ),
                            state=JobState(row.state),
                            agent_name=row.agent_name,
                            exit_code=row.exit_code,
                            reason=row.reason,
                        )
                    )
        return views

    def queue_loads(self) -> dict[str, QueueLoad]:
        """Every queue with work waiting or held, and how much (``QueueLoad``)."""
        counts: dict[str, dict[str, int]] = {}
        with self.statement() as conn:
            for row in conn.execute(_LOAD):
                held = counts.setdefault(row.queue, {"queued": 0, "running": 0, "queued_slots": 0, "running_slots": 0})
                which = "queued" if row.state == JobState.QUEUED.value else "running"
                held[which] += int(row.jobs)
                held[f"{which}_slots"] += int(row.slots or 0)
        return {queue: QueueLoad(**held) for queue, held in counts.items()}

    def adoptable(self, ti_ids: Sequence[str], try_numbers: dict[str, int]) -> set[str]:
        """The task instance ids whose current try has a job Tether still tracks."""
        return {
            view.key.ti_id
            for view in self.job_views(ti_ids)
            if try_numbers.get(view.key.ti_id) == view.key.try_number and view.state is not JobState.REVOKED
        }

    # -- what operators see ----------------------------------------------------------------

    def task_tries(self, *, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[TryOut]:
        """Each try of a task instance Tether queued, oldest first (finished ones until they are swept)."""
        with self.transaction() as session:
            rows = session.scalars(
                select(Job)
                .where(
                    Job.kind == JobKind.TASK.value,
                    Job.dag_id == dag_id,
                    Job.run_id == run_id,
                    Job.task_id == task_id,
                    Job.map_index == map_index,
                )
                .order_by(Job.try_number)
            )
            return [TryOut.from_row(row) for row in rows]

    def tries_in_flight(self) -> list[TryOut]:
        """The tries agents hold now (leased or running), by agent then start."""
        with self.transaction() as session:
            rows = session.scalars(
                select(Job)
                .where(Job.state.in_(IN_FLIGHT), Job.agent_id.is_not(None))
                .order_by(Job.agent_name, Job.leased_at, Job.id)
            )
            return [TryOut.from_row(row) for row in rows]

    def revoke(self, ti_id: str, try_number: int, *, now: datetime | None = None) -> bool:
        """Take a job away; a running one is killed at its agent's next heartbeat."""
        now = now or utcnow()
        with self.transaction() as session:
            result = session.execute(
                update(JOB)
                .where(
                    JOB.c.ti_id == ti_id,
                    JOB.c.try_number == try_number,
                    JOB.c.state.in_([JobState.QUEUED.value, *IN_FLIGHT]),
                )
                .values(state=JobState.REVOKED.value, finished_at=now, reason="revoked by the scheduler")
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # -- the agent's side ----------------------------------------------------------------

    def claim(
        self,
        identity: TokenIdentity,
        agent_id: str,
        request: protocol.LeaseRequest,
        *,
        now: datetime | None = None,
    ) -> list[protocol.Lease] | None:
        """The jobs leased to the agent: none if its queues hold nothing it can take, None if it may take nothing."""
        now = now or utcnow()
        with self.transaction() as session:
            agent = calling_agent(session, identity, agent_id, request.incarnation)
            if agent.cordoned or agent_status(agent, self.settings, now) is not AgentStatus.HEALTHY:
                return None
            free = request.free_slots
            conn = session.connection()
            # Agents of revision 1 run tasks only.
            kinds = [k.value for k in JobKind] if agent.protocol >= 2 else [JobKind.TASK.value]
            params = {"queues": list(request.queues), "free": free, "limit": free, "kinds": kinds}
            candidates = conn.execute(_CLAIMABLE, params).all()
            picked = []
            for candidate in candidates:
                if candidate.pool_slots <= free:
                    picked.append(candidate)
                    free -= candidate.pool_slots
                if free <= 0:
                    break
            if not picked:
                return []
            expires = now + self.settings.lease_timeout
            lease = {
                "holder_id": agent.id,
                "holder_name": agent.name,
                "holder_incarnation": agent.incarnation,
                "now": now,
                "expires": expires,
                "job_ids": [c.id for c in picked],
            }
            if conn.dialect.name == "postgresql":
                # The claim commits without waiting for its WAL to reach the disk (ADR 1): a
                # claim a crash loses leaves its jobs queued, and the gate then refuses their
                # start. The gate's own commit waits, and flushes this one with it.
                conn.execute(_NO_FLUSH_WAIT)
            leased = set(conn.execute(_LEASE, lease).scalars())
            for c in picked:
                if c.id in leased:
                    metrics.timing("lease_wait", now - _aware(c.queued_at), queue=c.queue)
            return [
                protocol.Lease(
                    job_id=uuid.UUID(c.id),
                    pool_slots=c.pool_slots,
                    lease_expires_at=expires,
                    workload=json.loads(c.workload),
                )
                for c in picked
                if c.id in leased
            ]

    def start(
        self,
        identity: TokenIdentity,
        agent_id: str,
        job_id: str,
        request: protocol.StartRequest,
        *,
        now: datetime | None = None,
    ) -> protocol.StartResponse:
        now = now or utcnow()
        if not self._start(identity, agent_id, [job_id], request.incarnation, now):
            self._why_not_started(identity, agent_id, job_id, request.incarnation, now)
        return protocol.StartResponse(job_id=uuid.UUID(job_id), state=JobState.RUNNING)

    def start_many(
        self,
        identity: TokenIdentity,
        agent_id: str,
        request: protocol.StartManyRequest,
        *,
        now: datetime | None = None,
    ) -> protocol.StartManyResponse:
        """The start gate for several jobs at once: each starts or is refused on its own.

        A refusal that concerns the caller rather than one job (unknown, deleted or
        superseded agent) refuses the whole call, as it would a single start.
        """
        now = now or utcnow()
        job_ids = list(dict.fromkeys(str(job_id) for job_id in request.job_ids))
        started = self._start(identity, agent_id, job_ids, request.incarnation, now)
        refused: list[protocol.StartRefusal] = []
        if len(started) < len(job_ids):
            with self.transaction() as session:
                calling_agent(session, identity, agent_id, request.incarnation)
            for job_id in job_ids:
                if job_id in started:
                    continue
                try:
                    self._why_not_started(identity, agent_id, job_id, request.incarnation, now)
                except errors.PlaneError as exc:
                    metrics.incr("refusals", reason=exc.reason)
                    refused.append(
                        protocol.StartRefusal(
                            job_id=uuid.UUID(job_id), status=exc.status_code, reason=exc.reason, detail=exc.detail
                        )
                    )
                else:
                    started.add(job_id)
        return protocol.StartManyResponse(
            started=[uuid.UUID(job_id) for job_id in job_ids if job_id in started], refused=refused
        )

    def _start(
        self, identity: TokenIdentity, agent_id: str, job_ids: list[str], incarnation: uuid.UUID, now: datetime
    ) -> set[str]:
        """Pass the jobs through the start gate in one statement; the ids that passed."""
        params = {**caller_params(identity, agent_id, incarnation), "job_ids": job_ids, "now": now}
        with self.statement() as conn:
            rows = conn.execute(_START, params).all()
        for row in rows:
            if row.leased_at is not None:
                metrics.timing("start_gate", now - _aware(row.leased_at), queue=row.queue)
        return {row.id for row in rows}

    def _why_not_started(
        self, identity: TokenIdentity, agent_id: str, job_id: str, incarnation: uuid.UUID, now: datetime
    ) -> None:
        """A job the gate did not start: raise why, or return if it runs already (a retried call).

        An expired lease goes back to the queue on the way, committed even though the call fails.
        """
        with self.transaction() as session:
            agent = calling_agent(session, identity, agent_id, incarnation)
            job = session.get(Job, job_id)
            if job is None:
                raise errors.NotFound(f"no job {job_id}", reason="job_not_found")
            if job.agent_id != agent.id or job.incarnation != agent.incarnation:
                raise errors.Conflict(f"job {job_id} is not leased to this agent", reason="not_holder")
            if job.state == JobState.RUNNING.value:
                return
            if job.state != JobState.LEASED.value:
                raise errors.Conflict(f"job {job_id} is {job.state}, not leased", reason="not_leased")
            expired = job.lease_expires_at is None or job.lease_expires_at <= now
            if expired:
                requeue(session, [job.id])
        if expired:
            raise errors.Conflict(
                f"the lease on job {job_id} expired; it went back to the queue", reason="lease_expired"
            )
        # Startable after all: it changed while the gate looked. One more pass through the same gate.
        if not self._start(identity, agent_id, [job_id], incarnation, now):
            raise errors.Conflict(f"job {job_id} changed while starting; not started", reason="not_leased")

    def report(
        self,
        identity: TokenIdentity,
        agent_id: str,
        job_id: str,
        request: protocol.ReportRequest,
        *,
        now: datetime | None = None,
    ) -> protocol.ReportResponse:
        now = now or utcnow()
        target = _REPORTED[request.state]
        outcome = {
            "job_id": job_id,
            "holder_id": agent_id,
            "token": identity.id,
            "outcome": target.value,
            "now": now,
            "code": request.exit_code,
            "why": request.reason,
        }
        if target.terminal and self._finish(outcome):
            metrics.incr("reports", state=request.state.value)
            return protocol.ReportResponse(job_id=uuid.UUID(job_id), state=target)
        current = self._reportable_state(identity, agent_id, job_id)
        if current is target:
            return protocol.ReportResponse(job_id=uuid.UUID(job_id), state=current)  # said already, or still running
        if current.terminal:
            raise errors.Conflict(f"job {job_id} is already {current.value}; its outcome is final", reason="job_final")
        if current is not JobState.RUNNING:
            raise errors.Conflict(
                f"job {job_id} is {current.value}; it must pass the start gate first", reason="not_started"
            )
        # Reportable after all: it changed while the first try looked. One more try of the same statement.
        if not self._finish(outcome):
            raise errors.Conflict(f"job {job_id} changed while reporting", reason="job_final")
        metrics.incr("reports", state=request.state.value)
        return protocol.ReportResponse(job_id=uuid.UUID(job_id), state=target)

    def _finish(self, outcome: dict[str, Any]) -> bool:
        with self.statement() as conn:
            return bool(conn.execute(_FINISH, outcome).rowcount == 1)

    def _reportable_state(self, identity: TokenIdentity, agent_id: str, job_id: str) -> JobState:
        """The state of a job the caller holds, or the refusal that says why it may not report it."""
        with self.transaction() as session:
            holder = session.execute(
                select(AGENT.c.id).where(AGENT.c.id == agent_id, AGENT.c.token_id == identity.id)
            ).one_or_none()
            if holder is None:
                raise errors.NotFound(f"agent {agent_id} is not registered", reason="agent_not_found")
            job = session.get(Job, job_id)
            if job is None:
                raise errors.NotFound(f"no job {job_id}", reason="job_not_found")
            if job.agent_id != agent_id:
                raise errors.Conflict(f"job {job_id} is not held by this agent", reason="not_holder")
            return JobState(job.state)

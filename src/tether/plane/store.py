"""Every SQL statement Tether runs against the metadata database lives here.

The API routes and the executor take a ``Store``; neither writes SQL of its own.
State changes that other processes race on (claiming, starting, reporting,
sweeping) are conditional UPDATEs checked by row count, so they are safe on
SQLite and with several schedulers and API servers on PostgreSQL; PostgreSQL
additionally claims with ``FOR UPDATE SKIP LOCKED`` so agents do not queue up
behind each other's locks.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, delete, exists, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from tether import errors, protocol
from tether.plane import tokens
from tether.plane.config import PlaneSettings
from tether.plane.models import Agent, AgentToken, AllowedIpRange, AuditEntry, Job
from tether.plane.netaccess import Network, parse_cidrs
from tether.protocol import AgentStatus, JobState

NOTIFY_CHANNEL = "tether_jobs"


# The agent API's hot statements, on the tables rather than the mapped classes and built
# once: an ORM UPDATE evaluates its WHERE clause against every object in the session and
# each new statement computes its cache key again. A thousand agents' heartbeats and lease
# polls spent more CPU in that than in everything else Tether does per call.
_AGENT: Table = Agent.__table__  # type: ignore[assignment]
_JOB: Table = Job.__table__  # type: ignore[assignment]

_AGENT_FOR_CALL = select(
    _AGENT.c.id,
    _AGENT.c.name,
    _AGENT.c.incarnation,
    _AGENT.c.token_id,
    _AGENT.c.cordoned,
    _AGENT.c.last_heartbeat,
    _AGENT.c.deleted_at,
    _AGENT.c.deleted_by,
).where(_AGENT.c.id == bindparam("agent_id"))

#: A heartbeat from the agent process the plane knows; returns ``cordoned``, or no row.
_BEAT = (
    update(_AGENT)
    .where(
        _AGENT.c.id == bindparam("agent_id"),
        _AGENT.c.token_id == bindparam("token"),
        _AGENT.c.incarnation == bindparam("beat_incarnation"),
        _AGENT.c.deleted_at.is_(None),
    )
    .values(
        last_heartbeat=bindparam("now"),
        free_slots=bindparam("slots_free"),
        draining=bindparam("is_draining"),
        metrics=bindparam("beat_metrics"),
    )
    .returning(_AGENT.c.cordoned)
)

#: The calling agent process, as the plane knows it: registered with this token, this incarnation, not deleted.
_CALLER_IS_CURRENT = exists().where(
    _AGENT.c.id == bindparam("holder_id"),
    _AGENT.c.token_id == bindparam("token"),
    _AGENT.c.incarnation == bindparam("holder_incarnation"),
    _AGENT.c.deleted_at.is_(None),
)

_CLAIMABLE = (
    select(_JOB.c.id, _JOB.c.pool_slots, _JOB.c.workload)
    .where(
        _JOB.c.state == JobState.QUEUED.value,
        _JOB.c.queue.in_(bindparam("queues", expanding=True)),
        _JOB.c.pool_slots <= bindparam("free"),
    )
    .order_by(_JOB.c.priority_weight.desc(), _JOB.c.queued_at, _JOB.c.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)

_LEASE = (
    update(_JOB)
    .where(_JOB.c.id.in_(bindparam("job_ids", expanding=True)), _JOB.c.state == JobState.QUEUED.value)
    .values(
        state=JobState.LEASED.value,
        agent_id=bindparam("holder_id"),
        agent_name=bindparam("holder_name"),
        incarnation=bindparam("holder_incarnation"),
        leased_at=bindparam("now"),
        lease_expires_at=bindparam("expires"),
    )
    .returning(_JOB.c.id)
)

_START_LEASED = (
    update(_JOB)
    .where(_JOB.c.state == JobState.LEASED.value, _JOB.c.incarnation == bindparam("holder_incarnation"))
    .values(state=JobState.RUNNING.value, started_at=bindparam("now"), lease_expires_at=None)
)
_START = _START_LEASED.where(_JOB.c.id == bindparam("job_id"))

#: The start gate when nothing is amiss: each of the jobs whose unexpired lease the current
#: caller holds becomes a start, in one statement.
_START_HELD = _START_LEASED.where(
    _JOB.c.id.in_(bindparam("job_ids", expanding=True)),
    _JOB.c.agent_id == bindparam("holder_id"),
    _JOB.c.lease_expires_at > bindparam("now"),
    _CALLER_IS_CURRENT,
).returning(_JOB.c.id)

_FINISH = (
    update(_JOB)
    .where(
        _JOB.c.id == bindparam("job_id"),
        _JOB.c.state == JobState.RUNNING.value,
        _JOB.c.agent_id == bindparam("holder_id"),
    )
    .values(
        state=bindparam("outcome"),
        finished_at=bindparam("now"),
        exit_code=bindparam("code"),
        reason=bindparam("why"),
    )
)

#: An outcome from the job's holder, registered with this token (any incarnation: see ``Store.report``).
_FINISH_HELD = _FINISH.where(
    exists().where(_AGENT.c.id == bindparam("holder_id"), _AGENT.c.token_id == bindparam("token"))
)

#: What a try queued again (same task instance, same try number) overwrites in the row it had.
_REQUEUED_FIELDS = tuple(c.name for c in _JOB.columns if c.name not in ("id", "ti_id", "try_number"))


def _upsert_job(insert: Any) -> Any:
    """``insert`` (a dialect's) of one job, replacing the row of the same try if there is one."""
    statement = insert(_JOB).values({c.name: bindparam(c.name) for c in _JOB.columns})
    return statement.on_conflict_do_update(
        index_elements=[_JOB.c.ti_id, _JOB.c.try_number],
        set_={name: statement.excluded[name] for name in _REQUEUED_FIELDS},
    )


_PG_ENQUEUED = _upsert_job(postgresql.insert).returning(_JOB.c.queue).cte("enqueued")
#: One round trip per job on the scheduler's critical path: the row and the wake-up of waiting
#: agents, which PostgreSQL delivers at commit (once per queue, however many jobs it got).
_ENQUEUE: dict[str, Executable] = {
    "postgresql": select(func.pg_notify(NOTIFY_CHANNEL, _PG_ENQUEUED.c.queue)),
    "sqlite": _upsert_job(sqlite.insert),
}

#: What the executor needs of its jobs on every scheduler loop: not their workloads.
_JOB_VIEWS = select(
    _JOB.c.ti_id,
    _JOB.c.dag_id,
    _JOB.c.task_id,
    _JOB.c.run_id,
    _JOB.c.map_index,
    _JOB.c.try_number,
    _JOB.c.state,
    _JOB.c.agent_name,
    _JOB.c.exit_code,
    _JOB.c.reason,
).where(_JOB.c.ti_id.in_(bindparam("ti_ids", expanding=True)))


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TokenIdentity:
    """The token an agent request was authenticated with."""

    id: str
    name: str


@dataclass(frozen=True)
class AgentView:
    """An agent as operators see it (CLI, REST API, UI)."""

    id: str
    name: str
    status: AgentStatus
    cordoned: bool
    cordon_reason: str | None
    cordoned_by: str | None
    cordoned_at: datetime | None
    last_heartbeat: datetime
    tether_version: str
    airflow_version: str
    python_version: str
    hostname: str
    queues: list[str]
    labels: dict[str, str]
    slots: int
    free_slots: int
    running_jobs: int
    draining: bool
    token_id: str
    token_name: str | None
    first_seen: datetime
    deleted_at: datetime | None
    deleted_by: str | None


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


def airflow_session_factory() -> Callable[[], Session]:
    """Sessions of our own on Airflow's engine.

    Not Airflow's scoped ``settings.Session``: in the scheduler that is the very
    session the scheduling loop has open, and closing it would end its transaction.
    """
    from airflow import settings
    from sqlalchemy.orm import sessionmaker

    if settings.engine is None:
        settings.configure_orm()
    return sessionmaker(bind=settings.engine, expire_on_commit=False)


def token_live(token: AgentToken | None, now: datetime) -> bool:
    return token is not None and token.revoked_at is None and (token.expires_at is None or token.expires_at > now)


def agent_status(
    agent: Any, settings: PlaneSettings, now: datetime, *, token: AgentToken | None = None, check_token: bool = False
) -> AgentStatus:
    """DESIGN §5: TERMINATED once deleted; UNHEALTHY when silent too long or its token is dead."""
    if agent.deleted_at is not None:
        return AgentStatus.TERMINATED
    if now - agent.last_heartbeat > settings.health_timeout:
        return AgentStatus.UNHEALTHY
    if check_token and not token_live(token, now):
        return AgentStatus.UNHEALTHY
    return AgentStatus.HEALTHY


def _snapshot(row: Any, fields: Sequence[str]) -> dict[str, Any]:
    out = {}
    for name in fields:
        value = getattr(row, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


_TOKEN_AUDIT_FIELDS = ("id", "name", "description", "expires_at", "revoked_at", "revoked_by")
_AGENT_AUDIT_FIELDS = ("id", "name", "cordoned", "cordon_reason", "cordoned_by", "cordoned_at", "deleted_at")


class Store:
    def __init__(self, session_factory: Callable[[], Session], *, settings: PlaneSettings) -> None:
        self._session_factory = session_factory
        self.settings = settings

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        session = self._session_factory()
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    @contextmanager
    def _statement(self) -> Iterator[Connection]:
        """A connection for one statement that commits as it runs: no BEGIN and COMMIT round trips.

        For the agent API's hot paths, each a single conditional statement: atomic on its own.
        """
        session = self._session_factory()
        try:
            if session.get_bind().dialect.driver != "psycopg2":
                yield session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                return
            conn = session.connection()
            driver = conn.connection.dbapi_connection
            assert driver is not None
            # psycopg2's own switch, which sends nothing. SQLAlchemy's AUTOCOMMIT isolation level
            # resets the connection as it goes back to the pool with one more statement (SET
            # default_transaction_isolation): a second round trip, and a second transaction on
            # the server, for every heartbeat, start and report.
            driver.autocommit = True
            try:
                yield conn
            finally:
                if not driver.closed:  # a lost connection is discarded by the pool
                    driver.autocommit = False
        finally:
            session.close()

    @staticmethod
    def _is_postgres(session: Session) -> bool:
        return session.get_bind().dialect.name == "postgresql"

    def _notify(self, session: Session, queues: Iterable[str]) -> None:
        # NOTIFY is transactional: waiting agents wake only once the jobs are committed.
        if self._is_postgres(session):
            for queue in set(queues):
                session.execute(text("SELECT pg_notify(:channel, :queue)"), {"channel": NOTIFY_CHANNEL, "queue": queue})

    @staticmethod
    def _audit(
        session: Session,
        *,
        actor: str,
        action: str,
        target_type: str,
        target_id: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        now: datetime,
    ) -> None:
        session.add(
            AuditEntry(
                at=now,
                actor=actor,
                action=action,
                target_type=target_type,
                target_id=target_id,
                before=before,
                after=after,
            )
        )

    def audit_log(
        self, *, limit: int = 100, target_type: str | None = None, target_id: str | None = None
    ) -> list[AuditEntry]:
        with self._tx() as session:
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            if target_type:
                query = query.where(AuditEntry.target_type == target_type)
            if target_id:
                query = query.where(AuditEntry.target_id == target_id)
            rows = list(session.scalars(query))
            session.expunge_all()
        return rows

    # -- tokens -----------------------------------------------------------------

    def create_token(
        self,
        *,
        name: str,
        description: str | None = None,
        expires_in: timedelta | None = None,
        created_by: str | None = None,
        now: datetime | None = None,
    ) -> tuple[tokens.IssuedToken, AgentToken]:
        now = now or utcnow()
        with self._tx() as session:
            live = self._live_tokens(session, now)
            if any(t.name == name for t in live):
                raise errors.Conflict(
                    f"an active agent token named {name!r} already exists; pick another name or revoke it",
                    reason="token_name_taken",
                )
            if len(live) >= self.settings.max_agent_tokens:
                raise errors.Invalid(
                    f"at most {self.settings.max_agent_tokens} agent tokens may be active at once; revoke one "
                    "or raise [tether] max_agent_tokens",
                    reason="token_limit",
                )
            issued = tokens.issue()
            row = AgentToken(
                id=issued.id,
                name=name,
                description=description,
                secret_hash=issued.secret_hash,
                created_at=now,
                created_by=created_by,
                expires_at=now + expires_in if expires_in is not None else None,
            )
            session.add(row)
            session.flush()
            self._audit(
                session,
                actor=created_by or "unknown",
                action="token.create",
                target_type="token",
                target_id=row.id,
                before=None,
                after=_snapshot(row, _TOKEN_AUDIT_FIELDS),
                now=now,
            )
            session.expunge(row)
        return issued, row

    @staticmethod
    def _live_tokens(session: Session, now: datetime) -> list[AgentToken]:
        return list(
            session.scalars(
                select(AgentToken).where(
                    AgentToken.revoked_at.is_(None),
                    or_(AgentToken.expires_at.is_(None), AgentToken.expires_at > now),
                )
            )
        )

    def list_tokens(self) -> list[AgentToken]:
        with self._tx() as session:
            rows = list(session.scalars(select(AgentToken).order_by(AgentToken.created_at)))
            session.expunge_all()
        return rows

    def get_token(self, token_id: str) -> AgentToken:
        with self._tx() as session:
            row = session.get(AgentToken, token_id)
            if row is None:
                raise errors.NotFound(f"no agent token with id {token_id!r}", reason="token_not_found")
            session.expunge(row)
        return row

    def revoke_token(self, token_id: str, *, revoked_by: str | None = None, now: datetime | None = None) -> AgentToken:
        """Revoke a token and fence the agents that use it: their running jobs fail, their leases go back."""
        now = now or utcnow()
        with self._tx() as session:
            row = session.get(AgentToken, token_id)
            if row is None:
                raise errors.NotFound(f"no agent token with id {token_id!r}", reason="token_not_found")
            if row.revoked_at is None:
                before = _snapshot(row, _TOKEN_AUDIT_FIELDS)
                row.revoked_at = now
                row.revoked_by = revoked_by
                session.flush()
                for agent_id in session.scalars(select(Agent.id).where(Agent.token_id == token_id)).all():
                    self._settle_agent_jobs(session, agent_id, reason=f"agent token {row.name} was revoked", now=now)
                self._audit(
                    session,
                    actor=revoked_by or "unknown",
                    action="token.revoke",
                    target_type="token",
                    target_id=row.id,
                    before=before,
                    after=_snapshot(row, _TOKEN_AUDIT_FIELDS),
                    now=now,
                )
            session.expunge(row)
        return row

    def authenticate(self, text_: str, *, now: datetime | None = None) -> TokenIdentity:
        now = now or utcnow()
        try:
            token_id = tokens.parse_id(text_)
        except tokens.MalformedToken as exc:
            raise errors.Unauthorized(str(exc), reason="token_malformed") from None
        with self._tx() as session:
            row = session.get(AgentToken, token_id)
            if row is None or not tokens.matches(text_, row.secret_hash):
                raise errors.Unauthorized("the agent token is not known to this plane", reason="token_unknown")
            if row.revoked_at is not None:
                raise errors.Unauthorized(
                    f"the agent token {tokens.short_form(row.id)} ({row.name}) was revoked",
                    reason="token_revoked",
                )
            if row.expires_at is not None and row.expires_at <= now:
                expired_at = f"{row.expires_at:%Y-%m-%d %H:%M} UTC"
                raise errors.Unauthorized(
                    f"the agent token {tokens.short_form(row.id)} ({row.name}) expired at {expired_at}",
                    reason="token_expired",
                )
            # Written at most once a minute: last-used is for people, not worth a write per request.
            if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
                row.last_used_at = now
            return TokenIdentity(id=row.id, name=row.name)

    # -- agents -----------------------------------------------------------------

    def register(
        self, identity: TokenIdentity, request: protocol.RegisterRequest, *, now: datetime | None = None
    ) -> Agent:
        try:
            return self._register(identity, request, now=now or utcnow())
        except IntegrityError:
            # Two processes registered a new name at the same instant; the other one won.
            raise errors.Conflict(
                f"the name {request.name!r} was just registered by another agent; give this agent another name",
                reason="name_taken",
            ) from None

    def _register(self, identity: TokenIdentity, request: protocol.RegisterRequest, *, now: datetime) -> Agent:
        incarnation = str(request.incarnation)
        with self._tx() as session:
            agent = session.scalars(select(Agent).where(Agent.name == request.name).with_for_update()).one_or_none()
            if agent is None:
                agent = Agent(
                    id=str(uuid.uuid4()),
                    name=request.name,
                    first_seen=now,
                    cordoned=False,
                    draining=False,
                    metrics={},
                )
                session.add(agent)
            elif agent.deleted_at is not None:
                # Deleted by an operator and back: a fresh record, like a Kubernetes node re-joining.
                if agent.incarnation != incarnation:
                    self._settle_agent_jobs(session, agent.id, reason=f"agent {agent.name} restarted", now=now)
                agent.deleted_at = None
                agent.deleted_by = None
                agent.cordoned = False
                agent.cordon_reason = None
                agent.cordoned_by = None
                agent.cordoned_at = None
                agent.first_seen = now
            elif agent.incarnation != incarnation:
                if agent_status(agent, self.settings, now) is AgentStatus.HEALTHY:
                    raise errors.Conflict(
                        f"the name {request.name!r} is held by a live agent on host {agent.hostname!r} "
                        f"(last heartbeat {(now - agent.last_heartbeat).total_seconds():.0f}s ago); give this "
                        "agent another name or stop the other one",
                        reason="name_taken",
                    )
                # The previous incarnation is dead: settle its jobs before this one takes the name.
                self._settle_agent_jobs(session, agent.id, reason=f"agent {agent.name} restarted", now=now)
            agent.incarnation = incarnation
            agent.token_id = identity.id
            agent.hostname = request.hostname
            agent.tether_version = request.tether_version
            agent.airflow_version = request.airflow_version
            agent.python_version = request.python_version
            agent.roles = [r.value for r in request.roles]
            agent.queues = list(request.queues)
            agent.labels = dict(request.labels)
            agent.slots = request.slots
            agent.free_slots = request.slots
            agent.draining = False
            agent.registered_at = now
            agent.last_heartbeat = now
            agent.heartbeat_interval = self.settings.heartbeat_interval.total_seconds()
            session.flush()
            session.expunge(agent)
        return agent

    def _agent_for_call(self, session: Session, identity: TokenIdentity, agent_id: str, incarnation: uuid.UUID) -> Any:
        """The calling agent's row (the columns of ``_AGENT_FOR_CALL``), or the refusal that says why not."""
        agent = session.connection().execute(_AGENT_FOR_CALL, {"agent_id": agent_id}).one_or_none()
        if agent is None:
            raise errors.NotFound(f"agent {agent_id} is not registered; register again", reason="agent_not_found")
        if agent.deleted_at is not None:
            raise errors.NotFound(
                f"agent {agent.name} was deleted by {agent.deleted_by or 'an operator'}; register again",
                reason="agent_deleted",
            )
        if agent.token_id != identity.id:
            raise errors.Conflict(
                f"agent {agent.name} was registered with another agent token", reason="token_mismatch"
            )
        if agent.incarnation != str(incarnation):
            raise errors.Conflict(
                f"agent {agent.name} has been taken over by another process; this one must stop",
                reason="superseded",
            )
        return agent

    def heartbeat(
        self,
        identity: TokenIdentity,
        agent_id: str,
        request: protocol.HeartbeatRequest,
        *,
        now: datetime | None = None,
    ) -> protocol.HeartbeatResponse:
        now = now or utcnow()
        beat = {
            "agent_id": agent_id,
            "token": identity.id,
            "beat_incarnation": str(request.incarnation),
            "now": now,
            "slots_free": request.free_slots,
            "is_draining": request.draining,
            "beat_metrics": dict(request.metrics),
        }
        if not request.running_jobs:
            # An idle agent - the common case, and the whole load of a large fleet - in one
            # statement. Anything unusual (unknown, deleted, superseded) takes the path below,
            # which says what is wrong.
            with self._statement() as conn:
                cordoned = conn.execute(_BEAT, beat).scalar_one_or_none()
            if cordoned is not None:
                return self._heartbeat_answer(cordoned, [])
        with self._tx() as session:
            agent = self._agent_for_call(session, identity, agent_id, request.incarnation)
            cordoned = session.connection().execute(_BEAT, beat).scalar_one_or_none()
            # Anything the agent runs that the plane no longer lets it hold must die:
            # revoked, failed by a sweep, or handed to another agent.
            held = (
                set(
                    session.scalars(
                        select(Job.id).where(
                            Job.agent_id == agent.id,
                            Job.incarnation == agent.incarnation,
                            Job.state.in_([JobState.LEASED.value, JobState.RUNNING.value]),
                        )
                    )
                )
                if request.running_jobs
                else set()
            )
            commands = []
            for job_id in request.running_jobs:
                if str(job_id) not in held:
                    job = session.get(Job, str(job_id))
                    why = f"the plane holds this job as {job.state}" if job else "the plane no longer knows this job"
                    commands.append(protocol.KillJob(job_id=job_id, reason=why))
            return self._heartbeat_answer(agent.cordoned if cordoned is None else cordoned, commands)

    def _heartbeat_answer(self, cordoned: bool, commands: list[protocol.KillJob]) -> protocol.HeartbeatResponse:
        return protocol.HeartbeatResponse(
            status=AgentStatus.HEALTHY,
            cordoned=cordoned,
            heartbeat_interval=self.settings.heartbeat_interval.total_seconds(),
            commands=commands,
        )

    def agent_views(self, *, now: datetime | None = None) -> list[AgentView]:
        now = now or utcnow()
        with self._tx() as session:
            agents = list(session.scalars(select(Agent).order_by(Agent.name)))
            return self._views(session, agents, now)

    def agent_view(self, agent_ref: str, *, now: datetime | None = None) -> AgentView:
        now = now or utcnow()
        with self._tx() as session:
            return self._views(session, [self._find_agent(session, agent_ref)], now)[0]

    def _views(self, session: Session, agents: Sequence[Agent], now: datetime) -> list[AgentView]:
        token_rows = {
            t.id: t for t in session.scalars(select(AgentToken).where(AgentToken.id.in_({a.token_id for a in agents})))
        }
        running: dict[str, int] = dict(
            session.execute(  # type: ignore[arg-type]
                select(Job.agent_id, func.count())
                .where(Job.state.in_([JobState.LEASED.value, JobState.RUNNING.value]), Job.agent_id.is_not(None))
                .group_by(Job.agent_id)
            ).all()
        )
        views = []
        for agent in agents:
            token = token_rows.get(agent.token_id)
            views.append(
                AgentView(
                    id=agent.id,
                    name=agent.name,
                    status=agent_status(agent, self.settings, now, token=token, check_token=True),
                    cordoned=agent.cordoned,
                    cordon_reason=agent.cordon_reason,
                    cordoned_by=agent.cordoned_by,
                    cordoned_at=agent.cordoned_at,
                    last_heartbeat=agent.last_heartbeat,
                    tether_version=agent.tether_version,
                    airflow_version=agent.airflow_version,
                    python_version=agent.python_version,
                    hostname=agent.hostname,
                    queues=list(agent.queues),
                    labels=dict(agent.labels),
                    slots=agent.slots,
                    free_slots=agent.free_slots,
                    running_jobs=running.get(agent.id, 0),
                    draining=agent.draining,
                    token_id=agent.token_id,
                    token_name=token.name if token else None,
                    first_seen=agent.first_seen,
                    deleted_at=agent.deleted_at,
                    deleted_by=agent.deleted_by,
                )
            )
        return views

    @staticmethod
    def _find_agent(session: Session, agent_ref: str) -> Agent:
        agent = (
            session.get(Agent, agent_ref) or session.scalars(select(Agent).where(Agent.name == agent_ref)).one_or_none()
        )
        if agent is None:
            raise errors.NotFound(f"no agent with id or name {agent_ref!r}", reason="agent_not_found")
        return agent

    def cordon(self, agent_ref: str, *, reason: str | None, actor: str, now: datetime | None = None) -> AgentView:
        """No new work for the agent; what runs there finishes. Survives the agent's restarts."""
        now = now or utcnow()
        with self._tx() as session:
            agent = self._find_agent(session, agent_ref)
            before = _snapshot(agent, _AGENT_AUDIT_FIELDS)
            agent.cordoned = True
            agent.cordon_reason = reason
            agent.cordoned_by = actor
            agent.cordoned_at = now
            # Leases not yet started are given back so other agents can run them now.
            leased = session.scalars(
                select(Job.id).where(Job.agent_id == agent.id, Job.state == JobState.LEASED.value)
            ).all()
            self._requeue(session, leased, now=now)
            session.flush()
            self._audit(
                session,
                actor=actor,
                action="agent.cordon",
                target_type="agent",
                target_id=agent.id,
                before=before,
                after=_snapshot(agent, _AGENT_AUDIT_FIELDS),
                now=now,
            )
            agent_id = agent.id
        return self.agent_view(agent_id, now=now)

    def uncordon(self, agent_ref: str, *, actor: str, now: datetime | None = None) -> AgentView:
        now = now or utcnow()
        with self._tx() as session:
            agent = self._find_agent(session, agent_ref)
            before = _snapshot(agent, _AGENT_AUDIT_FIELDS)
            agent.cordoned = False
            agent.cordon_reason = None
            agent.cordoned_by = None
            agent.cordoned_at = None
            session.flush()
            self._audit(
                session,
                actor=actor,
                action="agent.uncordon",
                target_type="agent",
                target_id=agent.id,
                before=before,
                after=_snapshot(agent, _AGENT_AUDIT_FIELDS),
                now=now,
            )
            agent_id = agent.id
        return self.agent_view(agent_id, now=now)

    def delete_agent(self, agent_ref: str, *, actor: str, now: datetime | None = None) -> AgentView:
        """Mark the agent TERMINATED; if it is alive it registers again on its next call."""
        now = now or utcnow()
        with self._tx() as session:
            agent = self._find_agent(session, agent_ref)
            before = _snapshot(agent, _AGENT_AUDIT_FIELDS)
            if agent.deleted_at is None:
                agent.deleted_at = now
                agent.deleted_by = actor
                leased = session.scalars(
                    select(Job.id).where(Job.agent_id == agent.id, Job.state == JobState.LEASED.value)
                ).all()
                self._requeue(session, leased, now=now)
                session.flush()
                self._audit(
                    session,
                    actor=actor,
                    action="agent.delete",
                    target_type="agent",
                    target_id=agent.id,
                    before=before,
                    after=_snapshot(agent, _AGENT_AUDIT_FIELDS),
                    now=now,
                )
            agent_id = agent.id
        return self.agent_view(agent_id, now=now)

    # -- allowed IP ranges ------------------------------------------------------

    def allowed_ranges(self) -> list[AllowedIpRange]:
        with self._tx() as session:
            rows = list(session.scalars(select(AllowedIpRange).order_by(AllowedIpRange.cidr)))
            session.expunge_all()
        return rows

    def allowed_networks(self) -> list[Network]:
        return parse_cidrs(row.cidr for row in self.allowed_ranges())

    def set_allowed_ranges(
        self, cidrs: Sequence[str], *, actor: str, mode: str = "set", now: datetime | None = None
    ) -> list[AllowedIpRange]:
        """Replace (``set``), extend (``add``) or shrink (``remove``) the allowed ranges."""
        now = now or utcnow()
        networks = [str(n) for n in parse_cidrs(cidrs)]
        with self._tx() as session:
            current = {row.cidr: row for row in session.scalars(select(AllowedIpRange))}
            before = sorted(current)
            if mode == "set":
                target = set(networks)
            elif mode == "add":
                target = set(current) | set(networks)
            elif mode == "remove":
                missing = sorted(set(networks) - set(current))
                if missing:
                    raise errors.NotFound(
                        f"not in the allowed IP ranges: {', '.join(missing)}", reason="range_not_found"
                    )
                target = set(current) - set(networks)
            else:
                raise ValueError(f"unknown mode {mode!r}")
            for cidr in set(current) - target:
                session.delete(current[cidr])
            for cidr in target - set(current):
                session.add(AllowedIpRange(cidr=cidr, created_at=now, created_by=actor))
            if sorted(target) != before:
                self._audit(
                    session,
                    actor=actor,
                    action=f"allowed_ip_ranges.{mode}",
                    target_type="allowed_ip_ranges",
                    target_id="*",
                    before={"ranges": before},
                    after={"ranges": sorted(target)},
                    now=now,
                )
        return self.allowed_ranges()

    # -- jobs: agent side -------------------------------------------------------

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
        with self._tx() as session:
            agent = self._agent_for_call(session, identity, agent_id, request.incarnation)
            if agent.cordoned or agent_status(agent, self.settings, now) is not AgentStatus.HEALTHY:
                return None
            free = request.free_slots
            conn = session.connection()
            candidates = conn.execute(_CLAIMABLE, {"queues": list(request.queues), "free": free, "limit": free}).all()
            expires = now + self.settings.lease_timeout
            lease = {
                "holder_id": agent.id,
                "holder_name": agent.name,
                "holder_incarnation": agent.incarnation,
                "now": now,
                "expires": expires,
            }
            picked = []
            for candidate in candidates:
                if candidate.pool_slots <= free:
                    picked.append(candidate)
                    free -= candidate.pool_slots
                if free <= 0:
                    break
            if not picked:
                return []
            leased = set(conn.execute(_LEASE, {**lease, "job_ids": [c.id for c in picked]}).scalars())
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
        if not self._start_held(identity, agent_id, [job_id], request.incarnation, now):
            self._start_or_say_why(identity, agent_id, job_id, request.incarnation, now)
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
        started = self._start_held(identity, agent_id, job_ids, request.incarnation, now)
        refused: list[protocol.StartRefusal] = []
        if len(started) < len(job_ids):
            with self._tx() as session:
                self._agent_for_call(session, identity, agent_id, request.incarnation)
            for job_id in job_ids:
                if job_id in started:
                    continue
                try:
                    self._start_or_say_why(identity, agent_id, job_id, request.incarnation, now)
                except errors.PlaneError as exc:
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

    def _start_held(
        self, identity: TokenIdentity, agent_id: str, job_ids: list[str], incarnation: uuid.UUID, now: datetime
    ) -> set[str]:
        """Start the jobs the caller holds unexpired leases on, in one statement; the ids it started."""
        params = {
            "job_ids": job_ids,
            "holder_id": agent_id,
            "holder_incarnation": str(incarnation),
            "token": identity.id,
            "now": now,
        }
        with self._statement() as conn:
            return set(conn.execute(_START_HELD, params).scalars())

    def _start_or_say_why(
        self, identity: TokenIdentity, agent_id: str, job_id: str, incarnation: uuid.UUID, now: datetime
    ) -> None:
        """A job ``_start_held`` did not start: raise why, or start it if it turns out startable.

        Already running (a retried call) counts as started.
        """
        with self._tx() as session:
            agent = self._agent_for_call(session, identity, agent_id, incarnation)
            job = session.get(Job, job_id)
            if job is None:
                raise errors.NotFound(f"no job {job_id}", reason="job_not_found")
            if job.agent_id != agent.id or job.incarnation != agent.incarnation:
                raise errors.Conflict(f"job {job_id} is not leased to this agent", reason="not_holder")
            if job.state == JobState.RUNNING.value:
                return
            if job.state != JobState.LEASED.value:
                raise errors.Conflict(f"job {job_id} is {job.state}, not leased", reason="not_leased")
            if job.lease_expires_at is None or job.lease_expires_at <= now:
                # Committed before refusing: the job must go back even though the call fails.
                self._requeue(session, [job.id], now=now)
                expired = True
            else:
                expired = False
                started = session.connection().execute(
                    _START, {"job_id": job.id, "holder_incarnation": agent.incarnation, "now": now}
                )
                if started.rowcount != 1:
                    raise errors.Conflict(f"job {job_id} changed while starting; not started", reason="not_leased")
        if expired:
            raise errors.Conflict(
                f"the lease on job {job_id} expired; it went back to the queue", reason="lease_expired"
            )

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
        target = {
            protocol.ReportState.RUNNING: JobState.RUNNING,
            protocol.ReportState.SUCCESS: JobState.SUCCESS,
            protocol.ReportState.FAILED: JobState.FAILED,
        }[request.state]
        if target.terminal:
            outcome = {
                "job_id": job_id,
                "holder_id": agent_id,
                "token": identity.id,
                "outcome": target.value,
                "now": now,
                "code": request.exit_code,
                "why": request.reason,
            }
            with self._statement() as conn:
                if conn.execute(_FINISH_HELD, outcome).rowcount == 1:
                    return protocol.ReportResponse(job_id=uuid.UUID(job_id), state=target)
        # Not recorded: the path below says why (or finds it already recorded, for a retried call).
        with self._tx() as session:
            # The incarnation is not checked here: an outcome found after a restart
            # is still the holder's to deliver, and the job row says who holds it.
            agent = session.get(Agent, agent_id)
            if agent is None or agent.token_id != identity.id:
                raise errors.NotFound(f"agent {agent_id} is not registered", reason="agent_not_found")
            job = session.get(Job, job_id)
            if job is None:
                raise errors.NotFound(f"no job {job_id}", reason="job_not_found")
            if job.agent_id != agent.id:
                raise errors.Conflict(f"job {job_id} is not held by this agent", reason="not_holder")
            current = JobState(job.state)
            if current.terminal:
                if current is target:
                    return protocol.ReportResponse(job_id=uuid.UUID(job.id), state=current)
                raise errors.Conflict(
                    f"job {job_id} is already {current.value}; its outcome is final", reason="job_final"
                )
            if current is not JobState.RUNNING:
                raise errors.Conflict(
                    f"job {job_id} is {current.value}; it must pass the start gate first",
                    reason="not_started",
                )
            if target is JobState.RUNNING:
                return protocol.ReportResponse(job_id=uuid.UUID(job.id), state=current)
            finished = session.connection().execute(
                _FINISH,
                {
                    "job_id": job.id,
                    "holder_id": agent.id,
                    "outcome": target.value,
                    "now": now,
                    "code": request.exit_code,
                    "why": request.reason,
                },
            )
            if finished.rowcount != 1:
                raise errors.Conflict(f"job {job_id} changed while reporting", reason="job_final")
            return protocol.ReportResponse(job_id=uuid.UUID(job.id), state=target)

    # -- jobs: executor side ----------------------------------------------------

    def enqueue(self, session: Session, workload: Any, *, now: datetime | None = None) -> None:
        """Write the job for an ``ExecuteTask`` workload in the caller's transaction.

        A try queued again (the scheduler reset it) replaces the row it had.
        """
        now = now or utcnow()
        ti = workload.ti
        values = {
            "id": str(uuid.uuid4()),
            "ti_id": str(ti.id),
            "try_number": ti.try_number,
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
            "run_id": ti.run_id,
            "map_index": ti.map_index,
            "queue": ti.queue,
            "pool_slots": ti.pool_slots,
            "priority_weight": ti.priority_weight,
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
        statement = _ENQUEUE.get(conn.dialect.name)
        if statement is not None:
            conn.execute(statement, values)
            return
        # Databases without INSERT ... ON CONFLICT: look first.
        existing = session.scalars(
            select(Job).where(Job.ti_id == values["ti_id"], Job.try_number == ti.try_number)
        ).one_or_none()
        if existing is None:
            session.add(Job(**values))
        else:
            for key, value in values.items():
                if key != "id":
                    setattr(existing, key, value)
        session.flush()
        self._notify(session, [ti.queue])

    def job_views(self, ti_ids: Sequence[str]) -> list[JobView]:
        if not ti_ids:
            return []
        views = []
        with self._statement() as conn:
            for chunk_start in range(0, len(ti_ids), 500):
                chunk = list(ti_ids[chunk_start : chunk_start + 500])
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

    def revoke(self, ti_id: str, try_number: int, *, now: datetime | None = None) -> bool:
        """Take a job away; a running one is killed at its agent's next heartbeat."""
        now = now or utcnow()
        with self._tx() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.ti_id == ti_id,
                    Job.try_number == try_number,
                    Job.state.in_([JobState.QUEUED.value, JobState.LEASED.value, JobState.RUNNING.value]),
                )
                .values(state=JobState.REVOKED.value, finished_at=now, reason="revoked by the scheduler")
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def _requeue(self, session: Session, job_ids: Sequence[str], *, now: datetime) -> None:
        if not job_ids:
            return
        session.execute(
            update(Job)
            .where(Job.id.in_(list(job_ids)), Job.state == JobState.LEASED.value)
            .values(
                state=JobState.QUEUED.value,
                agent_id=None,
                agent_name=None,
                incarnation=None,
                leased_at=None,
                lease_expires_at=None,
            )
        )
        queues = session.scalars(select(Job.queue).where(Job.id.in_(list(job_ids)))).all()
        self._notify(session, queues)

    def _settle_agent_jobs(self, session: Session, agent_id: str, *, reason: str, now: datetime) -> None:
        leased = session.scalars(
            select(Job.id).where(Job.agent_id == agent_id, Job.state == JobState.LEASED.value)
        ).all()
        self._requeue(session, leased, now=now)
        session.execute(
            update(Job)
            .where(Job.agent_id == agent_id, Job.state == JobState.RUNNING.value)
            .values(state=JobState.FAILED.value, finished_at=now, reason=reason)
        )

    def sweep(self, *, now: datetime | None = None, judge_silence: bool = True) -> dict[str, int]:
        """Return expired leases to the queue and settle the jobs of unhealthy agents.

        Every change is conditional on the state it expects, so two schedulers
        sweeping at once do the work once. With ``judge_silence`` false, agents
        are not held to their missed heartbeats: the caller knows the agent API
        was not there to hear them (see ADR 4).
        """
        now = now or utcnow()
        counts = {"expired_leases": 0, "unhealthy_agents": 0}
        with self._tx() as session:
            expired = session.scalars(
                select(Job.id).where(Job.state == JobState.LEASED.value, Job.lease_expires_at <= now)
            ).all()
            self._requeue(session, expired, now=now)
            counts["expired_leases"] = len(expired)
            cutoff = now - self.settings.health_timeout
            dead: Sequence[str] = ()
            if judge_silence:
                dead = session.scalars(
                    select(Agent.id)
                    .join(Job, Job.agent_id == Agent.id)
                    .where(
                        Agent.last_heartbeat < cutoff,
                        Job.state.in_([JobState.LEASED.value, JobState.RUNNING.value]),
                    )
                    .distinct()
                ).all()
            dead_tokens = session.scalars(
                select(Agent.id)
                .join(AgentToken, AgentToken.id == Agent.token_id)
                .join(Job, Job.agent_id == Agent.id)
                .where(
                    or_(AgentToken.revoked_at.is_not(None), AgentToken.expires_at <= now),
                    Job.state.in_([JobState.LEASED.value, JobState.RUNNING.value]),
                )
                .distinct()
            ).all()
            for agent_id in dead_tokens:
                self._settle_agent_jobs(session, agent_id, reason="the agent's token expired or was revoked", now=now)
            for agent_id in dead:
                self._settle_agent_jobs(
                    session,
                    agent_id,
                    reason="the agent missed its heartbeats and was declared unhealthy",
                    now=now,
                )
            # Jobs whose agent row is gone, given the same grace as a silent agent.
            orphans = session.scalars(
                select(Job.id).where(
                    Job.state.in_([JobState.LEASED.value, JobState.RUNNING.value]),
                    Job.agent_id.is_not(None),
                    func.coalesce(Job.started_at, Job.leased_at) < cutoff,
                    ~select(Agent.id).where(Agent.id == Job.agent_id).exists(),
                )
            ).all()
            if orphans:
                self._requeue(session, orphans, now=now)
                session.execute(
                    update(Job)
                    .where(Job.id.in_(list(orphans)), Job.state == JobState.RUNNING.value)
                    .values(state=JobState.FAILED.value, finished_at=now, reason="the agent was deleted")
                )
            counts["unhealthy_agents"] = len(dead)
        return counts

    def purge(self, *, now: datetime | None = None) -> int:
        now = now or utcnow()
        cutoff = now - self.settings.job_retention
        with self._tx() as session:
            result = session.execute(
                delete(Job).where(
                    Job.state.in_([s.value for s in JobState if s.terminal]),
                    Job.finished_at < cutoff,
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def adoptable(self, ti_ids: Sequence[str], try_numbers: dict[str, int]) -> set[str]:
        """Return the task instance ids whose current try has a job Tether still tracks."""
        return {
            view.key.ti_id
            for view in self.job_views(ti_ids)
            if try_numbers.get(view.key.ti_id) == view.key.try_number and view.state is not JobState.REVOKED
        }

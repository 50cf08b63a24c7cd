"""The agent registry: registration, heartbeats, what operators see and do (cordon, delete), allowed IP ranges."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Literal

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tether import errors, protocol
from tether.plane.models import Agent, AgentToken, AllowedIpRange, Job, SentinelReport
from tether.plane.netaccess import Network, parse_cidrs
from tether.plane.store.base import Database, TokenIdentity, audit, snapshot, utcnow
from tether.plane.store.rules import (
    AGENT,
    CALLER_IS_CURRENT,
    IN_FLIGHT,
    agent_status,
    caller_params,
    calling_agent,
    requeue_leases_of,
    settle_agent,
)
from tether.plane.views import AgentOut, PodOut, VersionSupport
from tether.protocol import AgentStatus

_AGENT_AUDIT_FIELDS = ("id", "name", "cordoned", "cordon_reason", "cordoned_by", "cordoned_at", "deleted_at")

# On the table rather than the mapped class, and built once: an ORM UPDATE evaluates its
# WHERE clause against every object in the session and each new statement computes its
# cache key again. A thousand agents' heartbeats spent more CPU in that than in the rest.
#: A heartbeat from the agent process the plane knows; returns ``cordoned``, or no row.
_BEAT = (
    update(AGENT)
    .where(CALLER_IS_CURRENT)
    .values(
        last_heartbeat=bindparam("now"),
        free_slots=bindparam("slots_free"),
        draining=bindparam("is_draining"),
        metrics=bindparam("beat_metrics"),
    )
    .returning(AGENT.c.cordoned)
)

#: A lease poll that is also a heartbeat (ADR 8): the time and free slots, nothing of what only
#: heartbeats carry (draining, metrics). Returns ``cordoned``, or no row.
_POLL_BEAT = (
    update(AGENT)
    .where(CALLER_IS_CURRENT)
    .values(last_heartbeat=bindparam("now"), free_slots=bindparam("slots_free"))
    .returning(AGENT.c.cordoned)
)

RangeChange = Literal["set", "add", "remove"]


class AgentStore(Database):
    # -- the agent's own calls ------------------------------------------------------

    def register(
        self,
        identity: TokenIdentity,
        request: protocol.RegisterRequest,
        *,
        protocol: int = protocol.PROTOCOL_VERSION,
        now: datetime | None = None,
    ) -> Agent:
        """Record the agent process ``request`` describes, speaking protocol revision ``protocol``.

        Its token must have the scope of every role it registers in.
        """
        for role in request.roles:
            identity.require(role.value)
        try:
            return self._register(identity, request, revision=protocol, now=now or utcnow())
        except IntegrityError:
            # Two processes registered a new name at the same instant; the other one won.
            raise errors.Conflict(
                f"the name {request.name!r} was just registered by another agent; give this agent another name",
                reason="name_taken",
            ) from None

    def _register(
        self, identity: TokenIdentity, request: protocol.RegisterRequest, *, revision: int, now: datetime
    ) -> Agent:
        incarnation = str(request.incarnation)
        with self.transaction() as session:
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
                    settle_agent(session, agent.id, reason=f"agent {agent.name} restarted", now=now)
                agent.deleted_at = None
                agent.deleted_by = None
                _clear_cordon(agent)
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
                settle_agent(session, agent.id, reason=f"agent {agent.name} restarted", now=now)
            agent.incarnation = incarnation
            agent.token_id = identity.id
            agent.hostname = request.hostname
            agent.tether_version = request.tether_version
            agent.protocol = revision
            agent.task_logs = request.task_logs.value if request.task_logs else None
            agent.task_log_folder = request.task_log_folder
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
            **caller_params(identity, agent_id, request.incarnation),
            "now": now,
            "slots_free": request.free_slots,
            "is_draining": request.draining,
            "beat_metrics": dict(request.metrics),
        }
        if not request.running_jobs:
            # An idle agent - the common case, and the whole load of a large fleet - in one
            # statement. Anything unusual (unknown, deleted, superseded) takes the path below,
            # which says what is wrong.
            with self.statement() as conn:
                cordoned = conn.execute(_BEAT, beat).scalar_one_or_none()
            if cordoned is not None:
                return self._heartbeat_answer(cordoned, [])
        with self.transaction() as session:
            agent = calling_agent(session, identity, agent_id, request.incarnation)
            cordoned = session.connection().execute(_BEAT, beat).scalar_one_or_none()
            # Anything the agent runs that the plane no longer lets it hold must die:
            # revoked, failed by a sweep, or handed to another agent.
            held = set(
                session.scalars(
                    select(Job.id).where(
                        Job.agent_id == agent.id, Job.incarnation == agent.incarnation, Job.state.in_(IN_FLIGHT)
                    )
                )
            )
            commands = []
            for job_id in request.running_jobs:
                if str(job_id) not in held:
                    job = session.get(Job, str(job_id))
                    why = f"the plane holds this job as {job.state}" if job else "the plane no longer knows this job"
                    commands.append(protocol.KillJob(job_id=job_id, reason=why))
            return self._heartbeat_answer(agent.cordoned if cordoned is None else cordoned, commands)

    def poll_heartbeat(
        self,
        identity: TokenIdentity,
        agent_id: str,
        request: protocol.LeaseRequest,
        *,
        now: datetime | None = None,
    ) -> bool:
        """Count a lease poll marked ``heartbeat`` as the agent's heartbeat (ADR 8); whether it is cordoned.

        One statement; a caller the plane does not know as current is refused as its heartbeat would be.
        Only the time and free slots are written: what the agent runs and whether it drains come with
        its heartbeats, which it sends whenever it holds a job.
        """
        beat = {
            **caller_params(identity, agent_id, request.incarnation),
            "now": now or utcnow(),
            "slots_free": request.free_slots,
        }
        with self.statement() as conn:
            cordoned = conn.execute(_POLL_BEAT, beat).scalar_one_or_none()
        if cordoned is not None:
            return bool(cordoned)
        with self.transaction() as session:
            agent = calling_agent(session, identity, agent_id, request.incarnation)
            return bool(agent.cordoned)

    def _heartbeat_answer(self, cordoned: bool, commands: list[protocol.KillJob]) -> protocol.HeartbeatResponse:
        return protocol.HeartbeatResponse(
            status=AgentStatus.HEALTHY,
            cordoned=cordoned,
            heartbeat_interval=self.settings.heartbeat_interval.total_seconds(),
            commands=commands,
        )

    # -- what operators see ---------------------------------------------------------

    def agent_views(self, *, now: datetime | None = None) -> list[AgentOut]:
        now = now or utcnow()
        with self.transaction() as session:
            agents = list(session.scalars(select(Agent).order_by(Agent.name)))
            return self._views(session, agents, now)

    def agent_view(self, agent_ref: str, *, now: datetime | None = None) -> AgentOut:
        now = now or utcnow()
        with self.transaction() as session:
            return self._views(session, [_find_agent(session, agent_ref)], now)[0]

    def _views(self, session: Session, agents: Sequence[Agent], now: datetime) -> list[AgentOut]:
        token_rows = {
            t.id: t for t in session.scalars(select(AgentToken).where(AgentToken.id.in_({a.token_id for a in agents})))
        }
        running: dict[str, int] = dict(
            session.execute(  # type: ignore[arg-type]
                select(Job.agent_id, func.count())
                .where(Job.state.in_(IN_FLIGHT), Job.agent_id.is_not(None))
                .group_by(Job.agent_id)
            ).all()
        )
        # Agents in Kubernetes are named after their pods (and a pod's hostname is its name).
        pods: dict[str, PodOut] = {}
        for report in session.scalars(select(SentinelReport)):
            for pod in report.pods:
                out = PodOut.model_validate({**pod, "namespace": report.namespace, "reported_at": report.received_at})
                pods.setdefault(out.name, out)
        views = []
        for agent in agents:
            token = token_rows.get(agent.token_id)
            views.append(
                AgentOut(
                    id=agent.id,
                    name=agent.name,
                    roles=list(agent.roles),
                    status=agent_status(agent, self.settings, now, token=token, check_token=True),
                    cordoned=agent.cordoned,
                    cordon_reason=agent.cordon_reason,
                    cordoned_by=agent.cordoned_by,
                    cordoned_at=agent.cordoned_at,
                    last_heartbeat=agent.last_heartbeat,
                    tether_version=agent.tether_version,
                    protocol=agent.protocol,
                    version_support=VersionSupport.of(agent.protocol),
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
                    pod=pods.get(agent.name) or pods.get(agent.hostname),
                )
            )
        return views

    # -- what operators do ------------------------------------------------------------

    def cordon(self, agent_ref: str, *, reason: str | None, actor: str, now: datetime | None = None) -> AgentOut:
        """No new work for the agent; what runs there finishes. Survives the agent's restarts."""

        def change(session: Session, agent: Agent, now: datetime) -> bool:
            agent.cordoned = True
            agent.cordon_reason = reason
            agent.cordoned_by = actor
            agent.cordoned_at = now
            # Leases not yet started are given back so other agents can run them now.
            requeue_leases_of(session, agent.id)
            return True

        return self._operate(agent_ref, "agent.cordon", change, actor=actor, now=now)

    def uncordon(self, agent_ref: str, *, actor: str, now: datetime | None = None) -> AgentOut:
        def change(session: Session, agent: Agent, now: datetime) -> bool:
            _clear_cordon(agent)
            return True

        return self._operate(agent_ref, "agent.uncordon", change, actor=actor, now=now)

    def delete_agent(self, agent_ref: str, *, actor: str, now: datetime | None = None) -> AgentOut:
        """Mark the agent TERMINATED; if it is alive it registers again on its next call."""

        def change(session: Session, agent: Agent, now: datetime) -> bool:
            if agent.deleted_at is not None:
                return False
            agent.deleted_at = now
            agent.deleted_by = actor
            requeue_leases_of(session, agent.id)
            return True

        return self._operate(agent_ref, "agent.delete", change, actor=actor, now=now)

    def _operate(
        self,
        agent_ref: str,
        action: str,
        change: Callable[[Session, Agent, datetime], bool],
        *,
        actor: str,
        now: datetime | None,
    ) -> AgentOut:
        """Apply an operator's ``change`` to one agent and audit it, if it changed anything."""
        now = now or utcnow()
        with self.transaction() as session:
            agent = _find_agent(session, agent_ref)
            before = snapshot(agent, _AGENT_AUDIT_FIELDS)
            if change(session, agent, now):
                session.flush()
                audit(
                    session,
                    actor=actor,
                    action=action,
                    target_type="agent",
                    target_id=agent.id,
                    before=before,
                    after=snapshot(agent, _AGENT_AUDIT_FIELDS),
                    now=now,
                )
            agent_id = agent.id
        return self.agent_view(agent_id, now=now)

    # -- allowed IP ranges --------------------------------------------------------------

    def allowed_ranges(self) -> list[AllowedIpRange]:
        with self.transaction() as session:
            rows = list(session.scalars(select(AllowedIpRange).order_by(AllowedIpRange.cidr)))
            session.expunge_all()
        return rows

    def allowed_networks(self) -> list[Network]:
        return parse_cidrs(row.cidr for row in self.allowed_ranges())

    def set_allowed_ranges(
        self, cidrs: Sequence[str], *, actor: str, mode: RangeChange = "set", now: datetime | None = None
    ) -> list[AllowedIpRange]:
        """Replace (``set``), extend (``add``) or shrink (``remove``) the allowed ranges."""
        now = now or utcnow()
        networks = {str(n) for n in parse_cidrs(cidrs)}
        with self.transaction() as session:
            current = {row.cidr: row for row in session.scalars(select(AllowedIpRange))}
            if mode == "set":
                target = networks
            elif mode == "add":
                target = set(current) | networks
            else:
                missing = sorted(networks - set(current))
                if missing:
                    raise errors.NotFound(
                        f"not in the allowed IP ranges: {', '.join(missing)}", reason="range_not_found"
                    )
                target = set(current) - networks
            for cidr in set(current) - target:
                session.delete(current[cidr])
            for cidr in target - set(current):
                session.add(AllowedIpRange(cidr=cidr, created_at=now, created_by=actor))
            if target != set(current):
                audit(
                    session,
                    actor=actor,
                    action=f"allowed_ip_ranges.{mode}",
                    target_type="allowed_ip_ranges",
                    target_id="*",
                    before={"ranges": sorted(current)},
                    after={"ranges": sorted(target)},
                    now=now,
                )
        return self.allowed_ranges()


def _clear_cordon(agent: Agent) -> None:
    agent.cordoned = False
    agent.cordon_reason = None
    agent.cordoned_by = None
    agent.cordoned_at = None


def _find_agent(session: Session, agent_ref: str) -> Agent:
    agent = session.get(Agent, agent_ref) or session.scalars(select(Agent).where(Agent.name == agent_ref)).one_or_none()
    if agent is None:
        raise errors.NotFound(f"no agent with id or name {agent_ref!r}", reason="agent_not_found")
    return agent

"""Rules more than one concern of the store applies.

Which agent process is calling (an agent API call is its caller's only while the
agent row names that token and incarnation and is not deleted), when an agent
counts as healthy, and what becomes of jobs whose agent goes away: unstarted
leases return to the queue without using a retry, running jobs fail so that
Airflow's retries apply.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, bindparam, exists, select, update
from sqlalchemy.orm import Session

from tether import errors
from tether.plane.config import PlaneSettings
from tether.plane.models import Agent, AgentToken, Job
from tether.plane.store.base import TokenIdentity, notify
from tether.protocol import AgentRole, AgentStatus, JobState

AGENT: Table = Agent.__table__  # type: ignore[assignment]
JOB: Table = Job.__table__  # type: ignore[assignment]

#: Jobs an agent holds: leased to it or running there.
IN_FLIGHT = (JobState.LEASED.value, JobState.RUNNING.value)

#: The agent row of the calling process: the id it calls as, registered with this token by this incarnation,
#: not deleted. Parameters: ``holder_id``, ``token``, ``holder_incarnation``.
CALLER_IS_CURRENT: ColumnElement[bool] = and_(
    AGENT.c.id == bindparam("holder_id"),
    AGENT.c.token_id == bindparam("token"),
    AGENT.c.incarnation == bindparam("holder_incarnation"),
    AGENT.c.deleted_at.is_(None),
)
CALLER_EXISTS = exists().where(CALLER_IS_CURRENT)

_CALLER = select(
    AGENT.c.id,
    AGENT.c.name,
    AGENT.c.incarnation,
    AGENT.c.token_id,
    AGENT.c.cordoned,
    AGENT.c.last_heartbeat,
    AGENT.c.deleted_at,
    AGENT.c.deleted_by,
    AGENT.c.roles,
    AGENT.c.protocol,
).where(AGENT.c.id == bindparam("agent_id"))


def caller_params(identity: TokenIdentity, agent_id: str, incarnation: uuid.UUID) -> dict[str, str]:
    """The parameters of ``CALLER_IS_CURRENT``."""
    return {"holder_id": agent_id, "token": identity.id, "holder_incarnation": str(incarnation)}


def calling_agent(session: Session, identity: TokenIdentity, agent_id: str, incarnation: uuid.UUID) -> Any:
    """The calling agent's row, or the refusal that says which part of ``CALLER_IS_CURRENT`` fails."""
    agent = session.connection().execute(_CALLER, {"agent_id": agent_id}).one_or_none()
    if agent is None:
        raise errors.NotFound(f"agent {agent_id} is not registered; register again", reason="agent_not_found")
    if agent.deleted_at is not None:
        raise errors.NotFound(
            f"agent {agent.name} was deleted by {agent.deleted_by or 'an operator'}; register again",
            reason="agent_deleted",
        )
    if agent.token_id != identity.id:
        raise errors.Conflict(f"agent {agent.name} was registered with another agent token", reason="token_mismatch")
    if agent.incarnation != str(incarnation):
        raise errors.Conflict(
            f"agent {agent.name} has been taken over by another process; this one must stop",
            reason="superseded",
        )
    return agent


def calling_agent_in_role(
    session: Session, identity: TokenIdentity, agent_id: str, incarnation: uuid.UUID, role: AgentRole
) -> Any:
    """The calling agent, refused unless it registered in ``role``."""
    agent = calling_agent(session, identity, agent_id, incarnation)
    if role.value not in (agent.roles or []):
        raise errors.Forbidden(f"agent {agent.name} is not registered in the {role} role", reason="role_not_registered")
    return agent


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


def requeue(session: Session, job_ids: Sequence[str]) -> None:
    """Give unstarted leases back to the queue (no retry used) and wake the agents waiting on it."""
    if not job_ids:
        return
    ids = list(job_ids)
    session.execute(
        update(JOB)
        .where(JOB.c.id.in_(ids), JOB.c.state == JobState.LEASED.value)
        .values(
            state=JobState.QUEUED.value,
            agent_id=None,
            agent_name=None,
            incarnation=None,
            leased_at=None,
            lease_expires_at=None,
        )
    )
    notify(session, session.scalars(select(JOB.c.queue).where(JOB.c.id.in_(ids))).all())


def requeue_leases_of(session: Session, agent_id: str) -> None:
    """Give back every lease the agent has not started: it is to get no more work (cordoned, deleted)."""
    requeue(
        session,
        session.scalars(select(JOB.c.id).where(JOB.c.agent_id == agent_id, JOB.c.state == JobState.LEASED.value)).all(),
    )


def settle(session: Session, job_ids: Sequence[str], *, reason: str, now: datetime) -> None:
    """Jobs whose agent is gone: leases back to the queue, running jobs failed (Airflow's retries apply)."""
    if not job_ids:
        return
    requeue(session, job_ids)
    session.execute(
        update(JOB)
        .where(JOB.c.id.in_(list(job_ids)), JOB.c.state == JobState.RUNNING.value)
        .values(state=JobState.FAILED.value, finished_at=now, reason=reason)
    )


def settle_agent(session: Session, agent_id: str, *, reason: str, now: datetime) -> None:
    """Settle every job the agent holds."""
    held = session.scalars(select(JOB.c.id).where(JOB.c.agent_id == agent_id, JOB.c.state.in_(IN_FLIGHT))).all()
    settle(session, held, reason=reason, now=now)

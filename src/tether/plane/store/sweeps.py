"""The executor's sweeps: expired leases, unhealthy agents, jobs whose agent is gone, old finished jobs.

Every change is conditional on the state it expects, so two schedulers sweeping
at once do the work once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, or_, select

from tether.plane.models import Agent, AgentToken, Job, WorkClaim
from tether.plane.store.base import Database, utcnow
from tether.plane.store.rules import IN_FLIGHT, agent_status, requeue, settle, settle_agent
from tether.plane.store.triggers import settle_triggerers
from tether.protocol import AgentRole, JobState

_TERMINAL = [state.value for state in JobState if state.terminal]


@dataclass(frozen=True)
class FleetCounts:
    """What the plane's gauges show: jobs in flight by queue and state, agents by status and role."""

    #: (queue, QUEUED / LEASED / RUNNING) -> jobs
    jobs: dict[tuple[str, str], int]
    #: (HEALTHY / UNHEALTHY / TERMINATED, role) -> agents
    agents: dict[tuple[str, str], int]


class SweepStore(Database):
    def fleet_counts(self, *, now: datetime | None = None) -> FleetCounts:
        """Jobs not finished by queue and state, and agents by status and role: two statements."""
        now = now or utcnow()
        jobs: dict[tuple[str, str], int] = {}
        agents: dict[tuple[str, str], int] = {}
        with self.statement() as conn:
            for row in conn.execute(
                select(Job.queue, Job.state, func.count())
                .where(Job.state.in_([JobState.QUEUED.value, *IN_FLIGHT]))
                .group_by(Job.queue, Job.state)
            ):
                jobs[(row[0], row[1])] = int(row[2])
            for agent in conn.execute(select(Agent.roles, Agent.last_heartbeat, Agent.deleted_at)):
                status = agent_status(agent, self.settings, now).value
                for role in agent.roles or [AgentRole.WORKER.value]:
                    agents[(status, role)] = agents.get((status, role), 0) + 1
        return FleetCounts(jobs=jobs, agents=agents)

    def sweep(self, *, now: datetime | None = None, judge_silence: bool = True) -> dict[str, int]:
        """Return expired leases to the queue and settle the jobs of unhealthy agents.

        With ``judge_silence`` false, agents are not held to their missed heartbeats:
        the caller knows the agent API was not there to hear them (see ADR 4).
        """
        now = now or utcnow()
        cutoff = now - self.settings.health_timeout
        with self.transaction() as session:
            expired = session.scalars(
                select(Job.id).where(Job.state == JobState.LEASED.value, Job.lease_expires_at <= now)
            ).all()
            requeue(session, expired)
            holding = select(Agent.id).join(Job, Job.agent_id == Agent.id).where(Job.state.in_(IN_FLIGHT)).distinct()
            dead_tokens = session.scalars(
                holding.join(AgentToken, AgentToken.id == Agent.token_id).where(
                    or_(AgentToken.revoked_at.is_not(None), AgentToken.expires_at <= now)
                )
            ).all()
            silent = session.scalars(holding.where(Agent.last_heartbeat < cutoff)).all() if judge_silence else []
            for agent_id in dead_tokens:
                settle_agent(session, agent_id, reason="the agent's token expired or was revoked", now=now)
            for agent_id in silent:
                settle_agent(
                    session, agent_id, reason="the agent missed its heartbeats and was declared unhealthy", now=now
                )
            # Jobs whose agent row is gone, given the same grace as a silent agent.
            orphans = session.scalars(
                select(Job.id).where(
                    Job.state.in_(IN_FLIGHT),
                    Job.agent_id.is_not(None),
                    func.coalesce(Job.started_at, Job.leased_at) < cutoff,
                    ~select(Agent.id).where(Agent.id == Job.agent_id).exists(),
                )
            ).all()
            settle(session, orphans, reason="the agent was deleted", now=now)
            triggerers = settle_triggerers(session, now=now, cutoff=cutoff, judge_silence=judge_silence)
        return {"expired_leases": len(expired), "unhealthy_agents": len(silent), "triggerers_ended": triggerers}

    def purge(self, *, now: datetime | None = None) -> int:
        """Delete finished jobs, and DAG-processing work claims, older than ``[tether] job_retention``."""
        cutoff = (now or utcnow()) - self.settings.job_retention
        with self.transaction() as session:
            result = session.execute(delete(Job).where(Job.state.in_(_TERMINAL), Job.finished_at < cutoff))
            session.execute(delete(WorkClaim).where(WorkClaim.created_at < cutoff))
            return int(result.rowcount)  # type: ignore[attr-defined]

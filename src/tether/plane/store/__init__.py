"""Every SQL statement Tether runs against the metadata database lives in this package.

The API routes, the executor and the CLI take a ``Store``; none writes SQL of its
own. One module per concern, each a part of ``Store``:

- ``tokens``: agent tokens, authentication, the audit log;
- ``agents``: registration, heartbeats, operators' views and actions, allowed IP ranges;
- ``jobs``: queueing, claiming, the start gate, outcomes, the executor's view of its jobs;
- ``sweeps``: expired leases, unhealthy agents, orphans, old finished jobs;
- ``dags``: what agents parse, written through Airflow's own DAG processor functions;
- ``logs``: task logs agents ship, per try, read back for Airflow's log views;
- ``triggers``: triggers of deferred tasks, run by triggerer agents under Airflow triggerer jobs;
- ``sentinels``: the latest report of each namespace's sentinel on the agents' pods;
- ``rules``: what several of them apply (the calling agent, settling a gone agent's jobs);
- ``base``: sessions and one-statement connections, notifications, the audit trail.

``tether.plane.store.testing`` has the same store on an in-memory database, for unit tests.
"""

from __future__ import annotations

from tether.plane.store.agents import AgentStore
from tether.plane.store.base import NOTIFY_CHANNEL, TokenIdentity, airflow_session_factory, utcnow
from tether.plane.store.dags import DagStore
from tether.plane.store.jobs import JobKey, JobStore, JobView
from tether.plane.store.logs import LogStore
from tether.plane.store.rules import agent_status, token_live
from tether.plane.store.sentinels import SentinelStore
from tether.plane.store.sweeps import SweepStore
from tether.plane.store.tokens import TokenStore
from tether.plane.store.triggers import TriggerStore

__all__ = [
    "NOTIFY_CHANNEL",
    "JobKey",
    "JobView",
    "Store",
    "TokenIdentity",
    "agent_status",
    "airflow_session_factory",
    "token_live",
    "utcnow",
]


class Store(TokenStore, AgentStore, JobStore, SweepStore, DagStore, LogStore, TriggerStore, SentinelStore):
    """Tether's tables, as the plane's processes use them."""

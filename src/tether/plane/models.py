"""Tether's tables in the Airflow metadata database.

They live in their own ``MetaData`` with their own Alembic version table, so
Airflow's migrations and ours never step on each other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from tether.protocol import MAX_VERSION_LENGTH

metadata = MetaData(
    naming_convention={
        "ix": "idx_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "%(table_name)s_pkey",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes on every backend, stored in UTC (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = metadata


class AgentToken(Base):
    __tablename__ = "tether_agent_token"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    description: Mapped[str | None] = mapped_column(String(1024))
    secret_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    created_by: Mapped[str | None] = mapped_column(String(256))
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_by: Mapped[str | None] = mapped_column(String(256))
    #: The roles its agents may serve (``protocol.TokenScope``); tokens older than scopes are worker tokens.
    scopes: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=lambda: ["worker"])
    #: The DAG bundles its dag-processor agents may write; None: any bundle.
    bundles: Mapped[list[str] | None] = mapped_column(JSON)


class Agent(Base):
    __tablename__ = "tether_agent"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    incarnation: Mapped[str] = mapped_column(String(36), nullable=False)
    token_id: Mapped[str] = mapped_column(String(16), nullable=False)
    hostname: Mapped[str] = mapped_column(String(256), nullable=False)
    tether_version: Mapped[str] = mapped_column(String(MAX_VERSION_LENGTH), nullable=False)
    #: The protocol revision the agent speaks; agents registered before revisions were recorded spoke 1.
    protocol: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    #: ship or local (None: an agent that ships no logs, of a release before log shipping).
    task_logs: Mapped[str | None] = mapped_column(String(16))
    task_log_folder: Mapped[str | None] = mapped_column(String(1024))
    airflow_version: Mapped[str] = mapped_column(String(MAX_VERSION_LENGTH), nullable=False)
    python_version: Mapped[str] = mapped_column(String(MAX_VERSION_LENGTH), nullable=False)
    roles: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    queues: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)
    slots: Mapped[int] = mapped_column(Integer, nullable=False)
    free_slots: Mapped[int] = mapped_column(Integer, nullable=False)
    draining: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    cordoned: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    cordon_reason: Mapped[str | None] = mapped_column(String(1024))
    cordoned_by: Mapped[str | None] = mapped_column(String(256))
    cordoned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    first_seen: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    last_heartbeat: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    heartbeat_interval: Mapped[float] = mapped_column(Float, nullable=False)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, nullable=False, default=dict)
    #: Set by an operator's delete; the row stays as TERMINATED until the agent
    #: registers again (Kubernetes node semantics) so its jobs keep their owner.
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    deleted_by: Mapped[str | None] = mapped_column(String(256))


class Job(Base):
    __tablename__ = "tether_job"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: task, callback or connection_test (``protocol.JobKind``): ``ti_id`` is then the callback's, or the test's, id.
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="task", server_default="task")
    ti_id: Mapped[str] = mapped_column(String(36), nullable=False)
    dag_id: Mapped[str] = mapped_column(String(250), nullable=False)
    task_id: Mapped[str] = mapped_column(String(250), nullable=False)
    run_id: Mapped[str] = mapped_column(String(250), nullable=False)
    map_index: Mapped[int] = mapped_column(Integer, nullable=False)
    try_number: Mapped[int] = mapped_column(Integer, nullable=False)
    queue: Mapped[str] = mapped_column(String(256), nullable=False)
    pool_slots: Mapped[int] = mapped_column(Integer, nullable=False)
    priority_weight: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    workload: Mapped[str] = mapped_column(Text, nullable=False)
    agent_id: Mapped[str | None] = mapped_column(String(36))
    agent_name: Mapped[str | None] = mapped_column(String(128))
    incarnation: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    queued_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    leased_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(1024))

    __table_args__ = (
        Index("idx_tether_job_claim", "state", "queue", "priority_weight", "queued_at"),
        Index("idx_tether_job_ti", "ti_id", "try_number", unique=True),
        Index("idx_tether_job_agent", "agent_id", "state"),
    )


class AllowedIpRange(Base):
    """A CIDR range agents may call from; no rows means any address."""

    __tablename__ = "tether_allowed_ip_range"

    cidr: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    created_by: Mapped[str | None] = mapped_column(String(256))


class AuditEntry(Base):
    """Who changed what among tokens, agents and IP ranges, and how."""

    __tablename__ = "tether_audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    actor: Mapped[str] = mapped_column(String(256), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target_type: Mapped[str] = mapped_column(String(32), nullable=False)
    target_id: Mapped[str] = mapped_column(String(256), nullable=False)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (Index("idx_tether_audit_log_at", "at"),)


class Bundle(Base):
    """A DAG bundle agents parse, and the agent token allowed to write what they find in it."""

    __tablename__ = "tether_bundle"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(16), nullable=False)
    first_agent: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    last_sync_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class DagFile(Base):
    """The latest parse result the plane wrote for one file of a bundle."""

    __tablename__ = "tether_dag_file"

    bundle_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    relative_fileloc: Mapped[str] = mapped_column(String(1024), primary_key=True)
    digest: Mapped[str] = mapped_column(String(128), nullable=False)
    #: dag_id -> the hash of its serialized form, as written.
    dag_hashes: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)
    #: The agent process that wrote it, and its count for the file: older results are dropped.
    incarnation: Mapped[str] = mapped_column(String(36), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class WorkClaim(Base):
    """What one claim of a DAG-processing agent got, so that a retried claim gets the same."""

    __tablename__ = "tether_work_claim"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(36), nullable=False)
    work: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (Index("idx_tether_work_claim_created_at", "created_at"),)


class TaskLog(Base):
    """The log of one task try as agents shipped it: where it came from, how much, whether it is whole."""

    __tablename__ = "tether_task_log"

    ti_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    try_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    dag_id: Mapped[str] = mapped_column(String(250), nullable=False)
    task_id: Mapped[str] = mapped_column(String(250), nullable=False)
    run_id: Mapped[str] = mapped_column(String(250), nullable=False)
    map_index: Mapped[int] = mapped_column(Integer, nullable=False)
    agent_name: Mapped[str] = mapped_column(String(128), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    lines: Mapped[int] = mapped_column(BigInteger, nullable=False)
    truncated: Mapped[bool] = mapped_column(Boolean, nullable=False)
    #: The agent sent the last lines of the task process's latest run.
    closed: Mapped[bool] = mapped_column(Boolean, nullable=False)
    first_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    last_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (Index("idx_tether_task_log_last_at", "last_at"),)


class TaskLogChunk(Base):
    """One batch of log lines of a try, stored as the agent sent it: complete lines joined by newlines."""

    __tablename__ = "tether_task_log_chunk"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    ti_id: Mapped[str] = mapped_column(String(36), nullable=False)
    try_number: Mapped[int] = mapped_column(Integer, nullable=False)
    segment: Mapped[str] = mapped_column(String(36), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    data: Mapped[str] = mapped_column(Text, nullable=False)
    lines: Mapped[int] = mapped_column(Integer, nullable=False)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (
        Index("idx_tether_task_log_chunk_batch", "ti_id", "try_number", "segment", "seq", unique=True),
        Index("idx_tether_task_log_chunk_read", "ti_id", "try_number", "id"),
    )


class Triggerer(Base):
    """The Airflow triggerer job the plane keeps for one agent process in the triggerer role."""

    __tablename__ = "tether_triggerer"

    agent_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    incarnation: Mapped[str] = mapped_column(String(36), nullable=False)
    job_id: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    beat_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class TriggerOutcome(Base):
    """An outcome of a trigger the plane has written, by the id the agent gave it: written once."""

    __tablename__ = "tether_trigger_outcome"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    trigger_id: Mapped[int] = mapped_column(Integer, nullable=False)
    job_id: Mapped[int] = mapped_column(Integer, nullable=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (Index("idx_tether_trigger_outcome_at", "at"),)


class TriggerRun(Base):
    """A trigger of a task, handed to a triggerer job: that job writes its lines into the log of this try."""

    __tablename__ = "tether_trigger_run"

    trigger_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ti_id: Mapped[str] = mapped_column(String(36), nullable=False)
    try_number: Mapped[int] = mapped_column(Integer, nullable=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (Index("idx_tether_trigger_run_at", "at"),)


class SentinelReport(Base):
    """The latest report of a namespace's sentinel on the agents' pods and the backends it checked."""

    __tablename__ = "tether_sentinel_report"

    namespace: Mapped[str] = mapped_column(String(253), primary_key=True)
    sentinel: Mapped[str] = mapped_column(String(128), nullable=False)
    token_id: Mapped[str] = mapped_column(String(16), nullable=False)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    #: The interval the plane gave with its answer: the next report is due after it.
    interval: Mapped[float] = mapped_column(Float, nullable=False)
    #: ``protocol.PodReport`` objects.
    pods: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    #: ``protocol.BackendCheck`` objects.
    backends: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)

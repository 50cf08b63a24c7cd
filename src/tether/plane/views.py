"""What operators see of tokens, agents, IP ranges and the audit log.

The CLI and the REST API render these same models, so both surfaces show the
same fields with the same names.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from tether import protocol
from tether.plane import tokens
from tether.plane.expiry import HELP
from tether.plane.models import AgentToken, AllowedIpRange, AuditEntry, Bundle, Job
from tether.protocol import AgentStatus


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenState(enum.StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class TokenOut(_Out):
    id: str
    name: str
    description: str | None
    token: str = Field(description="Prefix and id of the token; the secret is never shown again")
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    state: TokenState
    #: The roles its agents may serve.
    scopes: list[protocol.TokenScope]
    #: The DAG bundles its dag-processor agents may write; None: any.
    bundles: list[str] | None

    @classmethod
    def from_row(cls, row: AgentToken, now: datetime) -> TokenOut:
        if row.revoked_at is not None:
            state = TokenState.REVOKED
        elif row.expires_at is not None and row.expires_at <= now:
            state = TokenState.EXPIRED
        else:
            state = TokenState.ACTIVE
        return cls(
            id=row.id,
            name=row.name,
            description=row.description,
            token=tokens.short_form(row.id),
            created_at=row.created_at,
            created_by=row.created_by,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
            revoked_by=row.revoked_by,
            state=state,
            scopes=[protocol.TokenScope(scope) for scope in row.scopes or ("worker",)],
            bundles=list(row.bundles) if row.bundles is not None else None,
        )


class TokenCreated(TokenOut):
    secret: str = Field(description="The whole token. Shown once: store it now")


class TokenCreate(_In):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    scopes: list[protocol.TokenScope] = Field(
        default_factory=lambda: [protocol.TokenScope.WORKER],
        min_length=1,
        max_length=4,
        description="The roles its agents may serve (default: worker)",
    )
    bundles: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")]] | None
    ) = Field(default=None, max_length=100, description="DAG bundles its dag-processor agents may write (default: any)")
    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, description="Days until it expires (older form of `expires`)"
    )
    expires: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description=f"When it expires: {HELP}. Neither this nor expires_in_days: never"
    )

    @model_validator(mode="after")
    def _one_expiry(self) -> TokenCreate:
        if self.expires is not None and self.expires_in_days is not None:
            raise ValueError("give expires or expires_in_days, not both")
        return self


class TokenUpdate(_In):
    expires: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description=f"When it expires from now on: {HELP}"
    )
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None

    @model_validator(mode="after")
    def _something(self) -> TokenUpdate:
        if self.expires is None and self.description is None:
            raise ValueError("give expires, description or both")
        return self


class VersionSupport(enum.StrEnum):
    """Where an agent's protocol revision stands in what this plane serves (ADR 5)."""

    CURRENT = "current"
    #: Served, as the previous minor release's: upgrade the agent before the plane's next minor release.
    SUPPORTED = "supported"
    #: No longer served: its calls are refused until it is upgraded.
    UNSUPPORTED = "unsupported"

    @classmethod
    def of(cls, revision: int) -> VersionSupport:
        if revision >= protocol.PROTOCOL_VERSION:
            return cls.CURRENT
        if revision >= protocol.OLDEST_PROTOCOL:
            return cls.SUPPORTED
        return cls.UNSUPPORTED


class PodOut(_Out):
    """An agent pod as the sentinel of its namespace last saw it."""

    namespace: str
    name: str
    group: str | None = None
    phase: str
    ready: bool
    restarts: int
    last_termination: str | None = None
    waiting: str | None = None
    warning: str | None = None
    reported_at: datetime

    def summary(self) -> str:
        """One cell of the agents table: ``Running ready``, ``Running 3 restarts OOMKilled CrashLoopBackOff``."""
        parts = [self.phase, "ready" if self.ready else "not ready"]
        if self.restarts:
            parts.append(f"{self.restarts} restarts")
        parts += [reason for reason in (self.last_termination, self.waiting, self.warning) if reason]
        return " ".join(parts)


class BackendOut(_Out):
    name: str
    ok: bool
    detail: str | None = None


class SentinelOut(_Out):
    """A namespace's latest sentinel report."""

    namespace: str
    sentinel: str
    received_at: datetime
    #: No report for two intervals: what it says may no longer be so.
    stale: bool
    pods: list[PodOut]
    backends: list[BackendOut]


class AgentOut(_Out):
    """An agent as operators see it."""

    id: str
    name: str
    roles: list[str] = Field(description="worker, dag-processor")
    status: AgentStatus
    cordoned: bool
    cordon_reason: str | None
    cordoned_by: str | None
    cordoned_at: datetime | None
    last_heartbeat: datetime
    tether_version: str
    protocol: int = Field(description="Protocol revision the agent speaks")
    version_support: VersionSupport
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
    pod: PodOut | None = Field(
        default=None, description="The agent's pod (of the same name) as its namespace's sentinel last reported it"
    )


class AgentAction(_In):
    action: Literal["CORDON", "UNCORDON"]
    reason: Annotated[str, StringConstraints(max_length=1024)] | None = None


class BundleOut(_Out):
    """A DAG bundle agents parse, and the agent token allowed to write it."""

    name: str
    token_id: str
    token: str = Field(description="Prefix and id of the owning token")
    first_agent: str
    created_at: datetime
    last_sync_at: datetime

    @classmethod
    def from_row(cls, row: Bundle) -> BundleOut:
        return cls(
            name=row.name,
            token_id=row.token_id,
            token=tokens.short_form(row.token_id),
            first_agent=row.first_agent,
            created_at=row.created_at,
            last_sync_at=row.last_sync_at,
        )


class IpRanges(_In):
    ranges: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(max_length=1000)


class IpRangeOut(_Out):
    cidr: str
    created_at: datetime
    created_by: str | None

    @classmethod
    def from_row(cls, row: AllowedIpRange) -> IpRangeOut:
        return cls(cidr=row.cidr, created_at=row.created_at, created_by=row.created_by)


class IpRangesOut(_Out):
    ranges: list[IpRangeOut]
    enforced: bool = Field(description="False when the list is empty: agents may call from any address")


class AuditOut(_Out):
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: AuditEntry) -> AuditOut:
        return cls.model_validate(row, from_attributes=True)


class TryOut(_Out):
    """One try of a task instance as Tether ran it: the agent, its lease, start and report times."""

    job_id: str
    kind: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    queue: str
    pool_slots: int
    state: protocol.JobState
    agent_id: str | None
    agent_name: str | None
    queued_at: datetime
    leased_at: datetime | None
    lease_expires_at: datetime | None = Field(description="Until when an unconfirmed lease holds; None once started")
    started_at: datetime | None = Field(description="When the start gate let the agent run it")
    finished_at: datetime | None = Field(description="When the agent (or the plane, for a gone agent) reported it")
    exit_code: int | None
    reason: str | None

    @classmethod
    def from_row(cls, row: Job) -> TryOut:
        return cls(
            job_id=row.id,
            kind=row.kind,
            dag_id=row.dag_id,
            run_id=row.run_id,
            task_id=row.task_id,
            map_index=row.map_index,
            try_number=row.try_number,
            queue=row.queue,
            pool_slots=row.pool_slots,
            state=protocol.JobState(row.state),
            agent_id=row.agent_id,
            agent_name=row.agent_name,
            queued_at=row.queued_at,
            leased_at=row.leased_at,
            lease_expires_at=row.lease_expires_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            exit_code=row.exit_code,
            reason=row.reason,
        )


class UserOut(_Out):
    name: str
    may_change: bool = Field(description="Whether the user may change Tether's settings (Airflow's configuration)")


class MissingValueOut(_Out):
    name: str
    hint: str


class AgentValuesOut(_Out):
    """The tether-agent chart's values.yaml for a new set of agents, as ``airflow tether agents values`` prints it."""

    text: str
    missing: list[MissingValueOut] = Field(
        description="Values only the user can give; the chart refuses the file until then"
    )
    warnings: list[str]
    helm_install: str

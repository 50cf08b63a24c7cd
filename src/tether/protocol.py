"""The agent protocol, version 1: the one wire format shared by plane and agent.

Every body is a pydantic model with ``extra="forbid"`` so that both ends reject
what they do not understand instead of silently ignoring it. Sizes are bounded
here, once, so the API and the agent cannot disagree about them.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

PROTOCOL_VERSION = 1
PROTOCOL_HEADER = "X-Tether-Protocol"
REQUEST_ID_HEADER = "X-Request-Id"
API_PREFIX = "/tether/v1"

#: Upper bound on any agent request body; the API refuses larger ones with 413.
MAX_BODY_BYTES = 64 * 1024

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
QueueName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\s,]+$")]
ShortText = Annotated[str, StringConstraints(max_length=256)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9._/-]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentRole(enum.StrEnum):
    WORKER = "worker"


class AgentStatus(enum.StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    TERMINATED = "TERMINATED"


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    LEASED = "LEASED"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    REVOKED = "REVOKED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILED, JobState.REVOKED)


class ReportState(enum.StrEnum):
    """What an agent may say about a job it holds."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"


# -- register -----------------------------------------------------------------


class RegisterRequest(_Model):
    name: Name
    incarnation: uuid.UUID
    tether_version: ShortText
    airflow_version: ShortText
    python_version: ShortText
    hostname: ShortText
    roles: list[AgentRole] = Field(default_factory=lambda: [AgentRole.WORKER], min_length=1, max_length=4)
    queues: list[QueueName] = Field(min_length=1, max_length=64)
    slots: int = Field(ge=1, le=1024)
    labels: dict[LabelKey, ShortText] = Field(default_factory=dict, max_length=64)


class RegisterResponse(_Model):
    agent_id: uuid.UUID
    heartbeat_interval: float
    lease_wait: float
    cordoned: bool


# -- heartbeat ----------------------------------------------------------------


class HeartbeatRequest(_Model):
    incarnation: uuid.UUID
    running_jobs: list[uuid.UUID] = Field(default_factory=list, max_length=1024)
    free_slots: int = Field(ge=0, le=1024)
    draining: bool = False
    metrics: dict[Annotated[str, StringConstraints(max_length=64)], float] = Field(default_factory=dict, max_length=32)


class KillJob(_Model):
    kind: Literal["kill"] = "kill"
    job_id: uuid.UUID
    reason: ShortText


class HeartbeatResponse(_Model):
    status: AgentStatus
    cordoned: bool
    heartbeat_interval: float
    commands: list[KillJob] = Field(default_factory=list)


# -- lease --------------------------------------------------------------------


class LeaseRequest(_Model):
    incarnation: uuid.UUID
    free_slots: int = Field(ge=1, le=1024)
    queues: list[QueueName] = Field(min_length=1, max_length=64)
    wait: float = Field(default=20.0, ge=0, le=60)


class Lease(_Model):
    job_id: uuid.UUID
    pool_slots: int
    lease_expires_at: datetime
    #: The Airflow ``ExecuteTask`` workload, as the scheduler produced it.
    workload: dict[str, Any]


class LeaseResponse(_Model):
    leases: list[Lease] = Field(default_factory=list)


# -- start gate and report ------------------------------------------------------


class StartRequest(_Model):
    incarnation: uuid.UUID


class StartResponse(_Model):
    job_id: uuid.UUID
    state: JobState


class StartManyRequest(_Model):
    """The start gate for the jobs of one lease answer, in one call."""

    incarnation: uuid.UUID
    job_ids: list[uuid.UUID] = Field(min_length=1, max_length=1024)


class StartRefusal(_Model):
    """Why one job of a ``StartManyRequest`` must not start: what a single start would have answered."""

    job_id: uuid.UUID
    status: int
    reason: ShortText
    detail: str


class StartManyResponse(_Model):
    #: The jobs that passed the gate: run these, and only these.
    started: list[uuid.UUID] = Field(default_factory=list)
    refused: list[StartRefusal] = Field(default_factory=list)


class ReportRequest(_Model):
    incarnation: uuid.UUID
    state: ReportState
    exit_code: int | None = Field(default=None, ge=-255, le=255)
    reason: ShortText | None = None


class ReportResponse(_Model):
    job_id: uuid.UUID
    state: JobState


class PreflightResponse(_Model):
    """What a preflight learns: the token works from this address, and which plane answers."""

    token_name: str
    address: str
    protocol: int = PROTOCOL_VERSION
    version: str
    heartbeat_interval: float


class Problem(_Model):
    """Every error body: one sentence a person can act on."""

    detail: str
    reason: str


class Health(_Model):
    status: Literal["ok"] = "ok"
    protocol: int = PROTOCOL_VERSION
    version: str

"""The agent protocol, version 1: the one wire format shared by plane and agent.

Strict in what is accepted, tolerant in what is read back (ADR 5). Requests are
models with ``extra="forbid"``: the plane refuses what it does not understand.
Answers are models that ignore fields they do not know, so a newer plane never
breaks an older agent; and the plane writes each answer in the revision the
caller speaks (``written_for``), leaving out fields added after it, for agents
that read strictly (Tether 0.1). Sizes are bounded here, once, so the API and
the agent cannot disagree about them.

Revisions of protocol 1 add to it and never take away. Each release speaks its
own revision and every older one back to ``OLDEST_PROTOCOL``: the revision of
the previous minor release. Agents send theirs in ``X-Tether-Protocol``.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import to_jsonable_python

#: The revision of protocol 1 this release speaks.
PROTOCOL_VERSION = 2
#: The oldest revision this release still serves: the previous minor release's.
OLDEST_PROTOCOL = 1
#: The release that introduced each revision, for messages that say what to upgrade to.
PROTOCOL_RELEASES = {1: "0.1", 2: "0.2"}
PROTOCOL_HEADER = "X-Tether-Protocol"
VERSION_HEADER = "X-Tether-Version"
REQUEST_ID_HEADER = "X-Request-Id"
API_PREFIX = "/tether/v1"

#: Upper bound on any agent request body; the API refuses larger ones with 413.
MAX_BODY_BYTES = 64 * 1024
#: The most the headers of one request to the plane may add up to (a browser's cookies included).
MAX_HEADER_BYTES = 32 * 1024

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
QueueName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\s,]+$")]
ShortText = Annotated[str, StringConstraints(max_length=256)]
#: The longest release version string the plane stores (its agent table's columns).
MAX_VERSION_LENGTH = 64
VersionText = Annotated[str, StringConstraints(max_length=MAX_VERSION_LENGTH)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9._/-]+$")]
#: A counter an agent process keeps (of a file's parse results, of a log's batches): stored as the
#: database's 32-bit integer, which a process does not outgrow.
Seq = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Request(BaseModel):
    """What agents send: anything the plane does not know is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Answer(BaseModel):
    """What the plane sends: fields the reader does not know are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def since(revision: int) -> dict[str, JsonValue]:
    """``json_schema_extra`` of an answer field added in ``revision``: left out for older callers."""
    return {"since": revision}


def written_for(answer: BaseModel, revision: int) -> Any:
    """``answer`` as JSON-ready data in ``revision``: without the fields added after it, at any depth."""
    return to_jsonable_python(_prune(answer, revision))


def _prune(value: Any, revision: int) -> Any:
    if isinstance(value, BaseModel):
        out = {}
        for name, info in type(value).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and int(extra.get("since", 1)) > revision:  # type: ignore[arg-type]
                continue
            out[name] = _prune(getattr(value, name), revision)
        return out
    if isinstance(value, list):
        return [_prune(item, revision) for item in value]
    return value


class TaskLogs(enum.StrEnum):
    """What becomes of the logs of an agent's tasks."""

    #: Sent to the plane as they are written, and read there.
    SHIP = "ship"
    #: Kept on the agent (and wherever its own Airflow remote logging puts them).
    LOCAL = "local"


class AgentRole(enum.StrEnum):
    WORKER = "worker"
    #: Parses DAG files where they are and sends the plane what Airflow's scheduler and UI need (revision 2).
    DAG_PROCESSOR = "dag-processor"
    #: Runs the triggers of deferred tasks where their code and connections are (revision 2).
    TRIGGERER = "triggerer"


class TokenScope(enum.StrEnum):
    """What an agent token may be used for: the roles its agents may serve."""

    WORKER = "worker"
    DAG_PROCESSOR = "dag-processor"
    TRIGGERER = "triggerer"
    #: Reports on the agents' pods; leases nothing, writes nothing but its reports.
    SENTINEL = "sentinel"


class JobKind(enum.StrEnum):
    """What an Airflow workload a job carries: ``ExecuteTask``, ``ExecuteCallback`` or ``TestConnection``."""

    TASK = "task"
    #: Given only to agents of revision 2 and later.
    CALLBACK = "callback"
    CONNECTION_TEST = "connection_test"


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


class RegisterRequest(_Request):
    name: Name
    incarnation: uuid.UUID
    tether_version: VersionText
    airflow_version: VersionText
    python_version: VersionText
    hostname: ShortText
    roles: list[AgentRole] = Field(default_factory=lambda: [AgentRole.WORKER], min_length=1, max_length=4)
    #: The queues a worker serves; an agent in no worker role serves none.
    queues: list[QueueName] = Field(default_factory=list, max_length=64)
    slots: int = Field(ge=1, le=1024)
    labels: dict[LabelKey, ShortText] = Field(default_factory=dict, max_length=64)
    #: Whether the agent ships its tasks' logs to the plane (revision 2); an older agent ships none.
    task_logs: TaskLogs | None = None
    #: Where the agent writes its tasks' logs ([logging] base_log_folder), for people looking for them.
    task_log_folder: Annotated[str, StringConstraints(max_length=1024)] | None = None

    @field_validator("queues")
    @classmethod
    def _workers_serve_queues(cls, queues: list[str], info: ValidationInfo) -> list[str]:
        if AgentRole.WORKER in info.data.get("roles", [AgentRole.WORKER]) and not queues:
            raise ValueError("a worker must serve at least one queue")
        return queues


class RegisterResponse(_Answer):
    agent_id: uuid.UUID
    heartbeat_interval: float
    lease_wait: float
    cordoned: bool
    #: Seconds for which a lease poll sent with ``heartbeat`` stands in for the agent's heartbeat while it
    #: holds no job (ADR 8); None: this plane counts only heartbeats.
    poll_heartbeat_window: float | None = Field(default=None, json_schema_extra=since(2))


# -- heartbeat ----------------------------------------------------------------


class HeartbeatRequest(_Request):
    incarnation: uuid.UUID
    running_jobs: list[uuid.UUID] = Field(default_factory=list, max_length=1024)
    free_slots: int = Field(ge=0, le=1024)
    draining: bool = False
    metrics: dict[Annotated[str, StringConstraints(max_length=64)], float] = Field(default_factory=dict, max_length=32)


class KillJob(_Answer):
    kind: Literal["kill"] = "kill"
    job_id: uuid.UUID
    reason: ShortText


class HeartbeatResponse(_Answer):
    status: AgentStatus
    cordoned: bool
    heartbeat_interval: float
    commands: list[KillJob] = Field(default_factory=list)

    @field_validator("commands", mode="before")
    @classmethod
    def _known_commands(cls, value: Any) -> Any:
        """Commands of kinds this agent does not know (a newer plane's) are not for it."""
        if isinstance(value, list):
            return [item for item in value if not isinstance(item, dict) or item.get("kind") == "kill"]
        return value


# -- lease --------------------------------------------------------------------


class LeaseRequest(_Request):
    incarnation: uuid.UUID
    free_slots: int = Field(ge=1, le=1024)
    queues: list[QueueName] = Field(min_length=1, max_length=64)
    wait: float = Field(default=20.0, ge=0, le=60)
    #: The poll is also the agent's heartbeat (ADR 8): sent only to a plane whose registration answer has
    #: a ``poll_heartbeat_window``.
    heartbeat: bool = False


class Lease(_Answer):
    job_id: uuid.UUID
    pool_slots: int
    lease_expires_at: datetime
    #: The Airflow workload, as the scheduler produced it: ``ExecuteTask``, or from revision 2
    #: ``ExecuteCallback`` and ``TestConnection`` (its ``type`` says which).
    workload: dict[str, Any]


class LeaseResponse(_Answer):
    leases: list[Lease] = Field(default_factory=list)
    #: The agent is cordoned: answered at once to a poll that is a heartbeat, which leases nothing then.
    cordoned: bool = Field(default=False, json_schema_extra=since(2))


# -- start gate and report ------------------------------------------------------


class StartRequest(_Request):
    incarnation: uuid.UUID


class StartResponse(_Answer):
    job_id: uuid.UUID
    state: JobState


class StartManyRequest(_Request):
    """The start gate for the jobs of one lease answer, in one call."""

    incarnation: uuid.UUID
    job_ids: list[uuid.UUID] = Field(min_length=1, max_length=1024)


class StartRefusal(_Answer):
    """Why one job of a ``StartManyRequest`` must not start: what a single start would have answered."""

    job_id: uuid.UUID
    status: int
    reason: ShortText
    detail: str


class StartManyResponse(_Answer):
    #: The jobs that passed the gate: run these, and only these.
    started: list[uuid.UUID] = Field(default_factory=list)
    refused: list[StartRefusal] = Field(default_factory=list)


class ReportRequest(_Request):
    incarnation: uuid.UUID
    state: ReportState
    exit_code: int | None = Field(default=None, ge=-255, le=255)
    reason: ShortText | None = None


class ReportResponse(_Answer):
    job_id: uuid.UUID
    state: JobState


# -- DAG processing (revision 2) ------------------------------------------------
#
# An agent in the dag-processor role runs Airflow's own DAG processor where the
# code is and sends what it found: bundles, one parse result per file, the files a
# bundle holds. It claims the UI's reparse requests and the callbacks the scheduler
# left for its bundles. The shapes follow Airflow's own ``persist_parsing_result``.

BundleName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")]
RelativeFileloc = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
DagId = Annotated[str, StringConstraints(min_length=1, max_length=250)]
Digest = Annotated[str, StringConstraints(min_length=8, max_length=128, pattern=r"^[0-9a-f]+$")]


class Bundle(_Request):
    name: BundleName
    supports_versioning: bool = False


class BundleSyncRequest(_Request):
    incarnation: uuid.UUID
    bundles: list[Bundle] = Field(min_length=1, max_length=64)


class BundleState(_Answer):
    name: str
    last_refreshed: datetime | None = None
    version: str | None = None


class BundleSyncResponse(_Answer):
    bundles: list[BundleState]
    #: Whether the plane keeps DAG source code for its Code tab; otherwise it must not be sent.
    store_source: bool
    #: Largest parse result the plane accepts, after decompression.
    max_result_bytes: int


class BundleStateUpdate(_Request):
    incarnation: uuid.UUID
    last_refreshed: datetime
    #: None leaves the stored version as it is.
    version: Annotated[str, StringConstraints(max_length=200)] | None = None


class ParsedDag(_Request):
    dag_id: DagId
    #: Airflow's own hash of the serialized DAG.
    hash: Digest
    #: The serialized DAG (Airflow's ``LazyDeserializedDAG.data``); left out when the plane has this hash.
    data: dict[str, Any] | None = None
    last_loaded: datetime | None = None


class ParseResult(_Request):
    """What parsing one file found, as Airflow's own processor would persist it."""

    incarnation: uuid.UUID
    bundle_name: BundleName
    bundle_version: Annotated[str, StringConstraints(max_length=200)] | None = None
    version_data: dict[str, Any] | None = None
    relative_fileloc: RelativeFileloc
    #: Counts this agent process's results for the file: one older than the last written is dropped.
    seq: Seq
    run_duration: float = Field(ge=0)
    dags: list[ParsedDag] = Field(default_factory=list, max_length=1000)
    import_errors: dict[RelativeFileloc, str] = Field(default_factory=dict, max_length=1000)
    warnings: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    #: The file's source, where both the plane and the agent allow it to leave the agent.
    source: str | None = None
    #: Names this result's content, to tell the plane's copy is current without sending it again.
    digest: Digest


class ParseResultResponse(_Answer):
    #: The DAGs whose serialized form is unknown to the plane: send the file again with their data.
    resend: list[str] = Field(default_factory=list)
    #: A result older than one already written, dropped.
    stale: bool = False
    #: DAGs Airflow did not write yet (it writes a DAG at most every ``min_serialized_dag_update_interval``):
    #: the result is not the plane's yet; send it again with a later parse.
    deferred: list[str] = Field(default_factory=list)


class BundleFiles(_Request):
    """The files a bundle holds after a refresh, and the results the agent believes the plane has."""

    incarnation: uuid.UUID
    files: dict[RelativeFileloc, Digest | None] = Field(max_length=100_000)


class BundleFilesResponse(_Answer):
    #: Files whose latest result the plane lacks: send it again.
    resend: list[str] = Field(default_factory=list)
    deactivated: int = 0


class WorkRequest(_Request):
    incarnation: uuid.UUID
    #: Names this claim: a retried call gets the same work, not more.
    claim_id: uuid.UUID
    bundles: list[BundleName] = Field(min_length=1, max_length=64)
    max_callbacks: int = Field(default=20, ge=0, le=1000)


class PriorityFile(_Answer):
    bundle_name: str
    relative_fileloc: str


class CallbackWork(_Answer):
    """A callback the scheduler left for the DAG processor, as Airflow stores it."""

    req_class: str
    req_data: str


class WorkResponse(_Answer):
    priority_files: list[PriorityFile] = Field(default_factory=list)
    callbacks: list[CallbackWork] = Field(default_factory=list)


# -- task logs (revision 2) ----------------------------------------------------

#: Longest log line shipped; a longer one is cut, and says so.
MAX_LOG_LINE = 64 * 1024
#: Largest log batch body, after decompression.
MAX_LOG_BATCH_BYTES = 2 * 1024 * 1024
#: Most jobs' batches in one call.
MAX_LOG_BATCHES = 256


def _printable_nul(line: str) -> str:
    """A NUL a task printed, shown as the replacement character: the plane's database keeps no NUL in text."""
    return line.replace("\x00", "\ufffd")


LogLine = Annotated[str, StringConstraints(max_length=MAX_LOG_LINE + 256), AfterValidator(_printable_nul)]


class LogLines(_Request):
    """Lines of a running task's log, in order; one agent process numbers the batches of a job from 0."""

    #: Names the run of the task this agent process is following: a task resumed later is a new segment.
    segment: uuid.UUID
    seq: Seq
    lines: list[LogLine] = Field(max_length=10_000)
    #: The task process has exited and these are its last lines.
    final: bool = False


class LogBatch(LogLines):
    """One batch of one job's (or trigger's) log."""

    incarnation: uuid.UUID


class JobLogBatch(LogLines):
    job_id: uuid.UUID


class JobLogBatches(_Request):
    """Batches of several of the agent's jobs' logs in one call: each is kept, or refused, on its own."""

    incarnation: uuid.UUID
    batches: list[JobLogBatch] = Field(min_length=1, max_length=MAX_LOG_BATCHES)


class LogBatchResponse(_Answer):
    #: The plane takes no more lines of this try (its cap is reached, or the job is no longer this agent's).
    stop: bool = False
    reason: str | None = None


class JobLogAnswer(LogBatchResponse):
    job_id: uuid.UUID


class JobLogBatchesResponse(_Answer):
    #: One answer per batch, in the order of the request.
    answers: list[JobLogAnswer]


# -- triggers (revision 2) -----------------------------------------------------
#
# An agent in the triggerer role runs Airflow's own trigger runner. The plane
# gives it triggers by capacity (as Airflow assigns them to its own triggerers,
# under an Airflow triggerer job the plane keeps for the agent process) and their
# workloads, kwargs decrypted; the agent sends back what they fired. An outcome
# is taken once (by its id) and only from the agent process holding the trigger.

TriggerId = Annotated[int, Field(ge=1)]


class TriggererLoad(_Request):
    incarnation: uuid.UUID
    capacity: int = Field(ge=1, le=100_000)
    #: Ask for a fresh Execution API token with the answer (the agent's is getting old).
    want_token: bool = False
    #: The agent's trigger runner answers. False (its event loop is stuck) leaves the triggerer job's
    #: heartbeat unwritten, so that its triggers go to other triggerers, as Airflow's watchdog does.
    healthy: bool = True


class TriggererLoadResponse(_Answer):
    #: The triggers this agent process must run now; any other it runs, it stops.
    trigger_ids: list[int]
    #: The Airflow triggerer job the plane keeps for this agent process (it names trigger log files).
    job_id: int
    #: A token for the Execution API calls trigger code makes (Variables, Connections, XCom), when asked for.
    execution_token: str | None = None
    #: Seconds the token is valid for, from now.
    token_valid_for: int | None = None


class TriggerWorkloadsRequest(_Request):
    incarnation: uuid.UUID
    trigger_ids: list[TriggerId] = Field(min_length=1, max_length=1000)


class TriggerWorkloadsResponse(_Answer):
    #: Airflow ``RunTrigger`` workloads, kwargs in the clear (TLS is their protection), with ``log_path``.
    workloads: list[dict[str, Any]]


class TriggerEventKind(enum.StrEnum):
    """What a trigger's event does, as Airflow's event classes say it."""

    #: A ``TriggerEvent``: the deferred task resumes on a worker with the payload.
    EVENT = "event"
    #: A task-end event: the task ends in this state without running again.
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"


class TriggerFired(_Request):
    #: Names this outcome: sent again after a lost answer, it is taken once.
    outcome_id: uuid.UUID
    trigger_id: TriggerId
    kind: TriggerEventKind = TriggerEventKind.EVENT
    #: The event's payload, encoded by Airflow's serde (``airflow.sdk.serde.serialize``).
    payload: Any = None
    #: A task-end event's XComs (JSON, as Airflow's task-end events hold them).
    xcoms: dict[str, JsonValue] | None = None


class TriggerFailed(_Request):
    outcome_id: uuid.UUID
    trigger_id: TriggerId
    #: The traceback lines, as Airflow's trigger runner reports them.
    error: list[Annotated[str, StringConstraints(max_length=16_384)]] | None = Field(default=None, max_length=500)


class TriggerOutcomes(_Request):
    incarnation: uuid.UUID
    events: list[TriggerFired] = Field(default_factory=list, max_length=1000)
    failures: list[TriggerFailed] = Field(default_factory=list, max_length=1000)


class TriggerOutcomesResponse(_Answer):
    #: Outcomes the plane took (or had taken already, or that concern a trigger gone meanwhile): forget them.
    taken: list[uuid.UUID] = Field(default_factory=list)
    #: Outcomes of triggers this agent process no longer holds: dropped.
    refused: list[uuid.UUID] = Field(default_factory=list)


class TriggererRelease(_Request):
    incarnation: uuid.UUID


# -- demand (revision 2) ---------------------------------------------------------
#
# What autoscalers read (KEDA's metrics-api scaler, with an agent token of any
# scope): the work of each queue in task slots, and the replicas it needs.


class QueueDemand(_Answer):
    """The work of one queue, counted in task slots (a task's ``pool_slots``) and in jobs."""

    #: Jobs waiting for an agent.
    queued: int
    #: Jobs an agent holds: leased (starting) or running.
    running: int
    queued_slots: int
    running_slots: int
    #: ``queued_slots + running_slots``: what agents serving the queue must hold to leave nothing waiting.
    slots: int
    #: Agents of ``slots_per_replica`` slots needed for ``slots``: ``ceil(slots / slots_per_replica)``.
    replicas: int


class DemandResponse(_Answer):
    """Demand per queue, and for the queues asked for together (a worker group's)."""

    slots_per_replica: int
    #: When the figures were read; callers within a second or two of each other share one reading.
    as_of: datetime
    #: The queues asked for (``?queues=``), or every queue with work; a queue without work is all zeros.
    queues: dict[str, QueueDemand]
    #: The queues of ``queues`` together: the figures one worker group serving them all scales on.
    queued: int
    running: int
    queued_slots: int
    running_slots: int
    slots: int
    replicas: int


# -- sentinel (revision 2) -------------------------------------------------------
#
# A sentinel (``tether-agent sentinel``, a token of scope ``sentinel``) tells the
# plane how the agents' pods of one Kubernetes namespace are doing, as Kubernetes
# sees them: states and reasons only, never a message, log, code or data.

K8sName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class PodReport(_Request):
    name: K8sName
    #: The worker group (label ``tether-agent/worker``) or role (``tether-agent/role``) of the pod.
    group: Annotated[str, StringConstraints(max_length=63)] | None = None
    #: Pending, Running, Succeeded, Failed or Unknown.
    phase: Annotated[str, StringConstraints(max_length=32)]
    ready: bool
    #: Container restarts, all containers together.
    restarts: int = Field(ge=0)
    #: Why a container last ended: OOMKilled, Error, Completed...
    last_termination: Reason | None = None
    #: Why a container waits: CrashLoopBackOff, ImagePullBackOff, ContainerCreating...
    waiting: Reason | None = None
    #: The reason of the latest Warning event about the pod: BackOff, FailedScheduling, Unhealthy...
    warning: Reason | None = None


class BackendCheck(_Request):
    #: ``secrets`` or ``xcom``.
    name: Annotated[str, StringConstraints(pattern=r"^(secrets|xcom)$")]
    ok: bool
    detail: ShortText | None = None


class SentinelReport(_Request):
    #: The sentinel's name (its pod's).
    name: Name
    namespace: K8sName
    pods: list[PodReport] = Field(default_factory=list, max_length=1000)
    backends: list[BackendCheck] = Field(default_factory=list, max_length=8)


class SentinelReportResponse(_Answer):
    #: Seconds until the next report.
    interval: float


class PreflightResponse(_Answer):
    """What a preflight learns: the token works from this address, and which plane answers."""

    token_name: str
    address: str
    protocol: int = PROTOCOL_VERSION
    version: str
    heartbeat_interval: float


class Problem(_Answer):
    """Every error body: one sentence a person can act on."""

    detail: str
    reason: str


class Health(_Answer):
    status: Literal["ok"] = "ok"
    #: The revision the answer is written in: the caller's, where the plane serves it.
    protocol: int = PROTOCOL_VERSION
    version: str
    #: The oldest revision the plane serves.
    oldest_protocol: int = Field(default=OLDEST_PROTOCOL, json_schema_extra=since(2))
    #: How this API server learns of new jobs: ``listening`` (PostgreSQL notifications), ``polling`` (its
    #: listener is reconnecting: lease requests look on a timer), ``not_used`` (SQLite, or no lease yet).
    listener: str | None = Field(default=None, json_schema_extra=since(2))


def parse_revision(text: str | None) -> int | None:
    """The revision an ``X-Tether-Protocol`` header names; None when it names none."""
    if text is None or not text.strip().isdigit() or len(text.strip()) > 6:
        return None
    return int(text.strip())


def release_of(revision: int) -> str:
    """The Tether release line that speaks ``revision``, for people."""
    return PROTOCOL_RELEASES.get(revision, f"with protocol {revision}")

"""The ``[tether]`` configuration section: declared once, read once.

``OPTIONS`` is the single declaration: the provider info publishes it to Airflow
(so ``airflow config list`` shows every option with its type and default) and
``PlaneSettings.from_airflow`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tether.plane.netaccess import Network, parse_cidrs

SECTION = "tether"

OPTIONS: dict[str, dict[str, Any]] = {
    "heartbeat_interval": {
        "description": "Seconds between two heartbeats of an agent; the plane dictates it to every agent. An idle "
        "agent's lease poll counts as its heartbeat for (missed_heartbeats - 1) intervals.\n",
        "type": "float",
        "default": "10",
        "example": "10",
    },
    "missed_heartbeats": {
        "description": "An agent whose last heartbeat is older than this many intervals is UNHEALTHY: "
        "its unstarted leases go back to the queue and its running jobs are failed.\n",
        "type": "integer",
        "default": "3",
        "example": "3",
    },
    "lease_wait": {
        "description": "Longest time, in seconds, that a lease request is held open while no job is queued.\n",
        "type": "float",
        "default": "20",
        "example": "20",
    },
    "lease_timeout": {
        "description": "Seconds an agent has to confirm a lease through the start gate; an unconfirmed lease "
        "then returns to the queue without using a retry.\n",
        "type": "float",
        "default": "30",
        "example": "30",
    },
    "poll_interval": {
        "description": "Seconds between two looks for new jobs while a lease request waits. PostgreSQL "
        "wakes waiting agents at once with LISTEN/NOTIFY and uses this only as a safety net; on SQLite it is "
        "the only way, so keep it short there.\n",
        "type": "float",
        "default": "0.2",
        "example": "0.2",
    },
    "job_retention": {
        "description": "Seconds a finished job row is kept for inspection before the executor deletes it.\n",
        "type": "float",
        "default": "3600",
        "example": "3600",
    },
    "max_agent_tokens": {
        "description": "Most agent tokens that may be live (neither revoked nor expired) at once.\n",
        "type": "integer",
        "default": "50",
        "example": "50",
    },
    "token_cache_ttl": {
        "description": "Seconds before a token revoked or changed anywhere (CLI, REST, another API server) is "
        "refused by this API server: it checks this often whether any token changed, and keeps each accepted "
        "token for up to a minute while none did. A token expiring is refused from that moment. 0 looks every "
        "token up on every call.\n",
        "type": "float",
        "default": "2",
        "example": "2",
    },
    "sentinel_interval": {
        "description": "Seconds between two reports of a sentinel (tether-agent sentinel) on the agents' pods; "
        "the plane gives it to every sentinel with its answer.\n",
        "type": "float",
        "default": "30",
        "example": "30",
    },
    "store_dag_source": {
        "description": "Whether the plane keeps the source code of DAGs that agents parse, for the UI's Code "
        "tab. Agents send it only where this is on and their own --share-dag-source is on; otherwise the Code "
        "tab says that the source stays with the agents.\n",
        "type": "boolean",
        "default": "False",
        "example": "True",
    },
    "max_parse_result_bytes": {
        "description": "Largest parse result (one DAG file's serialized DAGs, import errors and warnings, after "
        "decompression) that an agent may send; larger ones are refused with 413.\n",
        "type": "integer",
        "default": str(16 * 1024 * 1024),
        "example": str(16 * 1024 * 1024),
    },
    "task_log_max_bytes": {
        "description": "Most bytes of one task try's log that agents may ship; past it the plane keeps what it "
        "has, adds a line saying the log was cut there, and takes no more.\n",
        "type": "integer",
        "default": str(10 * 1024 * 1024),
        "example": str(10 * 1024 * 1024),
    },
    "trusted_proxies": {
        "description": "Comma-separated addresses or CIDR ranges of reverse proxies whose X-Forwarded-For "
        "header is believed. Empty: the socket's peer address is the client address.\n",
        "type": "string",
        "default": "",
        "example": "10.0.0.0/8,127.0.0.1",
    },
    "listen_database_url": {
        "description": "Where the API server LISTENs for new jobs, when not through the metadata database's own "
        "URL: a direct, session-mode connection to PostgreSQL. Set it when the metadata database is reached "
        "through a pooler in transaction mode (PgBouncer's pool_mode = transaction), where LISTEN does not work.\n",
        "type": "string",
        "sensitive": True,
        "default": "",
        "example": "postgresql://airflow:secret@postgres-direct:5432/airflow",
    },
    "callback_queue": {
        "description": "The queue of the callbacks Airflow hands its executor (deadline alerts' synchronous "
        "callbacks): worker agents serving it run them. Empty: Airflow's [operators] default_queue.\n",
        "type": "string",
        "default": "",
        "example": "default",
    },
}


def _seconds(value: str) -> timedelta:
    return timedelta(seconds=float(value))


@dataclass(frozen=True, kw_only=True)
class PlaneSettings:
    heartbeat_interval: timedelta = timedelta(seconds=10)
    missed_heartbeats: int = 3
    lease_wait: timedelta = timedelta(seconds=20)
    lease_timeout: timedelta = timedelta(seconds=30)
    poll_interval: timedelta = timedelta(seconds=0.2)
    job_retention: timedelta = timedelta(hours=1)
    max_agent_tokens: int = 50
    token_cache_ttl: timedelta = timedelta(seconds=2)
    sentinel_interval: timedelta = timedelta(seconds=30)
    store_dag_source: bool = False
    max_parse_result_bytes: int = 16 * 1024 * 1024
    task_log_max_bytes: int = 10 * 1024 * 1024
    trusted_proxies: tuple[Network, ...] = ()
    #: Empty: the metadata database's own URL.
    listen_database_url: str = field(default="", repr=False)
    #: Empty: Airflow's ``[operators] default_queue`` (``from_airflow`` reads it), else "default".
    callback_queue: str = ""

    @property
    def health_timeout(self) -> timedelta:
        return self.heartbeat_interval * self.missed_heartbeats

    @property
    def poll_heartbeat_window(self) -> timedelta | None:
        """How long an idle agent's lease poll stands in for its heartbeat (ADR 8), None if it may not.

        The health timeout less one interval: when a stand-in lapses, the heartbeat the
        agent then sends still lands before the agent counts as silent.
        """
        window = self.health_timeout - self.heartbeat_interval
        return window if window > timedelta(0) else None

    @classmethod
    def from_airflow(cls) -> PlaneSettings:
        from airflow.configuration import conf

        def get(key: str) -> str:
            return conf.get(SECTION, key, fallback=OPTIONS[key]["default"]) or ""

        return cls(
            heartbeat_interval=_seconds(get("heartbeat_interval")),
            missed_heartbeats=int(get("missed_heartbeats")),
            lease_wait=_seconds(get("lease_wait")),
            lease_timeout=_seconds(get("lease_timeout")),
            poll_interval=_seconds(get("poll_interval")),
            job_retention=_seconds(get("job_retention")),
            max_agent_tokens=int(get("max_agent_tokens")),
            token_cache_ttl=_seconds(get("token_cache_ttl")),
            sentinel_interval=_seconds(get("sentinel_interval")),
            store_dag_source=get("store_dag_source").strip().lower() in ("true", "1", "yes", "on"),
            max_parse_result_bytes=int(get("max_parse_result_bytes")),
            task_log_max_bytes=int(get("task_log_max_bytes")),
            trusted_proxies=tuple(parse_cidrs(item for item in get("trusted_proxies").split(",") if item.strip())),
            listen_database_url=get("listen_database_url").strip(),
            callback_queue=get("callback_queue").strip() or conf.get("operators", "default_queue", fallback="default"),
        )

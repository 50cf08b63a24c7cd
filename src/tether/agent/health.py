"""The agent's local HTTP endpoints: ``/healthz``, ``/readyz`` and ``/metrics``.

A few lines on asyncio's own server: three GET routes do not justify a web
framework, and it must not install signal handlers of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tether.agent.sdk_internals import Availability

log = logging.getLogger("tether.agent.health")


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.slots = Gauge("tether_agent_slots", "Task slots of this agent", registry=self.registry)
        self.free_slots = Gauge("tether_agent_free_slots", "Free task slots", registry=self.registry)
        self.running = Gauge("tether_agent_running_tasks", "Tasks running now", registry=self.registry)
        self.jobs = Counter(
            "tether_agent_jobs",
            "Jobs finished, by outcome: success, failed, fenced (stopped here: the plane refused the agent's token)",
            ["outcome"],
            registry=self.registry,
        )
        self.fenced_jobs = Counter(
            "tether_agent_fenced_jobs",
            "Running tasks the agent stopped because the plane refused its token (revoked or expired)",
            registry=self.registry,
        )
        self.plane_errors = Counter(
            "tether_agent_plane_errors",
            "Failed calls to the plane, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.heartbeat_seconds = Histogram(
            "tether_agent_heartbeat_seconds", "Heartbeat round-trip time", registry=self.registry
        )
        self.connected = Gauge("tether_agent_plane_connected", "1 while the plane answers", registry=self.registry)
        self.sdk_feature = Gauge(
            "tether_agent_sdk_feature",
            "1 where a feature relying on the Task SDK's internals is on, 0 where the agent uses its fallback",
            ["feature"],
            registry=self.registry,
        )

        self.dag_files = Counter(
            "tether_agent_dag_files",
            "DAG files parsed, by what became of their result: sent, unchanged (not sent), queued (the plane "
            "was away), refused, stale (older than one the plane had), deferred (to be written later)",
            ["result"],
            registry=self.registry,
        )
        self.dag_parse_seconds = Histogram(
            "tether_agent_dag_parse_seconds",
            "Time to parse one DAG file",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.dag_upload_bytes = Counter(
            "tether_agent_dag_upload_bytes",
            "Bytes of parse results sent to the plane (compressed)",
            registry=self.registry,
        )
        self.dag_callbacks = Counter(
            "tether_agent_dag_callbacks", "DAG callbacks claimed from the plane to run here", registry=self.registry
        )

        self.log_lines = Counter(
            "tether_agent_task_log_lines", "Task log lines sent to the plane", registry=self.registry
        )
        self.log_bytes = Counter(
            "tether_agent_task_log_bytes",
            "Task log bytes sent to the plane (before compression)",
            registry=self.registry,
        )

        self.triggers_running = Gauge(
            "tether_agent_triggers_running", "Triggers running now (triggerer role)", registry=self.registry
        )
        self.trigger_outcomes = Counter(
            "tether_agent_trigger_outcomes",
            "What triggers did, as the plane took it: fired (an event), failed, refused (the trigger had moved to "
            "another triggerer)",
            ["outcome"],
            registry=self.registry,
        )
        self.trigger_loop_blocked = Counter(
            "tether_agent_trigger_loop_blocked",
            "Warnings of the trigger runner that a trigger blocked its event loop (longer than Airflow's "
            "[triggerer] blocked_main_thread_warning_threshold)",
            registry=self.registry,
        )

    def sdk_features(self, availability: Availability) -> None:
        for feature, reason in availability.items():
            self.sdk_feature.labels(feature.value).set(0 if reason else 1)


class HealthServer:
    def __init__(self, *, host: str, port: int, ready: Callable[[], tuple[bool, str]], metrics: AgentMetrics) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        for sock in self._server.sockets:
            self.port = int(sock.getsockname()[1])
            break
        log.info("Health endpoints on http://%s:%d (/healthz, /readyz, /metrics)", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] != "GET":
                status, body, ctype = 405, b"method not allowed\n", "text/plain"
            elif path == "/healthz":
                status, body, ctype = 200, b"ok\n", "text/plain"
            elif path == "/readyz":
                ok, why = self._ready()
                status, body, ctype = (200 if ok else 503), (why + "\n").encode(), "text/plain"
            elif path == "/metrics":
                status, body, ctype = 200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

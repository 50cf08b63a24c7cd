"""A fake plane behind ``httpx.MockTransport``: just enough of protocol v1 to drive an agent."""

from __future__ import annotations

import json
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx


@dataclass
class FakePlane:
    queued: deque[dict[str, Any]] = field(default_factory=deque)
    leased: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    reports: list[tuple[str, str, int | None]] = field(default_factory=list)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    registrations: int = 0
    down: bool = False
    refuse_start: bool = False
    #: Jobs whose start is refused on their own, the others of the call starting.
    refuse_jobs: set[str] = field(default_factory=set)
    #: False: a plane that only starts jobs one by one.
    batched_start: bool = True
    #: The job ids of each start call, in order.
    start_calls: list[list[str]] = field(default_factory=list)
    cordoned: bool = False
    kill: set[str] = field(default_factory=set)
    #: Calls (the last part of their path: "register", "heartbeat", "lease", ...) answered with a body that
    #: is not the protocol's, as a proxy's error page or a broken plane would answer.
    garbled: set[str] = field(default_factory=set)
    #: Calls (as for ``garbled``) answered 503, as an overloaded plane or a proxy without a backend answers.
    unavailable: set[str] = field(default_factory=set)
    #: A refusal (status, body) given to every registration, as a plane that does not serve this agent answers.
    refuse_register: tuple[int, dict[str, Any]] | None = None
    agent_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: Seconds a lease poll stands in for a heartbeat, announced at registration (ADR 8); None: never.
    poll_heartbeat_window: float | None = None
    #: The body of every lease poll, in order.
    polls: list[dict[str, Any]] = field(default_factory=list)
    #: The Accept-Encoding of each kind of call (the last part of its path), as last sent.
    accept_encoding: dict[str, str] = field(default_factory=dict)

    def add_job(self, task_id: str = "t", pool_slots: int = 1) -> str:
        job_id = str(uuid.uuid4())
        self.queued.append({"job_id": job_id, "pool_slots": pool_slots, "task_id": task_id})
        return job_id

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path.removeprefix("/tether/v1")
        self.accept_encoding[path.rsplit("/", 1)[-1]] = request.headers.get("accept-encoding", "")
        if path.rsplit("/", 1)[-1] in self.unavailable:
            return httpx.Response(503, text="no backend")
        if path.rsplit("/", 1)[-1] in self.garbled:
            return httpx.Response(200, json={"status": "fine, thanks"})
        body = json.loads(request.content or b"{}")
        if path == "/agents/register":
            self.registrations += 1
            if self.refuse_register is not None:
                status, problem = self.refuse_register
                return httpx.Response(status, json=problem)
            return httpx.Response(
                200,
                json={
                    "agent_id": self.agent_id,
                    "heartbeat_interval": 0.05,
                    "lease_wait": 0.05,
                    "cordoned": False,
                    "poll_heartbeat_window": self.poll_heartbeat_window,
                },
            )
        if path.endswith("/heartbeat"):
            self.heartbeats.append(body)
            commands = [
                {"kind": "kill", "job_id": j, "reason": "revoked"} for j in body["running_jobs"] if j in self.kill
            ]
            return httpx.Response(
                200,
                json={"status": "HEALTHY", "cordoned": self.cordoned, "heartbeat_interval": 0.05, "commands": commands},
            )
        if path.endswith("/lease"):
            self.polls.append(body)
            if body.get("heartbeat") and self.cordoned:
                return httpx.Response(200, json={"leases": [], "cordoned": True})
            leases = []
            free = body["free_slots"]
            while self.queued and self.queued[0]["pool_slots"] <= free and not self.cordoned:
                job = self.queued.popleft()
                free -= job["pool_slots"]
                self.leased[job["job_id"]] = job
                leases.append(
                    {
                        "job_id": job["job_id"],
                        "pool_slots": job["pool_slots"],
                        "lease_expires_at": (datetime.now(UTC) + timedelta(seconds=30)).isoformat(),
                        "workload": {"ti": {"task_id": job["task_id"]}},
                    }
                )
            return httpx.Response(200, json={"leases": leases})
        if path.endswith("/jobs/start"):
            if not self.batched_start:
                return httpx.Response(404, json={"detail": "Not Found"})  # no such route
            self.start_calls.append(body["job_ids"])
            if self.refuse_start:
                return httpx.Response(409, json={"detail": "superseded", "reason": "superseded"})
            started = [j for j in body["job_ids"] if j not in self.refuse_jobs]
            self.started.extend(started)
            refused = [
                {"job_id": j, "status": 409, "reason": "lease_expired", "detail": "lease expired"}
                for j in body["job_ids"]
                if j in self.refuse_jobs
            ]
            return httpx.Response(200, json={"started": started, "refused": refused})
        if path.endswith("/start"):
            job_id = path.split("/")[-2]
            self.start_calls.append([job_id])
            if self.refuse_start or job_id in self.refuse_jobs:
                return httpx.Response(409, json={"detail": "lease expired", "reason": "lease_expired"})
            self.started.append(job_id)
            return httpx.Response(200, json={"job_id": job_id, "state": "RUNNING"})
        if path.endswith("/report"):
            job_id = path.split("/")[-2]
            self.reports.append((job_id, body["state"], body.get("exit_code")))
            return httpx.Response(200, json={"job_id": job_id, "state": body["state"].upper()})
        return httpx.Response(404, json={"detail": "no route", "reason": "not_found"})

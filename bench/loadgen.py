"""Simulated agents: N clients speaking the Tether agent protocol to one plane, for a bounded time.

Each simulated agent registers, heartbeats at the interval the plane dictates
(first beat at a random phase, like agents started at different times) and
keeps one lease long-poll open, exactly as ``tether-agent`` does, but runs no
task. Run as ``python -m bench.loadgen``; it writes its measurements as JSON.
Loopback only: it refuses any plane URL that is not on 127.0.0.1/localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import uvloop
from pydantic import BaseModel

import tether
from bench.stats import percentile
from tether import protocol
from tether.collector import settle_garbage_collector

#: Registrations in flight at once while the simulated agents start.
REGISTER_CONCURRENCY = 25


@dataclass
class Stats:
    heartbeat: list[float] = field(default_factory=list)
    #: When each measured heartbeat was sent, in seconds since measuring began.
    heartbeat_sent: list[float] = field(default_factory=list)
    measuring_since: float = 0.0
    lease: list[float] = field(default_factory=list)
    register: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    leases_granted: int = 0
    measuring: bool = False
    #: How late the generator's own event loop woke up: its lateness is in every latency above.
    loop_lag: list[float] = field(default_factory=list)

    def error(self, what: str, detail: str) -> None:
        self.errors[f"{what}: {detail}"] += 1


class SimulatedAgent:
    def __init__(self, index: int, http: httpx.AsyncClient, stats: Stats) -> None:
        self.name = f"sim-{index:05d}"
        self.http = http
        self.stats = stats
        self.incarnation = uuid.uuid4()
        self.agent_id: uuid.UUID | None = None
        self.interval = 10.0
        self.lease_wait = 20.0

    async def _post(self, path: str, body: BaseModel, timeout: float = 30.0) -> httpx.Response:
        return await self.http.post(
            path,
            content=body.model_dump_json(),
            headers={protocol.REQUEST_ID_HEADER: uuid.uuid4().hex, "Content-Type": "application/json"},
            timeout=timeout,
        )

    async def register(self, gate: asyncio.Semaphore) -> bool:
        body = protocol.RegisterRequest(
            name=self.name,
            incarnation=self.incarnation,
            tether_version=tether.__version__,
            airflow_version="bench",
            python_version="bench",
            hostname="loadgen",
            queues=["bench-idle"],
            slots=16,
        )
        async with gate:
            started = time.monotonic()
            try:
                response = await self._post("/agents/register", body)
            except httpx.HTTPError as exc:
                self.stats.error("register", type(exc).__name__)
                return False
            self.stats.register.append(time.monotonic() - started)
        if response.status_code != 200:
            self.stats.error("register", str(response.status_code))
            return False
        answer = protocol.RegisterResponse.model_validate_json(response.content)
        self.agent_id, self.interval, self.lease_wait = answer.agent_id, answer.heartbeat_interval, answer.lease_wait
        return True

    async def lifecycle(self, gate: asyncio.Semaphore, registered: list[bool]) -> None:
        """Register, then heartbeat and long-poll until cancelled - as an agent does from its start."""
        ok = await self.register(gate)
        registered.append(ok)
        if ok:
            await asyncio.gather(self.heartbeats(), self.leases())

    async def heartbeats(self) -> None:
        await asyncio.sleep(random.uniform(0, self.interval))
        body = protocol.HeartbeatRequest(incarnation=self.incarnation, free_slots=16)
        while True:
            started = time.monotonic()
            measuring = self.stats.measuring
            try:
                response = await self._post(f"/agents/{self.agent_id}/heartbeat", body)
                if response.status_code != 200:
                    self.stats.error("heartbeat", str(response.status_code))
            except httpx.HTTPError as exc:
                self.stats.error("heartbeat", type(exc).__name__)
            elapsed = time.monotonic() - started
            if measuring:
                self.stats.heartbeat.append(elapsed)
                self.stats.heartbeat_sent.append(started - self.stats.measuring_since)
            await asyncio.sleep(max(self.interval - elapsed, 0.0))

    async def leases(self) -> None:
        body = protocol.LeaseRequest(incarnation=self.incarnation, free_slots=16, queues=["bench-idle"], wait=20.0)
        while True:
            started = time.monotonic()
            try:
                response = await self._post(f"/agents/{self.agent_id}/lease", body, timeout=body.wait + 15)
            except httpx.HTTPError as exc:
                self.stats.error("lease", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            elapsed = time.monotonic() - started
            if response.status_code != 200:
                self.stats.error("lease", str(response.status_code))
                await asyncio.sleep(1.0)
                continue
            self.stats.leases_granted += len(protocol.LeaseResponse.model_validate_json(response.content).leases)
            if self.stats.measuring:
                # How long past the plane's hold the answer came: the poll's own cost.
                self.stats.lease.append(max(elapsed - min(body.wait, self.lease_wait), 0.0))


async def watch_loop(stats: Stats) -> None:
    while True:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        if stats.measuring:
            stats.loop_lag.append(time.monotonic() - started - 0.05)


def by_second(sent: list[float], latencies: list[float]) -> list[tuple[int, int, float]]:
    """Per second of the measurement: heartbeats sent, and the slowest of them - where the tail sits in time."""
    seconds: dict[int, list[float]] = {}
    for at, latency in zip(sent, latencies, strict=True):
        seconds.setdefault(int(at), []).append(latency)
    return [(second, len(values), max(values)) for second, values in sorted(seconds.items())]


async def run(
    url: str, token: str, agents: int, duration: float, ramp_limit: float, ready_file: Path
) -> dict[str, object]:
    stats = Stats()
    context = ssl.create_default_context()
    clients = [
        httpx.AsyncClient(
            base_url=url + protocol.API_PREFIX,
            headers={"Authorization": f"Bearer {token}", protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)},
            verify=context,
            trust_env=False,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
        )
        for _ in range(agents)
    ]
    sims = [SimulatedAgent(i, client, stats) for i, client in enumerate(clients)]
    tasks: list[asyncio.Task[None]] = []
    registered: list[bool] = []
    try:
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
        ramp_started = time.monotonic()
        tasks = [asyncio.create_task(s.lifecycle(gate, registered), name=s.name) for s in sims]
        tasks.append(asyncio.create_task(watch_loop(stats), name="loop-lag"))
        while len(registered) < agents and time.monotonic() - ramp_started < ramp_limit:
            await asyncio.sleep(0.1)
        ramp = time.monotonic() - ramp_started
        # The generator holds every simulated agent's requests open, as the API server does: its own
        # full collections would stop it for tenths of a second and count in every latency it measures.
        settle_garbage_collector()
        # A steady state first: every heartbeat phase and every long-poll has come round once.
        await asyncio.sleep(max((max(s.interval, s.lease_wait) for s in sims), default=0.0) + 2)
        stats.measuring_since = time.monotonic()
        stats.measuring = True
        ready_file.write_text(str(time.time()))
        await asyncio.sleep(duration)
        stats.measuring = False
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    return {
        "agents": agents,
        "registered": sum(registered),
        "ramp_seconds": ramp,
        "duration": duration,
        "heartbeats": len(stats.heartbeat),
        "heartbeat_p50": percentile(stats.heartbeat, 0.50),
        "heartbeat_p99": percentile(stats.heartbeat, 0.99),
        "heartbeat_max": max(stats.heartbeat, default=None),
        "lease_polls": len(stats.lease),
        "lease_overrun_p50": percentile(stats.lease, 0.50),
        "lease_overrun_p99": percentile(stats.lease, 0.99),
        "register_p50": percentile(stats.register, 0.50),
        "register_p99": percentile(stats.register, 0.99),
        "leases_granted": stats.leases_granted,
        "loadgen_loop_lag_p99": percentile(stats.loop_lag, 0.99),
        "heartbeat_by_second": by_second(stats.heartbeat_sent, stats.heartbeat),
        "errors": dict(stats.errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--ramp-limit", type=float, default=180.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the load generator only talks to a plane on loopback")
    if not 1 <= args.agents <= 5000 or not 0 < args.duration <= 900:
        parser.error("--agents must be 1..5000 and --duration 0..900 seconds")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    token = args.token_file.read_text().strip()
    ready = args.out.with_suffix(".measuring")
    result = uvloop.run(run(args.url, token, args.agents, args.duration, args.ramp_limit, ready))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

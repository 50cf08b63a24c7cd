"""Simulated agents: N clients speaking the Tether agent protocol to one plane, until told to stop.

Each simulated agent has a worker token of its own and talks HTTPS, verifying
the plane against the CA it is given. It registers, heartbeats at the interval
the plane dictates (first beat at a random phase, like agents started at
different times, and naming the jobs it runs) and keeps one lease long-poll
open for its free slots, exactly as ``tether-agent`` does: while it holds no
job and its polls are answered, a poll stands in for its heartbeat when the
plane says so (ADR 8). A lease is passed
through the start gate in one start-many call; each started job "runs" for a
random time and is reported a success, and its slot is free again.

Run as ``python -m bench.loadgen``; it writes what it saw, each event with its
wall-clock time, as JSON, so the caller can cut it into the steps of the load.
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
from tether import protocol
from tether.agent.client import KEEPALIVE_EXPIRY, PLAIN_ANSWER
from tether.collector import settle_garbage_collector

#: Registrations in flight at once while the simulated agents start.
REGISTER_CONCURRENCY = 25
#: Seconds between two looks for the stop file.
STOP_POLL = 0.5
#: How often the generator checks its own event loop's lateness.
LAG_TICK = 0.05


@dataclass
class Stats:
    """What the simulated agents saw; each event as (wall-clock time it was sent, seconds it took or what)."""

    heartbeat: list[tuple[float, float]] = field(default_factory=list)
    start: list[tuple[float, float]] = field(default_factory=list)
    report: list[tuple[float, float]] = field(default_factory=list)
    register: list[float] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)
    leases_granted: int = 0
    jobs_run: int = 0
    #: When each lease poll was sent, and each heartbeat not sent because a poll stood in for it (ADR 8).
    polls: list[float] = field(default_factory=list)
    beats_by_poll: list[float] = field(default_factory=list)
    #: How late the generator's own event loop woke up: its lateness is in every latency above.
    loop_lag: list[tuple[float, float]] = field(default_factory=list)

    def error(self, at: float, what: str, detail: str) -> None:
        self.errors.append((at, f"{what}: {detail}"))


@dataclass(frozen=True)
class Work:
    """What each simulated agent serves and how long its tasks take."""

    queue: str
    slots: int
    task_min: float
    task_max: float
    #: Let polls stand in for heartbeats when the plane says so (ADR 8); False: heartbeat every interval, as
    #: agents before it did.
    poll_heartbeats: bool = True


class SimulatedAgent:
    def __init__(self, name: str, http: httpx.AsyncClient, stats: Stats, work: Work) -> None:
        self.name = name
        self.http = http
        self.stats = stats
        self.work = work
        self.incarnation = uuid.uuid4()
        self.agent_id: uuid.UUID | None = None
        self.interval = 10.0
        self.lease_wait = 20.0
        #: As the agent keeps them (``tether.agent.agent``): the plane's stand-in window, when the poll
        #: that counts as the heartbeat was sent, and whether the last heartbeat taken was an idle one.
        self.window: float | None = None
        self.poll_sent: float | None = None
        self.idle_beat_taken = False
        #: Jobs leased and not yet reported, each holding one slot (the synthetic tasks take one).
        self.held: set[uuid.UUID] = set()
        #: Of those, the ones past the start gate: what its heartbeats name as running.
        self.running: set[uuid.UUID] = set()
        self.slot_freed = asyncio.Event()
        self.jobs: set[asyncio.Task[None]] = set()

    @property
    def free_slots(self) -> int:
        return self.work.slots - len(self.held)

    async def _post(self, path: str, body: BaseModel, timeout: float = 30.0) -> httpx.Response:
        return await self.http.post(
            path,
            content=body.model_dump_json(),
            headers={protocol.REQUEST_ID_HEADER: uuid.uuid4().hex, "Content-Type": "application/json"},
            timeout=timeout,
        )

    async def _timed(self, what: str, path: str, body: BaseModel, into: list[tuple[float, float]]) -> bytes | None:
        """One call; its time into ``into``, a failure into the errors. The answer's body if it was 200."""
        sent, started = time.time(), time.monotonic()
        try:
            response = await self._post(path, body)
        except httpx.HTTPError as exc:
            self.stats.error(sent, what, type(exc).__name__)
            return None
        into.append((sent, time.monotonic() - started))
        if response.status_code != 200:
            self.stats.error(sent, what, str(response.status_code))
            return None
        return response.content

    async def register(self, gate: asyncio.Semaphore) -> bool:
        body = protocol.RegisterRequest(
            name=self.name,
            incarnation=self.incarnation,
            tether_version=tether.__version__,
            airflow_version="bench",
            python_version="bench",
            hostname="loadgen",
            queues=[self.work.queue],
            slots=self.work.slots,
        )
        async with gate:
            sent, started = time.time(), time.monotonic()
            try:
                response = await self._post("/agents/register", body)
            except httpx.HTTPError as exc:
                self.stats.error(sent, "register", type(exc).__name__)
                return False
            self.stats.register.append(time.monotonic() - started)
        if response.status_code != 200:
            self.stats.error(sent, "register", str(response.status_code))
            return False
        answer = protocol.RegisterResponse.model_validate_json(response.content)
        self.agent_id, self.interval, self.lease_wait = answer.agent_id, answer.heartbeat_interval, answer.lease_wait
        self.window = answer.poll_heartbeat_window if self.work.poll_heartbeats else None
        return True

    def _poll_covers_heartbeat(self) -> float:
        if self.window is None or self.poll_sent is None or self.held or not self.idle_beat_taken:
            return 0.0
        return max(self.poll_sent + self.window - time.monotonic(), 0.0)

    async def lifecycle(self, gate: asyncio.Semaphore, registered: list[bool]) -> None:
        """Register, then heartbeat and long-poll until cancelled - as an agent does from its start."""
        ok = await self.register(gate)
        registered.append(ok)
        if ok:
            try:
                await asyncio.gather(self.heartbeats(), self.leases())
            finally:
                for job in list(self.jobs):
                    job.cancel()

    async def heartbeats(self) -> None:
        await asyncio.sleep(random.uniform(0, self.interval))
        while True:
            covered = self._poll_covers_heartbeat()
            if covered > 0:
                self.stats.beats_by_poll.append(time.time())
                await asyncio.sleep(min(covered, self.interval))
                continue
            started = time.monotonic()
            idle = not self.held
            body = protocol.HeartbeatRequest(
                incarnation=self.incarnation, running_jobs=sorted(self.running), free_slots=max(self.free_slots, 0)
            )
            if await self._timed("heartbeat", f"/agents/{self.agent_id}/heartbeat", body, self.stats.heartbeat):
                self.idle_beat_taken = idle
            await asyncio.sleep(max(self.interval - (time.monotonic() - started), 0.0))

    async def leases(self) -> None:
        while True:
            free = self.free_slots
            if free < 1:
                # As the agent: wait for a slot, at most one heartbeat interval, then look again.
                self.slot_freed.clear()
                try:
                    await asyncio.wait_for(self.slot_freed.wait(), self.interval)
                except TimeoutError:
                    pass
                continue
            body = protocol.LeaseRequest(
                incarnation=self.incarnation,
                free_slots=free,
                queues=[self.work.queue],
                wait=self.lease_wait if self.window is None else min(self.lease_wait, self.window),
                heartbeat=self.window is not None,
            )
            sent, asked_at = time.time(), time.monotonic()
            if self.poll_sent is not None:
                self.poll_sent = asked_at
            self.stats.polls.append(sent)
            try:
                response = await self._post(f"/agents/{self.agent_id}/lease", body, timeout=body.wait + 15)
            except httpx.HTTPError as exc:
                self.poll_sent = None
                self.stats.error(sent, "lease", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            if response.status_code != 200:
                self.poll_sent = None
                self.stats.error(sent, "lease", str(response.status_code))
                await asyncio.sleep(1.0)
                continue
            self.poll_sent = asked_at
            leases = protocol.LeaseResponse.model_validate_json(response.content).leases
            if not leases:
                continue
            self.stats.leases_granted += len(leases)
            job_ids = [lease.job_id for lease in leases]
            self.held.update(job_ids)
            # One start gate for the whole answer, in the background: the next poll goes out at once.
            task = asyncio.create_task(self.run_jobs(job_ids))
            self.jobs.add(task)
            task.add_done_callback(self.jobs.discard)

    async def run_jobs(self, job_ids: list[uuid.UUID]) -> None:
        started: set[uuid.UUID] = set()
        try:
            body = protocol.StartManyRequest(incarnation=self.incarnation, job_ids=job_ids)
            answer = await self._timed("start", f"/agents/{self.agent_id}/jobs/start", body, self.stats.start)
            if answer is not None:
                gate = protocol.StartManyResponse.model_validate_json(answer)
                started = set(gate.started)
                for refusal in gate.refused:
                    self.stats.refusals[refusal.reason] += 1
            self.running.update(started)
            await asyncio.gather(*(self.run_one(job_id) for job_id in started))
        finally:
            self.running.difference_update(job_ids)
            self.held.difference_update(job_ids)
            self.slot_freed.set()

    async def run_one(self, job_id: uuid.UUID) -> None:
        await asyncio.sleep(random.uniform(self.work.task_min, self.work.task_max))
        body = protocol.ReportRequest(incarnation=self.incarnation, state=protocol.ReportState.SUCCESS, exit_code=0)
        if await self._timed("report", f"/agents/{self.agent_id}/jobs/{job_id}/report", body, self.stats.report):
            self.stats.jobs_run += 1
        self.running.discard(job_id)
        self.held.discard(job_id)
        self.slot_freed.set()


async def watch_loop(stats: Stats) -> None:
    while True:
        started = time.monotonic()
        await asyncio.sleep(LAG_TICK)
        stats.loop_lag.append((time.time(), time.monotonic() - started - LAG_TICK))


def read_tokens(path: Path, offset: int, count: int) -> list[str]:
    """Tokens ``offset`` .. ``offset + count`` of a token file (one a line); too few is an error."""
    tokens = [line.strip() for line in path.read_text().splitlines() if line.strip()][offset : offset + count]
    if len(tokens) < count:
        raise ValueError(f"{path} holds {len(tokens)} tokens from line {offset + 1}, not the {count} asked for")
    return tokens


async def run(
    url: str,
    tokens: list[str],
    first: int,
    work: Work,
    ca_file: Path,
    ready_file: Path,
    stop_file: Path,
    *,
    ramp_limit: float,
    max_seconds: float,
) -> dict[str, object]:
    stats = Stats()
    # One verifying context for every client: the plane's own CA, nothing else.
    context = ssl.create_default_context(cafile=str(ca_file))
    clients = [
        httpx.AsyncClient(
            base_url=url + protocol.API_PREFIX,
            # Answers uncompressed, as the agent asks for those of these calls.
            headers={
                "Authorization": f"Bearer {token}",
                protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION),
                **PLAIN_ANSWER,
            },
            verify=context,
            trust_env=False,
            # As a real agent keeps them (tether.agent.client), in fewer of them.
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=3, keepalive_expiry=KEEPALIVE_EXPIRY),
        )
        for token in tokens
    ]
    sims = [SimulatedAgent(f"sim-{first + i:05d}", client, stats, work) for i, client in enumerate(clients)]
    tasks: list[asyncio.Task[None]] = []
    registered: list[bool] = []
    ramp = 0.0
    started = time.monotonic()
    try:
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
        tasks = [asyncio.create_task(s.lifecycle(gate, registered), name=s.name) for s in sims]
        tasks.append(asyncio.create_task(watch_loop(stats), name="loop-lag"))
        while len(registered) < len(sims) and time.monotonic() - started < ramp_limit:
            await asyncio.sleep(0.1)
        ramp = time.monotonic() - started
        # The generator holds every simulated agent's requests open, as the API server does: its own
        # full collections would stop it for tenths of a second and count in every latency it measures.
        settle_garbage_collector()
        # A steady state first: every heartbeat phase and every long-poll has come round once.
        await asyncio.sleep(max((max(s.interval, s.lease_wait) for s in sims), default=0.0) + 2)
        ready_file.write_text(str(time.time()))
        while not stop_file.exists() and time.monotonic() - started < max_seconds:
            await asyncio.sleep(STOP_POLL)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    return {
        "agents": len(sims),
        "registered": sum(registered),
        "ramp_seconds": ramp,
        "heartbeat_interval": sims[0].interval if sims else None,
        "lease_wait": sims[0].lease_wait if sims else None,
        "register_p99": sorted(stats.register)[int(0.99 * (len(stats.register) - 1))] if stats.register else None,
        "leases_granted": stats.leases_granted,
        "jobs_run": stats.jobs_run,
        "polls": stats.polls,
        "beats_by_poll": stats.beats_by_poll,
        "poll_heartbeat_window": sims[0].window if sims else None,
        "refusals": dict(stats.refusals),
        "heartbeat": stats.heartbeat,
        "start": stats.start,
        "report": stats.report,
        "errors": stats.errors,
        "loop_lag": stats.loop_lag,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca-file", type=Path, required=True, help="the CA that signed the plane's certificate")
    parser.add_argument("--token-file", type=Path, required=True, help="worker tokens, one a line")
    parser.add_argument("--first", type=int, default=0, help="this generator's first line of the token file")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--queue", default="bench-scale")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--task-seconds", default="0.2,1.0", help="min,max seconds a simulated task takes")
    parser.add_argument(
        "--poll-heartbeats",
        choices=("on", "off"),
        default="on",
        help="let polls stand in for an idle agent's heartbeats when the plane says so (ADR 8)",
    )
    parser.add_argument("--ramp-limit", type=float, default=180.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop by then, stop file or not")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the load generator only talks to a plane on loopback")
    if not 1 <= args.agents <= 5000 or not 0 < args.max_seconds <= 1800:
        parser.error("--agents must be 1..5000 and --max-seconds 0..1800")
    task_min, task_max = (float(x) for x in args.task_seconds.split(","))
    if not 0 <= task_min <= task_max <= 60 or not 1 <= args.slots <= 1024:
        parser.error("--task-seconds must be 0 <= min <= max <= 60 and --slots 1..1024")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tokens = read_tokens(args.token_file, args.first, args.agents)
    work = Work(
        queue=args.queue,
        slots=args.slots,
        task_min=task_min,
        task_max=task_max,
        poll_heartbeats=args.poll_heartbeats == "on",
    )
    result = uvloop.run(
        run(
            args.url,
            tokens,
            args.first,
            work,
            args.ca_file,
            args.out.with_suffix(".measuring"),
            args.out.with_suffix(".stop"),
            ramp_limit=args.ramp_limit,
            max_seconds=args.max_seconds,
        )
    )
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

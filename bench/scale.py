"""The scale test: N simulated agents, each with its own token, over TLS, while jobs flow at rising rates.

For each agent count and each ``[api] workers`` setting: a fresh database with
one worker token per simulated agent (inserted in bulk), a plane serving HTTPS
with a CA made for the run, its API server and its scheduler with Tether's
executor (whose sweeps run on the same database). Three kinds of process drive
it, each its own: the load generator(s) (``bench.loadgen``: the simulated
agents), the enqueuer (``bench.enqueue``: jobs through ``Store.enqueue`` at the
step rates) and this one, which samples the plane's CPU and the database's
transactions at every step boundary and, afterwards, reads each job's
queued/leased/finished times from the job table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text

from bench.deploy import Postgres, log, make_plane
from bench.measure import machine_cpu, tree_cpu, tree_rss
from bench.stats import percentile
from tether.embedded import ManagedProcess, Plane, spawn, write_loopback_pki
from tether.plane import tokens
from tether.plane.config import PlaneSettings
from tether.plane.models import AgentToken
from tether.protocol import JobState

QUEUE = "bench-scale"
#: The application name of the sampler's connection to the plane's database, left out of its counts.
SAMPLER_NAME = "bench-scale-sampler"
#: Seconds since the oldest heartbeat of a registered agent, as the plane's table has it.
STALEST_HEARTBEAT = "SELECT EXTRACT(EPOCH FROM now() - min(last_heartbeat)) FROM tether_agent WHERE deleted_at IS NULL"
#: Simulated agents one load generator process holds when ``--loadgen-procs`` is left to choose.
AGENTS_PER_LOADGEN = 2500
#: A step passes when queued->leased p99 is under this many seconds ...
LEASE_P99_LIMIT = 1.0
#: ... and this share of what was offered completed (and was offered: the enqueuer kept up).
COMPLETED_SHARE = 0.95


@dataclass(frozen=True)
class Plan:
    """How the work flows in one scale run."""

    rates: tuple[float, ...] = (0, 10, 25, 50, 100, 200, 400)
    step_seconds: float = 20.0
    task_min: float = 0.2
    task_max: float = 1.0
    slots: int = 4
    #: Load generator processes; 0: one per ``AGENTS_PER_LOADGEN`` agents.
    loadgen_procs: int = 0
    #: Whether simulated agents let polls stand in for heartbeats (ADR 8), each measured.
    poll_heartbeats: tuple[bool, ...] = (True,)

    def procs_for(self, agents: int) -> int:
        return self.loadgen_procs or max(1, math.ceil(agents / AGENTS_PER_LOADGEN))


def add_options(parser: argparse.ArgumentParser) -> None:
    """The scale test's options of ``python -m bench``."""
    default = Plan()
    parser.add_argument(
        "--scale", default=None, help="simulated agent counts (default 100,1000,5000); 'none' skips the scale test"
    )
    parser.add_argument("--scale-workers", default="1,2", help="[api] workers settings, each measured (default 1,2)")
    parser.add_argument(
        "--scale-rates",
        default=",".join(f"{r:g}" for r in default.rates),
        help="jobs/s of each step of the scale test, the first 0 for the idle fleet (default %(default)s)",
    )
    parser.add_argument(
        "--scale-step-seconds", type=float, default=default.step_seconds, help="seconds of each step (default 20)"
    )
    parser.add_argument(
        "--scale-task-seconds",
        default=f"{default.task_min:g},{default.task_max:g}",
        help="min,max seconds a simulated task runs (default %(default)s)",
    )
    parser.add_argument("--scale-slots", type=int, default=default.slots, help="slots of each simulated agent")
    parser.add_argument(
        "--loadgen-procs", type=int, default=0, help=f"load generator processes (default: one per {AGENTS_PER_LOADGEN})"
    )
    parser.add_argument(
        "--scale-poll-heartbeats",
        default="on",
        help="'on': simulated agents let polls stand in for idle heartbeats as tether-agent does (ADR 8); 'off': "
        "they heartbeat every interval, as agents before it; 'on,off': each measured (default on)",
    )


def plan_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[int], Plan]:
    """The ``[api] workers`` settings and the plan the options ask for; ``--quick`` shortens it."""
    try:
        workers = [int(w) for w in args.scale_workers.split(",") if w.strip()]
        rates = tuple(float(r) for r in args.scale_rates.split(",") if r.strip())
        task_min, task_max = (float(t) for t in args.scale_task_seconds.split(","))
    except ValueError:
        parser.error("--scale-workers, --scale-rates and --scale-task-seconds take comma-separated numbers")
    if not workers or any(not 1 <= w <= 8 for w in workers) or not rates or any(not 0 <= r <= 5000 for r in rates):
        parser.error("--scale-workers must be 1..8 each and --scale-rates 0..5000 jobs/s each")
    if not 0 <= task_min <= task_max <= 60 or not 1 <= args.scale_slots <= 1024 or args.loadgen_procs < 0:
        parser.error("--scale-task-seconds must be 0 <= min <= max <= 60, --scale-slots 1..1024, --loadgen-procs >= 0")
    if not 1 <= args.scale_step_seconds <= 600 or any(not 1 <= n <= 5000 for n in args.scale_counts):
        parser.error("--scale-step-seconds must be 1..600 and --scale counts 1..5000")
    settings = {"on": True, "off": False}
    polls = [p.strip() for p in args.scale_poll_heartbeats.split(",") if p.strip()]
    if not polls or any(p not in settings for p in polls):
        parser.error("--scale-poll-heartbeats takes 'on', 'off' or both, comma-separated")
    plan = Plan(
        rates,
        args.scale_step_seconds,
        task_min,
        task_max,
        args.scale_slots,
        args.loadgen_procs,
        tuple(dict.fromkeys(settings[p] for p in polls)),
    )
    if args.quick:
        workers = workers[:1]
        plan = replace(plan, rates=rates[:3], step_seconds=min(plan.step_seconds, 5.0))
    return workers, plan


def token_rows(count: int, now: dt.datetime) -> tuple[list[dict[str, Any]], list[str]]:
    """``count`` worker tokens: the rows of the token table (only the secret's hash) and the token texts.

    ``tether tokens create`` reads every live token on each call (its name and
    limit checks), so thousands are inserted in one statement instead.
    """
    rows, texts = [], []
    for index in range(count):
        issued = tokens.issue()
        texts.append(issued.text)
        rows.append(
            {
                "id": issued.id,
                "name": f"bench-scale-{index:05d}",
                "description": "scale test simulated agent",
                "secret_hash": issued.secret_hash,
                "created_at": now,
                "created_by": "bench",
                "expires_at": None,
                "last_used_at": None,
                "revoked_at": None,
                "revoked_by": None,
                "scopes": ["worker"],
                "bundles": None,
            }
        )
    return rows, texts


def insert_tokens(database_url: str, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(AgentToken.__table__), rows)  # type: ignore[arg-type]
    finally:
        engine.dispose()


def split(agents: int, procs: int) -> list[tuple[int, int]]:
    """(first token line, agents) of each load generator: as even as it goes, none empty."""
    procs = max(1, min(procs, agents))
    base, extra = divmod(agents, procs)
    out, first = [], 0
    for index in range(procs):
        count = base + (1 if index < extra else 0)
        out.append((first, count))
        first += count
    return out


# -- aggregation (pure) -------------------------------------------------------------------------


def _in(events: Sequence[Sequence[Any]], start: float, end: float) -> list[Any]:
    return [e for e in events if start <= e[0] < end]


def _p(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def step_passes(step: dict[str, Any]) -> bool:
    """Dispatch kept up: queued->leased p99 under a second, ≥ 95 % completed, and the rate was really offered."""
    rate, offered, seconds = step["rate"], step["offered"], step["seconds"]
    p99 = step["queued_to_leased_p99"]
    return bool(
        rate > 0
        and offered >= COMPLETED_SHARE * rate * seconds
        and p99 is not None
        and p99 < LEASE_P99_LIMIT
        and step["completed"] >= COMPLETED_SHARE * offered
    )


def dispatch_ceiling(steps: Sequence[dict[str, Any]]) -> float | None:
    """The highest step rate that passed (``step_passes``); None if none did."""
    return max((s["rate"] for s in steps if step_passes(s)), default=None)


def aggregate_step(
    step: dict[str, Any],
    jobs: Sequence[tuple[float, float | None, float | None, str]],
    events: dict[str, Any],
    samples: tuple[dict[str, float], dict[str, float]],
    completion_shift: float,
) -> dict[str, Any]:
    """One step's figures.

    ``step``: the enqueuer's record (rate, start, end, jobs...). ``jobs``: every job's
    (queued_at, leased_at, finished_at, state) as Unix times. ``events``: the load
    generators' merged events. ``samples``: the plane's counters at the step's start and end.
    Jobs count for the step they were queued in; completions for the step they finished in,
    the window shifted by the mean task time so that a steady rate counts whole.
    """
    start, end = step["start"], step["end"]
    seconds = end - start
    mine = [j for j in jobs if start <= j[0] < end]
    waits = [(j[1] - j[0]) if j[1] is not None else math.inf for j in mine]
    unleased = sum(1 for j in mine if j[1] is None)
    completed = sum(
        1
        for j in jobs
        if j[3] == JobState.SUCCESS.value
        and j[2] is not None
        and start + completion_shift <= j[2] < end + completion_shift
    )
    beats = [latency for _, latency in _in(events["heartbeat"], start, end)]
    errors = Counter(kind for _, kind in _in(events["errors"], start, end))
    before, after = samples
    api_cpu = after["api_cpu"] - before["api_cpu"]
    xacts = after["xacts"] - before["xacts"]
    p50, p99 = _p(waits, 0.50), _p(waits, 0.99)
    out = {
        "rate": step["rate"],
        "start": start,
        "end": end,
        "seconds": seconds,
        "offered": len(mine),
        "offered_per_second": len(mine) / seconds,
        "enqueue_backlog_max": step.get("backlog_max", 0),
        "completed": completed,
        "completed_per_second": completed / seconds,
        "unleased": unleased,
        "queued_to_leased_p50": None if p50 is None or math.isinf(p50) else p50,
        "queued_to_leased_p99": None if p99 is None or math.isinf(p99) else p99,
        "heartbeats": len(beats),
        "heartbeat_p50": _p(beats, 0.50),
        "heartbeat_p99": _p(beats, 0.99),
        "heartbeat_max": max(beats, default=None),
        "handler_heartbeat_p99": _p([d for _, d in _in(events.get("handled", []), start, end)], 0.99),
        "start_p99": _p([d for _, d in _in(events["start"], start, end)], 0.99),
        "report_p99": _p([d for _, d in _in(events["report"], start, end)], 0.99),
        "errors": dict(errors),
        "api_cpu_seconds": api_cpu,
        "api_cpu_cores": api_cpu / seconds,
        "api_cpu_per_job": api_cpu / completed if completed else None,
        "scheduler_cpu_cores": (after["scheduler_cpu"] - before["scheduler_cpu"]) / seconds,
        "loadgen_cpu_cores": (after["loadgen_cpu"] - before["loadgen_cpu"]) / seconds,
        "machine_cpu_cores": _finite(
            (after.get("machine_cpu", math.nan) - before.get("machine_cpu", math.nan)) / seconds
        ),
        "db_xacts": xacts,
        "db_xacts_per_second": xacts / seconds,
        "db_xacts_per_job": xacts / completed if completed else None,
        "loadgen_loop_lag_p99": _p([lag for _, lag in _in(events["loop_lag"], start, end)], 0.99),
    }
    out["passed"] = step_passes(out)
    return out


def merge_loadgens(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The load generators' results as one: events pooled, counts added."""
    merged: dict[str, Any] = {key: [] for key in ("heartbeat", "start", "report", "errors", "loop_lag")}
    refusals: Counter[str] = Counter()
    for part in parts:
        for key in merged:
            merged[key].extend(part[key])
        refusals.update(part.get("refusals", {}))
    merged.update(
        agents=sum(p["agents"] for p in parts),
        registered=sum(p["registered"] for p in parts),
        ramp_seconds=max((p["ramp_seconds"] for p in parts), default=0.0),
        leases_granted=sum(p["leases_granted"] for p in parts),
        jobs_run=sum(p["jobs_run"] for p in parts),
        polls=[at for p in parts for at in p.get("polls", [])],
        beats_by_poll=[at for p in parts for at in p.get("beats_by_poll", [])],
        poll_heartbeat_window=parts[0].get("poll_heartbeat_window") if parts else None,
        refusals=dict(refusals),
        heartbeat_interval=parts[0].get("heartbeat_interval") if parts else None,
        lease_wait=parts[0].get("lease_wait") if parts else None,
    )
    return merged


# -- one run ------------------------------------------------------------------------------------


def write_tokens(texts: list[str], path: Path) -> None:
    path.write_text("\n".join(texts) + "\n")
    path.chmod(0o600)


class Sampler:
    """The plane's counters, read on demand: CPU of the API server, scheduler and generators; DB transactions."""

    def __init__(self, pg: Postgres, database: str, plane: Plane, loadgens: list[ManagedProcess]) -> None:
        self.engine = create_engine(pg.admin_url, isolation_level="AUTOCOMMIT", pool_size=1)
        # The plane's own tables, on a connection the connection count leaves out.
        self.plane_db = create_engine(
            pg.url(database),
            isolation_level="AUTOCOMMIT",
            pool_size=1,
            connect_args={"application_name": SAMPLER_NAME},
        )
        self.database = database
        self.plane = plane
        self.loadgens = loadgens
        self.rss_peak = 0.0
        self.connections_peak = 0
        #: The plane's view of the fleet's liveness: the oldest heartbeat of a registered agent, at its oldest.
        self.stalest_heartbeat = 0.0

    def _scalar(self, sql: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql), {"d": self.database}).scalar() or 0)

    def counters(self) -> dict[str, float]:
        return {
            "at": time.time(),
            "api_cpu": tree_cpu([self.plane.processes["api-server"].pid]),
            "scheduler_cpu": tree_cpu([self.plane.processes["scheduler"].pid]),
            "loadgen_cpu": tree_cpu([g.pid for g in self.loadgens]),
            "xacts": self._scalar("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
            # The whole machine, whatever runs on it: the plane, PostgreSQL, the generators and anything else.
            "machine_cpu": machine_cpu() or math.nan,
        }

    def peaks(self) -> None:
        self.rss_peak = max(self.rss_peak, tree_rss([self.plane.processes["api-server"].pid]))
        self.connections_peak = max(
            self.connections_peak,
            self._scalar(
                f"SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND application_name <> '{SAMPLER_NAME}'"
            ),
        )
        with self.plane_db.connect() as conn:
            age = conn.execute(text(STALEST_HEARTBEAT)).scalar()
        self.stalest_heartbeat = max(self.stalest_heartbeat, float(age or 0.0))

    def close(self) -> None:
        self.engine.dispose()
        self.plane_db.dispose()


def _check_alive(processes: Sequence[ManagedProcess]) -> None:
    for proc in processes:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during the scale run:\n{proc.tail()}")


def one_scale(
    pg: Postgres, template: str, work: Path, agents: int, workers: int, plan: Plan, *, poll_heartbeats: bool = True
) -> dict[str, Any]:
    tag = f"{agents}_w{workers}" + ("" if poll_heartbeats else "_beats")
    name = pg.create(f"bench_scale_{tag}", template=template)
    home = work / f"scale-{tag}"
    plane = make_plane("tether", home, pg.url(name))
    plane.tls = write_loopback_pki(home / "pki")
    plane.extra_env.update(
        {"AIRFLOW__API__WORKERS": str(workers), "AIRFLOW__TETHER__MAX_AGENT_TOKENS": str(agents + 10)}
    )
    sampler: Sampler | None = None
    try:
        home.mkdir(parents=True, exist_ok=True)
        rows, texts = token_rows(agents, dt.datetime.now(dt.UTC))
        insert_tokens(pg.url(name), rows)
        token_file = home / "tokens"
        write_tokens(texts, token_file)
        plane.start(("api-server", "scheduler"))
        env = {**plane.env, "PYTHONPATH": str(Path(__file__).parent.parent)}
        loadgens, outs = [], []
        for index, (first, count) in enumerate(split(agents, plan.procs_for(agents))):
            out = home / f"loadgen-{index}.json"
            argv = [sys.executable, "-m", "bench.loadgen", "--url", plane.url, "--ca-file", str(plane.tls[2])]
            argv += ["--token-file", str(token_file), "--first", str(first), "--agents", str(count)]
            argv += ["--queue", QUEUE, "--slots", str(plan.slots), "--task-seconds", f"{plan.task_min},{plan.task_max}"]
            argv += ["--poll-heartbeats", "on" if poll_heartbeats else "off", "--out", str(out)]
            gen = spawn(f"loadgen-{index}", argv, env, home / "logs")
            plane.processes[gen.name] = gen
            loadgens.append(gen)
            outs.append(out)
        limit = time.monotonic() + 300
        while not all(o.with_suffix(".measuring").exists() for o in outs):
            _check_alive(loadgens)
            if time.monotonic() > limit:
                raise RuntimeError("the load generators did not start measuring within 300 s")
            time.sleep(0.5)
        sampler = Sampler(pg, name, plane, loadgens)
        start_at = time.time() + 2.0
        steps_out = home / "steps.json"
        argv = [sys.executable, "-m", "bench.enqueue", "--db-url", pg.url(name), "--queue", QUEUE]
        argv += ["--rates", ",".join(f"{r:g}" for r in plan.rates), "--step-seconds", str(plan.step_seconds)]
        argv += ["--start-at", str(start_at), "--out", str(steps_out)]
        enqueuer = spawn("enqueue", argv, env, home / "logs")
        plane.processes["enqueue"] = enqueuer
        watched = [*loadgens, plane.processes["api-server"], plane.processes["scheduler"]]
        boundaries = [start_at + k * plan.step_seconds for k in range(len(plan.rates) + 1)]
        samples = []
        for boundary in boundaries:
            while boundary - time.time() > 0:
                _check_alive(watched)
                sampler.peaks()
                time.sleep(min(1.0, max(boundary - time.time(), 0.0)))
            samples.append(sampler.counters())
            log(f"scale: {agents} agents, {workers} worker(s): step boundary {len(samples)}/{len(boundaries)}")
        enqueuer.popen.wait(timeout=60)
        # The last step's jobs finish before the generators stop.
        time.sleep(plan.task_max + 2)
        for out in outs:
            out.with_suffix(".stop").write_text("stop")
        parts = []
        for gen, out in zip(loadgens, outs, strict=True):
            gen.popen.wait(timeout=120)
            if not out.exists():
                raise RuntimeError(f"{gen.name} wrote no result:\n{gen.tail()}")
            parts.append(json.loads(out.read_text()))
        events = merge_loadgens(parts)
        events["handled"] = api_server_times(plane.processes["api-server"].log_path)
        jobs = [
            (queued.timestamp(), leased and leased.timestamp(), finished and finished.timestamp(), state)
            for queued, leased, finished, state in plane.query(
                "SELECT queued_at, leased_at, finished_at, state FROM tether_job WHERE queue = :q", q=QUEUE
            )
        ]
        enqueued = json.loads(steps_out.read_text())
        shift = (plan.task_min + plan.task_max) / 2
        steps = [
            aggregate_step(step, jobs, events, (samples[k], samples[k + 1]), shift) for k, step in enumerate(enqueued)
        ]
        beats = [latency for at, latency in events["heartbeat"] if boundaries[0] <= at < boundaries[-1]]
        errors = Counter(kind for at, kind in events["errors"] if boundaries[0] <= at < boundaries[-1])
        return {
            "agents": agents,
            "workers": workers,
            "poll_heartbeats": poll_heartbeats,
            "loadgen_procs": len(loadgens),
            "registered": events["registered"],
            "ramp_seconds": events["ramp_seconds"],
            "heartbeat_interval": events["heartbeat_interval"],
            "lease_wait": events["lease_wait"],
            "tls": True,
            "cpus": os.cpu_count(),
            "tokens": agents,
            "plan": asdict(plan),
            "steps": steps,
            "ceiling": dispatch_ceiling(steps),
            "heartbeats": len(beats),
            "heartbeat_p50": _p(beats, 0.50),
            "heartbeat_p99": _p(beats, 0.99),
            "heartbeat_max": max(beats, default=None),
            "errors": dict(errors),
            "refusals": events["refusals"],
            "leases_granted": events["leases_granted"],
            "jobs_run": events["jobs_run"],
            "jobs_queued": len(jobs),
            "loadgen_loop_lag_p99": _p([lag for at, lag in events["loop_lag"] if at >= boundaries[0]], 0.99),
            "api_rss_peak": sampler.rss_peak,
            "db_connections_peak": sampler.connections_peak,
            "stalest_heartbeat": sampler.stalest_heartbeat,
            # The plane runs with Tether's defaults: past this, an agent counts as silent.
            "health_timeout": PlaneSettings().health_timeout.total_seconds(),
            "polls": sum(1 for at in events["polls"] if boundaries[0] <= at < boundaries[-1]),
            "beats_by_poll": sum(1 for at in events["beats_by_poll"] if boundaries[0] <= at < boundaries[-1]),
            "poll_heartbeat_window": events["poll_heartbeat_window"],
        }
    finally:
        if sampler is not None:
            sampler.close()
        plane.stop()
        pg.drop(name)


_ACCESS = re.compile(r"^(\S+) .*\[http\.access\]")
_HEARTBEAT_PATH = re.compile(r" path=/tether/v1/agents/\S+/heartbeat ")
_DURATION = re.compile(r" duration_us=(\d+)")


def api_server_times(log_path: Path) -> list[tuple[float, float]]:
    """Heartbeats as the API server's access log has them: (Unix time, seconds in the API server) each.

    Set against the client's figures they show where time goes: in the API server
    (Airflow's middleware and Tether's handler), or before it (the connection, the
    event loop's queue).
    """
    times = []
    with log_path.open(errors="replace") as lines:
        for line in lines:
            match = _ACCESS.match(line)
            if match is None or _HEARTBEAT_PATH.search(line) is None:
                continue
            duration = _DURATION.search(line)
            if duration is None:
                continue
            try:
                at = dt.datetime.fromisoformat(match.group(1).replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            times.append((at, int(duration.group(1)) / 1e6))
    return times


def scale_test(
    pg: Postgres, template: str, work: Path, counts: list[int], workers: list[int], plan: Plan
) -> list[dict[str, Any]]:
    results = []
    for agents in counts:
        for api_workers, polls in itertools.product(workers, plan.poll_heartbeats):
            log(
                f"scale: {agents} simulated agents, [api] workers {api_workers}, polls stand in for heartbeats: "
                f"{'yes' if polls else 'no'}, steps {', '.join(f'{r:g}' for r in plan.rates)} jobs/s x "
                f"{plan.step_seconds:.0f}s"
            )
            result = one_scale(pg, template, work, agents, api_workers, plan, poll_heartbeats=polls)
            for s in result["steps"]:
                log(
                    f"  {s['rate']:g} jobs/s: completed {s['completed_per_second']:.1f}/s, queued->leased p99 "
                    f"{_ms(s['queued_to_leased_p99'])}, heartbeat p99 {_ms(s['heartbeat_p99'])}, errors "
                    f"{sum(s['errors'].values())}, API CPU {s['api_cpu_cores']:.2f} cores, loadgen lag p99 "
                    f"{_ms(s['loadgen_loop_lag_p99'])}{' (passed)' if s['passed'] else ''}"
                )
            log(f"scale: {agents} agents, {api_workers} worker(s): dispatch ceiling {result['ceiling']} jobs/s")
            results.append(result)
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"

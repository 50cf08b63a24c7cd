"""Task logs: how soon a line a task writes can be read in Airflow's log API, and what shipping costs the plane.

One Tether plane (API server, scheduler, DAG processor) and one agent, on a fresh
database copied from the migrated template, per mode:

* ``ship`` (the default): the agent sends each try's lines to the plane as they
  are written, and Airflow's log API reads them from the plane;
* ``local``: the agent keeps the lines in its own folder and ships nothing (the
  plane's log view then says where they are).

Costs: the API server's CPU seconds and the database's committed transactions
while ``log_flood`` writes its lines, shipped against kept, per 1,000 lines.
Delay: while ``log_ticks`` writes a line every 0.1 s with its time in it, the log
API is read every 0.25 s; a line's delay is when it was first read minus when it
was written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from bench.deploy import Postgres, make_plane
from bench.measure import tree_cpu
from bench.stats import percentile
from tether.embedded import Plane, start_agent, wait_until

Mode = Literal["ship", "local"]
MODES: tuple[Mode, ...] = ("ship", "local")
DAGS = Path(__file__).parent / "dags_logs"


@dataclass(frozen=True)
class LogWorkload:
    lines: int = 20_000
    ticks: int = 100


@dataclass
class LogRun:
    mode: str
    run: int
    lines: int
    #: From trigger to the flood's run ending, in seconds.
    flood_seconds: float
    #: The API server process tree's CPU seconds, and the database's committed transactions, over the flood.
    api_cpu_seconds: float
    db_xacts: int
    #: Ship only: seconds from each tick written to it first read in the log API.
    delays: list[float] = field(default_factory=list)
    #: Ship only: lines the log API returned for the flood's try, once finished.
    read_back: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _events(api: httpx.Client, dag_id: str, run_id: str, task_id: str) -> list[str]:
    answer = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1")
    answer.raise_for_status()
    return [str(item.get("event", "")) for item in answer.json()["content"]]


def _delays(plane: Plane, ticks: int) -> list[float]:
    run_id = plane.trigger("log_ticks")
    first_read: dict[str, float] = {}
    delays: list[float] = []
    deadline = time.monotonic() + ticks * 0.1 + 120
    # Logged in once: a log-in per read would be counted into every line's delay.
    with plane.rest_client(timeout=60) as api:
        while time.monotonic() < deadline and len(first_read) < ticks:
            for event in _events(api, "log_ticks", run_id, "tick"):
                if event.startswith("tick ") and event not in first_read:
                    first_read[event] = time.time()
                    delays.append(first_read[event] - float(event.rsplit(" ", 1)[1]))
            time.sleep(0.25)
    if len(first_read) < ticks:
        raise TimeoutError(f"only {len(first_read)} of {ticks} ticks were read back")
    return delays


def measure_logs(mode: Mode, pg: Postgres, template: str, work: Path, run: int, workload: LogWorkload) -> LogRun:
    name = pg.create(f"bench_logs_{mode}_r{run}", template=template)
    plane = make_plane("tether", work / f"logs-{mode}-run{run}", pg.url(name), dags_folder=DAGS)
    plane.extra_env.update(
        {
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            # Room for the whole flood: the cap is not what is measured.
            "AIRFLOW__TETHER__TASK_LOG_MAX_BYTES": str(64 * 1024 * 1024),
        }
    )
    try:
        plane.home.mkdir(parents=True, exist_ok=True)
        token = plane.create_token("bench-logs")
        plane.start()
        agent = start_agent(
            plane,
            "bench-logs",
            token,
            queues="default",
            slots="4",
            task_logs=mode,
            env={"BENCH_LOG_LINES": str(workload.lines), "BENCH_LOG_TICKS": str(workload.ticks)},
        )
        wait_until(lambda: agent.health("/readyz") == 200, 120, "the agent ready")
        for dag_id in ("log_flood", "log_ticks"):
            plane.wait_for_dag(dag_id)
        api_server = [plane.processes["api-server"].pid]
        cpu, xacts, began = tree_cpu(api_server), pg.xact_commit(name), time.monotonic()
        run_id = plane.trigger("log_flood")
        state = plane.wait_for_run("log_flood", run_id, timeout=600)
        if state != "success":
            raise RuntimeError(f"log_flood ended {state}")
        result = LogRun(
            mode=mode,
            run=run,
            lines=workload.lines,
            flood_seconds=time.monotonic() - began,
            api_cpu_seconds=tree_cpu(api_server) - cpu,
            db_xacts=pg.xact_commit(name) - xacts,
        )
        if mode == "ship":
            with plane.rest_client(timeout=60) as api:
                events = _events(api, "log_flood", run_id, "write")
            result.read_back = sum(1 for event in events if event.startswith("line "))
            result.delays = _delays(plane, workload.ticks)
        return result
    finally:
        plane.stop()
        pg.drop(name)


def summary(result: LogRun) -> str:
    text = (
        f"{result.mode}: {result.lines} lines in {result.flood_seconds:.1f} s, "
        f"API server {result.api_cpu_seconds:.2f} CPU s, {result.db_xacts} transactions"
    )
    if result.delays:
        text += (
            f"; read back {result.read_back}; live delay p50 {percentile(result.delays, 0.5):.2f} s "
            f"p95 {percentile(result.delays, 0.95):.2f} s"
        )
    return text


def log_section(runs: list[dict[str, Any]] | None) -> list[str]:
    """The task-log section of the report."""
    if not runs:
        return []
    ship = [r for r in runs if r["mode"] == "ship"]
    local = [r for r in runs if r["mode"] == "local"]
    lines = ["## Task logs: shipped to the plane, against kept on the agent", ""]
    lines.append("| | lines | API server CPU (s) | DB transactions | live delay p50 / p95 (s) | read back |")
    lines.append("|---|---|---|---|---|---|")
    for mode, mine in (("shipped (`--task-logs ship`)", ship), ("kept on the agent (`--task-logs local`)", local)):
        for r in mine:
            delay = f"{percentile(r['delays'], 0.5):.2f} / {percentile(r['delays'], 0.95):.2f}" if r["delays"] else "-"
            lines.append(
                f"| {mode}, run {r['run']} | {r['lines']} | {r['api_cpu_seconds']:.2f} | {r['db_xacts']} "
                f"| {delay} | {r['read_back'] if r['read_back'] is not None else '-'} |"
            )
    if ship and local:
        per = 1000 / ship[0]["lines"]
        cpu = (
            sum(r["api_cpu_seconds"] for r in ship) / len(ship) - sum(r["api_cpu_seconds"] for r in local) / len(local)
        ) * per
        xacts = (sum(r["db_xacts"] for r in ship) / len(ship) - sum(r["db_xacts"] for r in local) / len(local)) * per
        lines += [
            "",
            f"Shipping costs the plane {cpu * 1000:.0f} ms of API server CPU and {xacts:.1f} database "
            "transactions per 1,000 lines (the mean of the shipped runs less the mean of the kept ones).",
        ]
    lines += [
        "",
        "The flood is one task printing its lines as fast as it can; the live delay is read from `log_ticks`, a task "
        "that prints a line with its own time every 0.1 s while the log API is read every 0.25 s.",
        "",
    ]
    return lines

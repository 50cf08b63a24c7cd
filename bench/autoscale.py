"""Autoscaling on a real plane: what the demand endpoint costs, and a scaling run.

``python -m bench.autoscale cost``: 200 tasks queued on a plane (API server,
scheduler, DAG processor on PostgreSQL) with no agent; then 15 s without demand
calls and 15 s with 1,000 of them, evenly spread, as a fleet of 1,000 scalers
polling every 15 s would make. Prints the time per call and, for each window,
the database's transactions and the scans of the jobs table, and the API
server's CPU.

``python -m bench.autoscale scaling``: the same 200 tasks (3 s each) drained by
agents of 4 slots that a scaler loop starts and stops as the endpoint's
``replicas`` says (every ``--interval`` seconds, at most ``--max-replicas``;
stopped agents leave by SIGTERM, the drain path). Prints the figures over time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import httpx

from bench.deploy import Postgres, log
from bench.measure import tree_cpu
from bench.stats import percentile
from tether.embedded import AgentProcess, Plane, start_agent, wait_until

DAGS = Path(__file__).parent / "dags_autoscale"
DAG_ID = "autoscale_200"
ADMIN_URL = os.environ.get("TETHER_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
SLOTS = 4
ROUNDS = 2


def demand(plane: Plane, token: str) -> dict[str, Any]:
    """The demand of queue ``scale``, asked again (as a scaler would at its next look) while the API is busy."""
    for _ in range(10):
        try:
            answer = httpx.get(
                f"{plane.url}/tether/v1/demand",
                params={"queues": "scale", "slots_per_replica": SLOTS},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            answer.raise_for_status()
            return answer.json()  # type: ignore[no-any-return]
        except httpx.HTTPError as exc:
            log(f"no demand answer ({exc!r}); asking again")
    raise RuntimeError("the demand endpoint did not answer ten times in a row")


def job_table_scans(plane: Plane) -> int:
    rows = plane.query(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'tether_job'"
    )
    return int(rows[0][0]) if rows else 0


async def poll(plane: Plane, token: str, calls: int, window: float) -> list[float]:
    """``calls`` demand calls started evenly over ``window`` seconds; the seconds each took."""
    took: list[float] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=plane.url, limits=limits, timeout=30) as client:

        async def one() -> None:
            started = time.monotonic()
            answer = await client.get(
                "/tether/v1/demand",
                params={"queues": "scale", "slots_per_replica": SLOTS},
                headers={"Authorization": f"Bearer {token}"},
            )
            answer.raise_for_status()
            took.append(time.monotonic() - started)

        begin = time.monotonic()
        tasks = []
        for i in range(calls):
            await asyncio.sleep(max(0.0, begin + i * window / calls - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return took


def measure_window(pg: Postgres, name: str, plane: Plane, seconds: float, calls: int, token: str) -> dict[str, Any]:
    api = [plane.processes["api-server"].pid]
    x0, s0, c0 = pg.xact_commit(name), job_table_scans(plane), tree_cpu(api)
    started = time.monotonic()
    took = asyncio.run(poll(plane, token, calls, seconds)) if calls else []
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    return {
        "calls": calls,
        "seconds": elapsed,
        "transactions": pg.xact_commit(name) - x0,
        "job_table_scans": job_table_scans(plane) - s0,
        "api_cpu_seconds": tree_cpu(api) - c0,
        "p50_ms": (percentile(took, 0.50) or 0) * 1000,
        "p95_ms": (percentile(took, 0.95) or 0) * 1000,
        "p99_ms": (percentile(took, 0.99) or 0) * 1000,
        "max_ms": max(took, default=0) * 1000,
    }


def cost(pg: Postgres, name: str, plane: Plane, token: str) -> None:
    run_id = plane.trigger(DAG_ID)
    wait_until(lambda: demand(plane, token)["queued"] == 200, 300, "200 jobs queued")
    log(f"run {run_id}: 200 jobs queued, no agent")
    # Windows without and with calls, alternated, so the scheduler's own work shows in both alike.
    windows = []
    for _ in range(ROUNDS):
        windows.append(("no calls", measure_window(pg, name, plane, 15, 0, token)))
        windows.append(("1,000 calls", measure_window(pg, name, plane, 15, 1000, token)))
    print("\nwindow      calls  transactions  tether_job scans  API CPU s  p50 ms  p95 ms  p99 ms  max ms")
    for label, w in windows:
        print(
            f"{label:<11} {w['calls']:>5}  {w['transactions']:>12}  {w['job_table_scans']:>16}  "
            f"{w['api_cpu_seconds']:>9.2f}  {w['p50_ms']:>6.1f}  {w['p95_ms']:>6.1f}  {w['p99_ms']:>6.1f}  "
            f"{w['max_ms']:>6.1f}"
        )

    def extra(key: str) -> float:
        polled = [w[key] for label, w in windows if w["calls"]]
        quiet = [w[key] for label, w in windows if not w["calls"]]
        return float(sum(polled) - sum(quiet)) / len(polled)

    print(
        f"\nper 1,000 calls (polled window minus quiet window, mean of {ROUNDS}): "
        f"{extra('transactions'):.0f} transactions, {extra('job_table_scans'):.0f} jobs-table index scans "
        f"(PostgreSQL counts one per state the reading asks for: 3 a reading), "
        f"{extra('api_cpu_seconds'):.2f} s of API server CPU"
    )


def scaling(plane: Plane, token: str, interval: float, max_replicas: int) -> None:
    run_id = plane.trigger(DAG_ID)
    agents: list[AgentProcess] = []
    stopping: list[AgentProcess] = []
    begin = time.monotonic()
    serial = 0
    print("\n   t s  queued  running  slots  replicas  agents (up, draining)")
    while True:
        d = demand(plane, token)
        wanted = min(d["replicas"], max_replicas)
        while len(agents) < wanted:
            serial += 1
            agents.append(start_agent(plane, f"scale-{serial}", token, queues="scale", slots=str(SLOTS)))
        while len(agents) > wanted:
            leaving = agents.pop()
            leaving.process.signal(signal.SIGTERM)  # the drain path: running tasks finish
            stopping.append(leaving)
        stopping = [a for a in stopping if a.process.alive()]
        print(
            f"{time.monotonic() - begin:>6.0f}  {d['queued']:>6}  {d['running']:>7}  {d['slots']:>5}  "
            f"{d['replicas']:>8}  {len(agents):>2} up, {len(stopping)} draining",
            flush=True,
        )
        state = plane.query("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)
        if state and state[0][0] in ("success", "failed") and d["slots"] == 0 and not agents and not stopping:
            break
        time.sleep(interval)
    states = plane.query(
        "SELECT state, count(*) FROM task_instance WHERE dag_id = :d AND run_id = :r GROUP BY state",
        d=DAG_ID,
        r=run_id,
    )
    print(f"\nrun {state[0][0]} in {time.monotonic() - begin:.0f}s; tasks: {dict((s, n) for s, n in states)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscale")
    parser.add_argument("what", choices=("cost", "scaling"))
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between the scaler's looks")
    parser.add_argument("--max-replicas", type=int, default=5)
    args = parser.parse_args(argv)
    # Stopped with SIGTERM, still stop the plane and drop the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pg = Postgres(ADMIN_URL)
    name = pg.create("bench_autoscale")
    plane = Plane(
        home=Path(mkdtemp(prefix="tether-autoscale-")) / "plane",
        dags_folder=DAGS,
        sql_alchemy_conn=pg.url(name),
        extra_env={"AIRFLOW__CORE__PARALLELISM": "256", "AIRFLOW__CORE__DEFAULT_POOL_TASK_SLOT_COUNT": "256"},
    )
    try:
        plane.migrate()
        plane.start()
        token = plane.create_token("autoscale")
        plane.wait_for_dag(DAG_ID)
        if args.what == "cost":
            cost(pg, name, plane, token)
        else:
            scaling(plane, token, args.interval, args.max_replicas)
    finally:
        plane.stop()
        pg.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

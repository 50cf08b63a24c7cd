"""Queues synthetic tasks into a plane at a rising rate, through Tether's own ``Store.enqueue``.

The scale test's source of work: a process of its own (neither the API server
nor the load generator), writing each job exactly as the executor does - the row
and the PostgreSQL notification that wakes waiting lease requests - in
transactions of the jobs due at each tick, as a busy scheduler loop commits
what it queued. The workloads are shaped like Airflow's ``ExecuteTask``.

Steps: ``--rates`` jobs/s, each for ``--step-seconds``, the first from
``--start-at`` (a Unix time) on; jobs are due evenly within a step. It writes
what it queued per step as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from tether.plane.config import PlaneSettings
from tether.plane.store import Store

#: Seconds between two transactions of due jobs.
TICK = 0.02
DAG_ID = "bench_scale"


class SyntheticTI(BaseModel):
    """The task-instance fields of an ``ExecuteTask`` that the store reads."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    dag_id: str = DAG_ID
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1
    queue: str
    pool_slots: int = 1
    priority_weight: int = 1


class SyntheticTask(BaseModel):
    """A workload shaped like Airflow's ``ExecuteTask``: what an agent would be given to run."""

    type: str = "ExecuteTask"
    ti: SyntheticTI
    dag_rel_path: str = "bench_scale.py"
    bundle_info: dict[str, str | None] = Field(default_factory=lambda: {"name": "dags-folder", "version": None})
    log_path: str | None = None
    token: str = "not-a-real-token"


def workload(queue: str, step: int, index: int) -> SyntheticTask:
    run_id = f"scale_step_{step:02d}"
    ti = SyntheticTI(task_id=f"t{index:06d}", run_id=run_id, queue=queue)
    return SyntheticTask(ti=ti, log_path=f"dag_id={DAG_ID}/run_id={run_id}/task_id={ti.task_id}/attempt=1.log")


@dataclass
class Step:
    rate: float
    start: float
    end: float
    jobs: int = 0
    transactions: int = 0
    #: The most jobs that were due and not yet queued at one tick: how far the enqueuer fell behind.
    backlog_max: int = 0


def due(rate: float, elapsed: float, seconds: float) -> int:
    """Jobs due ``elapsed`` seconds into a step of ``rate`` jobs/s lasting ``seconds``."""
    return int(rate * min(max(elapsed, 0.0), seconds))


def run(
    store: Store, sessions: Callable[[], Session], queue: str, rates: list[float], start_at: float, seconds: float
) -> list[Step]:
    steps = [Step(rate=r, start=start_at + k * seconds, end=start_at + (k + 1) * seconds) for k, r in enumerate(rates)]
    for number, step in enumerate(steps):
        while (now := time.time()) < step.end:
            backlog = due(step.rate, now - step.start, seconds) - step.jobs
            if backlog > 0:
                step.backlog_max = max(step.backlog_max, backlog)
                with sessions() as session, session.begin():
                    at = datetime.now(UTC)
                    for index in range(step.jobs, step.jobs + backlog):
                        store.enqueue(session, workload(queue, number, index), now=at)
                step.jobs += backlog
                step.transactions += 1
            time.sleep(max(min(TICK, step.end - time.time()), 0.0))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue", description=__doc__)
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--queue", default="bench-scale")
    parser.add_argument("--rates", required=True, help="jobs/s of each step, comma-separated")
    parser.add_argument("--step-seconds", type=float, required=True)
    parser.add_argument("--start-at", type=float, required=True, help="Unix time the first step begins")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates or any(not 0 <= r <= 5000 for r in rates) or not 0 < args.step_seconds <= 600:
        parser.error("--rates must be 0..5000 jobs/s each and --step-seconds 0..600")
    if abs(args.start_at - time.time()) > 600:
        parser.error("--start-at must be within ten minutes of now")
    engine = create_engine(args.db_url, pool_size=1, max_overflow=0)
    try:
        sessions = sessionmaker(bind=engine, expire_on_commit=False)
        store = Store(sessions, settings=PlaneSettings())
        steps = run(store, sessions, args.queue, rates, args.start_at, args.step_seconds)
    finally:
        engine.dispose()
    args.out.write_text(json.dumps([asdict(s) for s in steps], indent=1))


if __name__ == "__main__":
    main()

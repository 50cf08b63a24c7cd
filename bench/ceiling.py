"""The scheduler's own ceiling: how many tasks a second one plane completes with the LocalExecutor.

A fan-out of 1,000 no-op tasks on the same plane and settings as the executor rows.
Set against the scale test's dispatch ceiling, it says how far the agent API is
from being what limits a deployment on this machine.
"""

from __future__ import annotations

import secrets
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.deploy import BENCH, PARALLELISM, Postgres, log, make_plane
from bench.measure import machine_cpu, own_cpu

DAGS = BENCH / "dags_ceiling"
DAG_ID = "fanout_1000"


@dataclass
class Ceiling:
    tasks: int
    state: str
    #: DAG run queued -> end, and first task start -> last task end.
    wall: float
    span: float
    parallelism: int
    queued_to_start_p50: float
    machine_cpu: float | None
    scheduler_cpu: float

    @property
    def tasks_per_second(self) -> float:
        return self.tasks / self.span if self.span > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tasks_per_second": self.tasks_per_second}


def scheduler_ceiling(pg: Postgres, template: str, work: Path, *, timeout: float) -> Ceiling:
    """Run fanout_1000 once on a LocalExecutor plane copied from ``template`` (a migrated database)."""
    name = pg.create("bench_ceiling", template=template)
    plane = make_plane("local", work / "ceiling", pg.url(name), dags_folder=DAGS)
    try:
        plane.home.mkdir(parents=True, exist_ok=True)
        plane.start(ready_path="/api/v2/monitor/health")
        plane.wait_for_dag(DAG_ID)
        run_id = f"ceiling_{secrets.token_hex(4)}"
        scheduler = plane.processes["scheduler"].pid
        plane.trigger(DAG_ID, run_id)
        cpu0, sched0 = machine_cpu(), own_cpu(scheduler)
        state = plane.wait_for_run(DAG_ID, run_id, timeout=timeout)
        cpu1, sched1 = machine_cpu(), own_cpu(scheduler)
        (queued_at, end_date), *_ = plane.query(
            "SELECT queued_at, end_date FROM dag_run WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id
        )
        rows = plane.query(
            "SELECT queued_dttm, start_date, end_date FROM task_instance WHERE dag_id = :d AND run_id = :r",
            d=DAG_ID,
            r=run_id,
        )
        starts = [start for _, start, _ in rows if start]
        ends = [end for _, _, end in rows if end]
        waits = [(start - queued).total_seconds() for queued, start, _ in rows if queued and start]
        result = Ceiling(
            tasks=len(rows),
            state=state,
            wall=(end_date - queued_at).total_seconds(),
            span=(max(ends) - min(starts)).total_seconds() if starts and ends else 0.0,
            parallelism=PARALLELISM,
            queued_to_start_p50=statistics.median(waits) if waits else 0.0,
            machine_cpu=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            scheduler_cpu=sched1 - sched0,
        )
        log(
            f"scheduler ceiling: {DAG_ID} {state}, {result.tasks} tasks in {result.span:.1f} s "
            f"= {result.tasks_per_second:.1f} tasks/s"
        )
        if state != "success":
            raise RuntimeError(f"{DAG_ID} ended {state}")
        return result
    finally:
        plane.stop()
        pg.drop(name)
